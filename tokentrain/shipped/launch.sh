#!/usr/bin/env bash
# launch.sh: run a tokentrain recipe with `accelerate launch`, on this machine or on every node of a SLURM job.
#
#   bash launch.sh [--dry-run] [--accelerate_config NAME|PATH] RECIPE [--key value ...]
#
# runs
#
#   accelerate launch --config_file "$ACCEL_CONFIG" [topology flags] -m tokentrain.cli run RECIPE [--key value ...]
#
# Environment:
#   ACCEL_CONFIG   accelerate config: a shipped config's name (cpu, ddp, fsdp2, zero2, zero3) or a file (default: ddp;
#                  a relative path is looked up from the current directory, then from this script's directory);
#                  --accelerate_config NAME|PATH does the same and wins over the variable
#   DRY_RUN=1      print the command and exit 0 (same as --dry-run)
#   GPUS_PER_NODE  processes (GPUs) per node under SLURM (default: SLURM_GPUS_ON_NODE, else `nvidia-smi -L`, else 1)
#   MASTER_PORT    rendezvous port under SLURM (default 29500)
#
# Locally the topology (processes, GPUs) is the config file's. Under SLURM (SLURM_JOB_ID set) this script adds
# --num_machines, --machine_rank, --main_process_ip (first host of the job), --main_process_port and
# --num_processes (nodes x GPUs per node), and --rdzv_backend c10d on more than one node. accelerate starts the GPU
# processes of its node itself, so run ONE task per node:
#
#   #!/bin/bash
#   #SBATCH --job-name=tokentrain
#   #SBATCH --nodes=2
#   #SBATCH --ntasks-per-node=1
#   #SBATCH --gpus-per-node=8
#   #SBATCH --cpus-per-task=64
#   export ACCEL_CONFIG=accelerate_configs/zero3.yaml
#   srun bash launch.sh recipes/weighted_ntp_e2e/ --run_dir runs/e2e
#
# The config's num_processes/num_machines are per-job defaults that these flags override; multi-node DeepSpeed
# needs `deepspeed_multinode_launcher: standard` in the config (the shipped zero*.yaml have it).
# A config with `use_cpu: true` (cpu.yaml) also gets ACCELERATE_USE_CPU=true: accelerate does not pass use_cpu on
# to torchrun's workers, and without it they would not form a CPU (gloo) process group.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    cat <<EOF
usage: bash launch.sh [--dry-run] [--accelerate_config NAME|PATH] RECIPE [--key value ...]

