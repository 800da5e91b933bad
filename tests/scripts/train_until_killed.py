"""`tokentrain` CLI, killed with SIGKILL right after it saves checkpoint K: a crash in the middle of training.

    python tests/scripts/train_until_killed.py --kill_after K train stage.yaml [--key value ...]

The callback goes into transformers' default callbacks, so the CLI builds its trainer untouched; the kill comes
after `checkpoint-K` is completely written (`on_save`), like a job preempted between two checkpoints.
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import TrainerCallback
from transformers.trainer import DEFAULT_CALLBACKS

from tokentrain.cli import main


class KillAfterCheckpoint(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            print(f"killing the run after checkpoint-{state.global_step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[0] != "--kill_after":
        sys.exit("usage: train_until_killed.py --kill_after K <tokentrain arguments>")
    DEFAULT_CALLBACKS.append(KillAfterCheckpoint(int(argv[1])))  # the list Trainer reads: same object
    sys.exit(main(argv[2:]))
