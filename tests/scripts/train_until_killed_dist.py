"""`tokentrain` CLI under several processes, every rank killed with SIGKILL once checkpoint K is saved by all of them.

    accelerate launch --config_file accelerate_configs/cpu.yaml tests/scripts/train_until_killed_dist.py \
        --kill_after K train stage.yaml [--key value ...]

tests/scripts/train_until_killed.py for a multi-process run: the callback waits at a barrier until every rank has
finished `on_save` (each rank writes its own `rng_state_<rank>.pth`), then each rank kills itself, like a job
preempted between two checkpoints. Without the barrier the first rank to die could take the others down before their
RNG states are written, and the run would resume from the checkpoint before (which `stages/train.py` also handles).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer import DEFAULT_CALLBACKS

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tokentrain.cli import main  # noqa: E402


class KillAfterCheckpoint(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank's checkpoint files are on disk
            print(f"rank {args.process_index}: killing the run after checkpoint-{state.global_step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[0] != "--kill_after":
        sys.exit("usage: train_until_killed_dist.py --kill_after K <tokentrain arguments>")
    DEFAULT_CALLBACKS.append(KillAfterCheckpoint(int(argv[1])))  # the list Trainer reads: same object
    sys.exit(main(argv[2:]))
