"""Trackers of the stages (`report_to`: tensorboard, wandb, trackio): run names `<recipe>/<stage>`, one group per run
folder, TensorBoard event files in the stage's output folder, and an evaluate stage's results sent as a run of its own."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from .base import Stage


def tracker_names(stage: Stage) -> tuple[str, str]:
    """(run_name, group) of a stage for the trackers. run_name is `<recipe>/<stage>`: the run folder's name
    (runs/<recipe> by default), then the stage's place in it (`mini/01_sft_base`; inside grids
    `mini/seeds/seed0/lrs/lr3e-05/01_dpo`). The group is the run folder: one per `tokentrain run`."""
    top = Path(stage.variables.get("top_dir") or ".").resolve()
    here = Path(stage.variables.get("run_dir") or top).resolve()
    place = here.relative_to(top).parts if here.is_relative_to(top) else ()
    return "/".join([top.name, *place, stage.name]), str(top)


@contextlib.contextmanager
def tracker_env(stage: Stage, out: Path):
    """For the duration of a stage: wandb's group (WANDB_RUN_GROUP) is the run folder, and TensorBoard writes its event
    files to `<output_dir>/tensorboard` (TENSORBOARD_LOGGING_DIR), unless the environment sets them already. A wandb
    run is finished with its stage (transformers leaves it open: the next stage in the process would log into it)."""
    values = {"WANDB_RUN_GROUP": tracker_names(stage)[1], "TENSORBOARD_LOGGING_DIR": str(Path(out) / "tensorboard")}
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()


def tracker_callbacks(trainer) -> list:
    """The trainer's tracker callbacks: those transformers made for its `report_to` (tensorboard, wandb, trackio)."""
    from transformers.integrations import get_reporting_integration_callbacks

    kinds = tuple(get_reporting_integration_callbacks(trainer.args.report_to))
    return [cb for cb in trainer.callback_handler.callbacks if kinds and isinstance(cb, kinds)]


def report_to_trackers(stage: Stage, out: Path, report_to, scalars: dict[str, float]) -> None:
    """Send one set of scalars (an evaluate stage's results; `eval_` keys show as `eval/...`) to the trackers of
    `report_to`, through transformers' own tracker callbacks, as a run of its own named and grouped as a training
    stage's."""
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.integrations import get_reporting_integration_callbacks

    with tracker_env(stage, out):
        args = TrainingArguments(output_dir=str(out), report_to=report_to, run_name=tracker_names(stage)[0])
        state, control = TrainerState(), TrainerControl()
        for kind in get_reporting_integration_callbacks(args.report_to):
            tracker = kind()
            tracker.on_train_begin(args, state, control)
            tracker.on_log(args, state, control, logs=scalars)
            tracker.on_train_end(args, state, control)
