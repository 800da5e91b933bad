"""What a training run prints into a file (a SLURM .out): one line per ~10% of the steps at most, a progress line only
where no log line (which carries the step, percentage and elapsed time) fell in that tenth."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from tokentrain.stages.train import TrainProgress


def simulate(caplog, max_steps: int, logging_steps: int) -> list[str]:
    args = SimpleNamespace(logging_strategy="steps")
    state = SimpleNamespace(global_step=0, max_steps=max_steps, logging_steps=logging_steps, is_world_process_zero=True)
    cb = TrainProgress()
    with caplog.at_level(logging.INFO, logger="tokentrain"):
        cb.on_train_begin(args, state, None)
        for step in range(1, max_steps + 1):
            state.global_step = step
            cb.on_step_end(args, state, None)  # the Trainer calls on_step_end before it logs that step
            if step % logging_steps == 0:
                cb.on_log(args, state, None, logs={"loss": 1.0, "train_tokens_per_second": 1234.0})
        cb.on_log(args, state, None, logs={"train_loss": 1.0, "train_runtime": 3.0})
        cb.on_train_end(args, state, None)
    return [r.getMessage() for r in caplog.records]


def test_file_progress_is_not_doubled_by_log_lines(caplog, monkeypatch):
    monkeypatch.setattr("tokentrain.stages.train.is_terminal", lambda: False)
    monkeypatch.setattr(TrainProgress, "_elapsed", lambda self: 10.0)
    lines = simulate(caplog, max_steps=200, logging_steps=30)
    progress = [line for line in lines if line.startswith("training: step")]
    logs = [line for line in lines if not line.startswith("training: step")]
    assert [line.split()[2] for line in progress] == ["20/200", "80/200", "140/200"], (
        progress
    )  # tenths without a log line
    assert logs[0].startswith("step 30/200 (15%, ") and "loss 1, tokens/s 1,234" in logs[0], logs[0]
    assert len(logs) == 200 // 30 + 1  # every log line, and the final summary
    assert len(lines) <= 10  # was 17: a progress line at every tenth and a log line every 30 steps


def test_file_progress_without_logging_prints_every_tenth(caplog, monkeypatch):
    monkeypatch.setattr("tokentrain.stages.train.is_terminal", lambda: False)
    monkeypatch.setattr(TrainProgress, "_elapsed", lambda self: 10.0)
    lines = simulate(caplog, max_steps=50, logging_steps=1000)
    progress = [line.split()[2] for line in lines if line.startswith("training: step")]
    assert progress == [f"{k}/50" for k in range(5, 50, 5)]  # the last tenth is the final log line itself


def test_a_short_pass_prints_no_progress_line(caplog, monkeypatch):
    """A 12-step stage that ends in a second printed 9 progress lines into the quickstart's log."""
    monkeypatch.setattr("tokentrain.stages.train.is_terminal", lambda: False)
    lines = simulate(caplog, max_steps=12, logging_steps=10)
    assert not [line for line in lines if line.startswith("training: step")], lines
    assert len(lines) == 2  # the log line at step 10 and the final summary


def test_logged_progress_of_a_short_scoring_pass_is_silent(caplog, monkeypatch):
    from tokentrain import runtime

    monkeypatch.setattr(runtime, "is_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="tokentrain"):
        assert list(runtime.progress(range(4), desc="Scoring")) == [0, 1, 2, 3]
    assert not caplog.records
    monkeypatch.setattr(runtime, "QUIET_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="tokentrain"):
        list(runtime.progress(range(4), desc="Scoring"))
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        f"Scoring: {k}/4 ({25 * k}%)" for k in range(1, 5)
    ]
