"""Scaling on CPU: tokens/s of every objective with 2 processes against 1, as a ratio (ideal: 2.0).

    python -m bench.scaling [--quick] [--rounds 3] [--configs ddp]

Weak scaling, as data parallelism is used: the same batch per process (4 rows of ~140 tokens), so 2 processes train
twice the tokens per step. Each round launches the 1-process run and then the 2-process run (`accelerate launch` of
bench/gpu_check.py's worker with the shipped cpu.yaml, `--num_processes 1` or `2`, one thread per process), every
objective in turn inside each launch, 2 warm-up and 6 timed steps: so the two topologies of an objective are measured
minutes apart under the same machine load, round after round. tokens/s = non-padding input tokens of all processes /
step time (forward, backward, optimizer and, with 2 processes, the gradient all-reduce; data loading excluded). Per
round and objective the ratio is tokens/s(2) / tokens/s(1); the figure is the median over the rounds.

Model: bench/objective_cases.py's `small` Llama (hidden 256, 4 layers, 3.3M parameters with its 447-token BPE),
float32, AdamW, each objective's case (frozen auxiliary models included). `--quick`: the tests' tiny model, 1 round
(a smoke run: its ratios measure process overhead, not scaling).

Prints `bench: scaling/<config>/<stem>/tokens_per_s_2p_vs_1p <ratio>` and the tokens/s of each topology; `#` lines give
the per-round ratios. A 2-core machine shared with other jobs bounds what 2 processes can gain: read the figures with
the machine load printed beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.gpu_check import SETTINGS, emit, note, prepare, run_config


def main(argv: list[str] | None = None) -> int:
    from tokentrain.objectives import OBJECTIVES
    from tokentrain.runtime import quiet_console

    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model, 1 round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--configs", default="ddp", help="comma-separated CPU configs (ddp, fsdp2, zero2, zero3)")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated objective stems")
    parser.add_argument("--work", default=None, help="folder for the policy, cases and runs (default: a temp folder)")
    a = parser.parse_args(argv)
    quiet_console()
    settings = SETTINGS["cpu_quick" if a.quick else "cpu"]
    rounds = a.rounds or (1 if a.quick else 3)
    objectives = [s for s in a.objectives.split(",") if s]
    configs = [c for c in a.configs.split(",") if c]
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="scaling_"))
    note(
        f"CPU scaling: {settings['shape']} policy, batch {settings['batch']} per process, {settings['warmup']} "
        f"warm-up + {settings['timed']} timed steps, {rounds} rounds; {os.cpu_count()} CPUs, load average "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}; work folder {work}"
    )
    start = time.time()
    prepare(work, settings, objectives, processes=2)
    failed = 0
    for config in configs:
        speed = {(s, p): [] for s in objectives for p in (1, 2)}
        for r in range(rounds):
            for processes in (1, 2):
                for record in run_config(work, config, processes, True, settings, objectives, False, timeout=900):
                    if record.get("error"):
                        failed += 1
                        note(f"{config} {processes}p {record['stem']} failed: {record['error']}")
                        continue
                    speed[(record["stem"], processes)].append(record["tokens_per_s"])
            note(f"round {r + 1}/{rounds} done, load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
        for stem in objectives:
            one, two = speed[(stem, 1)], speed[(stem, 2)]
            if not one or len(one) != len(two):
                continue
            ratios = [b / a for a, b in zip(one, two)]
            note(f"{config} {stem}: per-round ratios {', '.join(f'{x:.2f}' for x in ratios)}")
            emit(f"scaling/{config}/{stem}/tokens_per_s_2p_vs_1p", statistics.median(ratios), "ratio")
            emit(f"scaling/{config}/{stem}/tokens_per_s_1p", statistics.median(one), "tokens/s")
            emit(f"scaling/{config}/{stem}/tokens_per_s_2p", statistics.median(two), "tokens/s")
    note(f"total {time.time() - start:.0f} s; {failed} failed runs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
