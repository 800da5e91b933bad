"""Trackers (`report_to`): every stage is a run named `<recipe>/<stage>` in one group per run folder; the greedy
accuracy checks of training and the evaluate stage's results reach the tracker. Tested offline with TensorBoard: the
event files exist and hold the expected scalars; wandb's naming through a recording stand-in for its callback."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
from transformers.integrations import integration_utils

from tokentrain.cli import main
from tokentrain.stages.base import Stage, StageConfig
from tokentrain.stages.trackers import tracker_env, tracker_names

RECIPE = {
    "00_prepare.yaml": "stage: prepare\ntask: arith_chain\noutput_dir: data\nseed: 0\n"
    "splits:\n  pool: [96, 0]\n  dev: [4, 777]\n  test: [5, 12345]\n",
    "01_sft.yaml": """\
stage: sft
model: "{run_dir}/data/init"
dataset: "{run_dir}/data/pool.jsonl"
output_dir: base
max_steps: 4
per_device_train_batch_size: 8
learning_rate: 3.0e-3
logging_steps: 1
save_strategy: "no"
bf16: false
report_to: tensorboard
stop_dataset: "{run_dir}/data/dev.jsonl"
stop_task: arithmetic
stop_accuracy: 0.99
stop_check_from: 2
stop_check_every: 2
stop_max_new_tokens: 8
""",
    "02_evaluate.yaml": """\
stage: evaluate
task: arithmetic
gold_column: gold
dataset: "{run_dir}/data/test.jsonl"
models:
  base: "{run_dir}/base"
max_new_tokens: 8
heldout_nll: false
report_to: tensorboard
output_dir: eval
""",
}


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in `folder`: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _args_text(folder: Path) -> dict:
    """The training arguments TensorBoardCallback writes as text at the start of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return json.loads(events.Tensors("args/text_summary")[0].tensor_proto.string_val[0])


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("trackers")
    recipe = root / "tiny"
    recipe.mkdir()
    for name, text in RECIPE.items():
        (recipe / name).write_text(text)
    run = root / "runs" / "tracked"
    before = {k: os.environ.get(k) for k in ("WANDB_RUN_GROUP", "TENSORBOARD_LOGGING_DIR")}
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    assert {k: os.environ.get(k) for k in before} == before  # the stage's tracker settings do not leak
    return run


def test_training_logs_loss_and_the_accuracy_checks_to_tensorboard(tracked_run):
    events = tracked_run / "base" / "tensorboard"
    assert list(events.glob("events.out.tfevents.*"))  # inside the stage's own output, renamed with it
    scalars = _scalars(events)
    summary = json.loads((tracked_run / "base" / "train_summary.json").read_text())
    logged = [(e["step"], e["loss"]) for e in summary["log_history"] if "loss" in e]
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in logged] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in logged])
    assert {"train/grad_norm", "train/learning_rate"} <= set(scalars)
    checks = [(c["step"], c["accuracy"]) for c in summary["accuracy_checks"]]
    assert [s for s, _ in checks] == [2, 4]
    assert scalars["eval/greedy_accuracy"] == pytest.approx(checks)
    assert _args_text(events)["run_name"] == "tracked/01_sft"  # <recipe>/<stage>


def test_evaluate_results_go_to_tensorboard(tracked_run):
    events = tracked_run / "eval" / "tensorboard"
    scalars = _scalars(events)
    results = json.loads((tracked_run / "eval" / "eval.json").read_text())["base"]
    for metric in ("accuracy", "correct", "wrong", "unparsable"):
        assert scalars[f"eval/base/{metric}"] == [(0, pytest.approx(results[metric]))]
    assert "eval/base/heldout_nll" not in scalars  # None (not computed) is not a scalar
    assert _args_text(events)["run_name"] == "tracked/02_evaluate"


def _stage(name: str, top: Path, run_dir: Path) -> Stage:
    return Stage(Path(f"{name}.yaml"), StageConfig(stage="train"), {}, {"top_dir": str(top), "run_dir": str(run_dir)})


def test_run_names_and_groups_follow_the_run_folder(tmp_path):
    top = tmp_path / "runs" / "mini"
    assert tracker_names(_stage("01_sft_base", top, top)) == ("mini/01_sft_base", str(top.resolve()))
    combo = top / "seeds" / "seed0" / "lrs" / "lr3e-05"  # a grid's sub-stage: its place in the run folder
    assert tracker_names(_stage("01_dpo", top, combo)) == ("mini/seeds/seed0/lrs/lr3e-05/01_dpo", str(top.resolve()))


def test_tracker_env_sets_the_group_and_event_folder_keeps_the_users_and_finishes_wandb(tmp_path, monkeypatch):
    top = tmp_path / "runs" / "mini"
    stage = _stage("02_sft", top, top)
    finished = []
    fake = types.SimpleNamespace(run=object(), finish=lambda: finished.append(True))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "/mine")  # the user's choice wins
    with tracker_env(stage, tmp_path / "out.tmp"):
        assert os.environ["WANDB_RUN_GROUP"] == str(top.resolve())
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == "/mine"
    assert "WANDB_RUN_GROUP" not in os.environ and os.environ["TENSORBOARD_LOGGING_DIR"] == "/mine"
    assert finished == [True]  # the next stage starts a run of its own
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")
    with tracker_env(stage, tmp_path / "out.tmp"):
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "out.tmp" / "tensorboard")


class _RecordingWandb(integration_utils.TrainerCallback):
    """Stands in for transformers' WandbCallback (wandb is not installed here): what it would have sent."""

    seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        group = os.environ.get("WANDB_RUN_GROUP")
        self.seen.append({"name": args.run_name, "group": group, "logs": dict(logs)})


def test_wandb_gets_run_name_group_and_evaluate_results(tracked_run, tmp_path, monkeypatch):
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "wandb", _RecordingWandb)
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    _RecordingWandb.seen.clear()
    stage = tmp_path / "03_evaluate.yaml"
    text = RECIPE["02_evaluate.yaml"].replace("tensorboard", "wandb").replace("output_dir: eval", "output_dir: eval_w")
    stage.write_text(text)
    assert main(["evaluate", str(stage), "--run_dir", str(tracked_run)]) == 0
    (seen,) = _RecordingWandb.seen
    results = json.loads((tracked_run / "eval_w" / "eval.json").read_text())["base"]
    assert seen["name"] == "tracked/03_evaluate" and seen["group"] == str(tracked_run.resolve())
    assert seen["logs"]["eval_base/accuracy"] == results["accuracy"]
