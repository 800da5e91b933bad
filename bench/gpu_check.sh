#!/usr/bin/env bash
# gpu_check.sh: every objective under ddp, fsdp2, zero2 and zero3 on this machine's GPUs, in bf16, on a random
# Qwen2-style model with a 151,936-token vocabulary; saved weights reloaded; `bench:` lines with step time, tokens/s
# and peak memory per objective and config. Under 10 minutes on one GPU. Run from anywhere, with tokentrain and its
# deepspeed extra installed (pip install -e '.[deepspeed]'):
#
#     bash bench/gpu_check.sh                      # every GPU of the machine is a process
#     bash bench/gpu_check.sh --quick              # 1 warm-up + 3 timed steps instead of 2 + 6
#     bash bench/gpu_check.sh --configs ddp,zero3 --objectives critical_dpo
#
# Output goes to the terminal and to bench/gpu_check.log; copy the figures to bench/RESULTS.md.
# Arguments are passed to `python -m bench.gpu_check` (see its --help); exit status 1 if any run failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
    echo "gpu_check.sh: no NVIDIA GPU found (nvidia-smi -L); on CPU run: python -m bench.gpu_check --cpu --quick" >&2
    exit 2
fi
if ! python -c "import deepspeed" 2>/dev/null; then
    echo "# deepspeed is not installed: zero2 and zero3 will fail (pip install -e '.[deepspeed]')"
fi
status=0
timeout 590 python -m bench.gpu_check --budget 570 "$@" 2>&1 | tee bench/gpu_check.log || status=$?
exit "$status"