Runs: accelerate launch --config_file "\$ACCEL_CONFIG" [SLURM topology flags] -m tokentrain.cli run RECIPE [--key value ...]

  RECIPE           a recipe folder or stage YAML (e.g. recipes/quickstart/)
  --key value      overrides passed on to \`tokentrain run\` (e.g. --max_steps 3)
  --dry-run        print the command and exit (or DRY_RUN=1)
  --accelerate_config NAME|PATH
                   a shipped config by name (cpu, ddp, fsdp2, zero2, zero3) or a config file (or ACCEL_CONFIG)
  -h, --help       this help

Environment: ACCEL_CONFIG (a name or file; default ddp), DRY_RUN,
and under SLURM: GPUS_PER_NODE (default SLURM_GPUS_ON_NODE, nvidia-smi -L, 1), MASTER_PORT (default 29500).
Under SLURM run one task per node: srun --ntasks-per-node=1 bash launch.sh RECIPE ...
EOF
}

die() { # message, exit status
    echo "launch.sh: error: $1" >&2
    exit "${2:-1}"
}

dry_run="${DRY_RUN:-0}"
accel_config="${ACCEL_CONFIG:-ddp}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        --dry-run)
            dry_run=1
            shift
            ;;
        --accelerate_config | --accelerate-config)
            [[ $# -ge 2 ]] || die "--accelerate_config needs a name (cpu, ddp, fsdp2, zero2, zero3) or a file" 2
            accel_config="$2"
            shift 2
            ;;
        *)
            break
            ;;
    esac
done
if [[ $# -eq 0 || "$1" == -* ]]; then
    usage >&2
    die "missing RECIPE (the first argument after the options of launch.sh)" 2
fi

# ---------------------------------------------------------------------------------------------------- config
# a shipped config by name (zero3 -> accelerate_configs/zero3.yaml beside this script), else a file
if [[ "$accel_config" =~ ^[A-Za-z0-9_-]+$ && -f "$SCRIPT_DIR/accelerate_configs/$accel_config.yaml" && ! -f "$accel_config" ]]; then
    accel_config="$SCRIPT_DIR/accelerate_configs/$accel_config.yaml"
elif [[ ! -f "$accel_config" && "$accel_config" != /* && -f "$SCRIPT_DIR/$accel_config" ]]; then
    accel_config="$SCRIPT_DIR/$accel_config"
fi
if [[ ! -f "$accel_config" ]]; then
    names="$(cd "$SCRIPT_DIR/accelerate_configs" 2>/dev/null && ls *.yaml 2>/dev/null | sed 's/\.yaml$//' | tr '\n' ' ')"
    die "accelerate config not found: $accel_config (shipped names: ${names% })" 2
fi

env_prefix=()
if grep -Eq '^use_cpu:[[:space:]]*true' "$accel_config"; then
    export ACCELERATE_USE_CPU=true
    env_prefix=(ACCELERATE_USE_CPU=true)
fi

# ---------------------------------------------------------------------------------------------------- SLURM
topology=()
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    num_machines="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
    machine_rank="${SLURM_NODEID:-${SLURM_PROCID:-0}}"
    if [[ -n "${SLURM_NTASKS:-}" ]] && ((SLURM_NTASKS > num_machines)); then
        die "SLURM_NTASKS=$SLURM_NTASKS on $num_machines node(s): run one task per node (srun --ntasks-per-node=1), accelerate starts the per-GPU processes" 2
    fi

    # Rank 0's host: the first host of the job's node list, which every node computes the same way.
    nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
    main_process_ip=""
    if [[ -n "$nodelist" ]] && command -v scontrol >/dev/null 2>&1; then
        mapfile -t hosts < <(scontrol show hostnames "$nodelist")
        main_process_ip="${hosts[0]:-}"
    fi
    if [[ -z "$main_process_ip" ]]; then
        ((num_machines == 1)) || echo "launch.sh: warning: no scontrol, using SLURM_LAUNCH_NODE_IPADDR or this host as the main process" >&2
        main_process_ip="${SLURM_LAUNCH_NODE_IPADDR:-$(hostname 2>/dev/null || echo "$HOSTNAME")}"
    fi

    gpus_per_node="${GPUS_PER_NODE:-}"
    if [[ -z "$gpus_per_node" && -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        gpus_per_node="${SLURM_GPUS_ON_NODE##*:}" # "8" (or "h100:8" on some setups)
    fi
    if [[ -z "$gpus_per_node" ]] && command -v nvidia-smi >/dev/null 2>&1; then
        gpus_per_node="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
    fi
    if [[ -z "$gpus_per_node" || "$gpus_per_node" == 0 ]]; then
        gpus_per_node=1
    fi
    [[ "$gpus_per_node" =~ ^[0-9]+$ ]] || die "GPUS_PER_NODE must be a number, got '$gpus_per_node'" 2

    topology=(
        --num_machines "$num_machines"
        --machine_rank "$machine_rank"
        --main_process_ip "$main_process_ip"
        --main_process_port "${MASTER_PORT:-29500}"
        --num_processes "$((num_machines * gpus_per_node))"
    )
    # c10d: torchrun's dynamic rendezvous, hosted by the main process; waits for late nodes. accelerate 1.15 ignores
    # rdzv_backend in a config file (its CLI default "static" wins), so it is passed here.
    if ((num_machines > 1)); then
        topology+=(--rdzv_backend c10d)
    fi
fi

# ---------------------------------------------------------------------------------------------------- run
cmd=(accelerate launch --config_file "$accel_config" "${topology[@]}" -m tokentrain.cli run "$@")
printf -v line '%q ' "${env_prefix[@]}" "${cmd[@]}" # shell-quoted: the line can be pasted back into a shell
echo "launch.sh: ${line% }"
if [[ "$dry_run" == 1 ]]; then
    exit 0
fi
exec "${cmd[@]}"
