"""Process helpers: accelerate's process state on CPU or GPU, logging set-up, and a clean exit of gloo runs.

Nothing here imports torch, transformers or accelerate at module level: the CLI imports this module for `--help`.
"""

from __future__ import annotations

import logging
import os
import sys


def distributed_state():
    """accelerate's process state, on the CPU when there is no GPU or `ACCELERATE_USE_CPU` is set.

    A bare `PartialState()` ignores `ACCELERATE_USE_CPU` and, created first, would leave every process of a CPU launch
    believing it is the only (main) one; every later `Accelerator()` shares this state.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def setup_logging(prefix: str = "") -> None:
    """INFO on the main process, WARNING on the others; `prefix` tags the lines of a grid worker."""
    level = logging.INFO if distributed_state().is_main_process else logging.WARNING
    fmt = f"%(asctime)s [{prefix}] %(name)s: %(message)s" if prefix else "%(asctime)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", force=True)


def exit_process(code: int = 0) -> int:
    """End a process of a gloo (CPU) multi-process run with `os._exit(code)`, after every rank is done and flushed.

    With torch 2.13, a gloo worker thread can still be destroying the last collective's work object, which drops a
    Python tensor and so takes the GIL, while the interpreter finalises; that thread then exits inside a noexcept
    destructor and the rank dies with "terminate called without an active exception" (SIGABRT) after its work is
    done: 6 launches in 100 of a 2-process training job here (core dump: `AsyncAllgatherWork::~AsyncAllgatherWork` in
    `ProcessGroupGloo::runLoop`, `take_gil` -> `PyThread_exit_thread`). `destroy_process_group` does not stop those
    threads; skipping finalisation does. Any other run (one process, NCCL) returns `code` and exits normally.
    """
    if "torch" not in sys.modules:  # nothing distributed ever started (e.g. --help, inspect)
        return code
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"):
        return code
    dist.barrier()  # no rank leaves while another still writes or waits on it
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# Known warnings of the stack, silenced by exact message and module: TRL 1.16 still calls the transformers 5
# methods renamed to activation_checkpointing_*; tokentrain passes the new names itself.
KNOWN_WARNINGS = (
    (r"`gradient_checkpointing_enable` is deprecated", FutureWarning, "transformers.modeling_utils"),
    (r"`gradient_checkpointing_disable` is deprecated", FutureWarning, "transformers.modeling_utils"),
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, "transformers.modeling_utils"),
)


def quiet_console() -> None:
    """What a CLI run prints: no progress bars for loading, saving or dataset maps (datasets, transformers' weight
    loading and shard writing, the hub), and none of the known warnings; tokentrain draws one bar per long pass
    (training, generation, scoring) itself, with `progress`."""
    import warnings

    import datasets
    import huggingface_hub.utils
    import transformers

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def is_terminal() -> bool:
    """Progress bars need a terminal; in a file (a SLURM .out, a pipe) carriage-return bars are noise."""
    return sys.stderr.isatty()


def progress(iterable, total: int | None = None, desc: str = "", enabled: bool = True):
    """One progress display for a long pass: a tqdm bar on a terminal, else a log line at every ~10% (and the end)."""
    if not enabled:
        return iterable
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc)
    return _logged_progress(iterable, total if total is not None else len(iterable), desc)


# In a log file, no progress line is written during a pass's first seconds: a pass that short needs none.
QUIET_SECONDS = 2.0


def _logged_progress(iterable, total: int, desc: str):
    import time

    log = logging.getLogger("tokentrain")
    start, next_mark = time.time(), 1
    for done, item in enumerate(iterable, 1):
        yield item
        if total and (done * 10 >= next_mark * total or done == total):
            elapsed = time.time() - start
            if elapsed < QUIET_SECONDS:  # a pass this short needs no progress line
                next_mark = done * 10 // total + 1
                continue
            eta = elapsed / done * (total - done)
            log.info(
                "%s: %d/%d (%d%%), %.0f s elapsed, about %.0f s left",
                desc,
                done,
                total,
                100 * done // total,
                elapsed,
                eta,
            )
            next_mark = done * 10 // total + 1
