"""What every stage shares: its output folder, written atomically and owned by tokentrain."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..runtime import distributed_state

DONE_FILE = "_COMPLETE"


def is_complete(out_dir: str | Path) -> bool:
    return (Path(out_dir) / DONE_FILE).exists()


@contextlib.contextmanager
def atomic_output(out_dir: str | Path, overwrite: bool = False, keep_partial: bool = False) -> Iterator[Path]:
    """Write a stage's output to `<out>.tmp/`, then rename it to `<out>/` with a completion marker.

    A run killed inside the block leaves only `<out>.tmp/`: nothing half-written is ever read as a finished output.
    The next attempt deletes it, or, with `keep_partial` (training and generate stages), keeps it so that the work
    resumes where it stopped. A finished output is refused unless `overwrite`, which also discards partial work. With
    several processes, the main process owns the folder and the others wait for it at the start and the end.
    """
    state = distributed_state()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a finished output; pass --overwrite to replace it")
    if state.is_main_process:
        if tmp.exists() and (overwrite or not keep_partial):  # --overwrite starts from scratch, partial work too
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    yield tmp
    state.wait_for_everyone()
    if state.is_main_process:
        (tmp / DONE_FILE).write_text("complete\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    state.wait_for_everyone()
