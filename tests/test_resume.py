"""A training stage killed mid-run resumes from its last checkpoint and ends with the weights of an uninterrupted run.

DESIGN.md (correctness rules): "A test kills training mid-run, resumes from the last checkpoint, and gets the same
final weights as an uninterrupted run", and "stage outputs are written to a temporary folder and renamed when
complete". Real processes: `python -m tokentrain.cli train stage.yaml`, and the same CLI under
tests/scripts/train_until_killed.py, which SIGKILLs itself right after saving checkpoint-4. The stage trains
`weighted_ntp` with `weighting: column` on rows carrying `completion_ids` + `token_weights`, with the default AdamW
and linear schedule (so optimiser, scheduler, RNG and data-order state must all come back), and GA 2 over 3 steps per
epoch, so the kill falls inside the second epoch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tokentrain.data import completion_ids_of, tokenize_row
from tokentrain.stages.base import DONE_FILE

REPO = Path(__file__).resolve().parents[1]
KILLER = REPO / "tests" / "scripts" / "train_until_killed.py"
KILL_AFTER = 4


@pytest.fixture(scope="module")
def stage_file(pc_rows, tiny_tokenizer, tiny_model_dir, tmp_path_factory):
    """A `train` stage YAML over 12 rows with `completion_ids` + random `token_weights`; 7 steps, save every 2."""
    root = tmp_path_factory.mktemp("resume")
    g = torch.Generator().manual_seed(5)
    rows = root / "rows.jsonl"
    with open(rows, "w") as f:
        for row in pc_rows:
            tokens = tokenize_row(row, tiny_tokenizer)
            ids = completion_ids_of(tokens["input_ids"], tokens["labels"])
            weights = (2 * torch.rand(len(ids), generator=g)).tolist()
            f.write(json.dumps({**row, "completion_ids": ids, "token_weights": weights}) + "\n")
    stage = {
        "stage": "train",
        "objective": "weighted_ntp",
        "model": str(tiny_model_dir),
        "dataset": str(rows),
        "output_dir": str(root / "out"),
        "seed": 3,
        "weighting": "column",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 7,
        "save_steps": 2,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "bf16": False,
        "disable_tqdm": True,
    }
    path = root / "stage.yaml"
    path.write_text(yaml.safe_dump(stage))
    return path


def _run(args, root):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_killed_run_resumes_to_the_uninterrupted_weights(stage_file):
    root = stage_file.parent
    out, tmp = root / "out", root / "out.tmp"
    train = ["-m", "tokentrain.cli", "train", str(stage_file)]

    # 1. Killed right after checkpoint-4: only <out>.tmp/ with its checkpoints, no finished <out>/.
    killed = _run([str(KILLER), "--kill_after", str(KILL_AFTER), "train", str(stage_file)], root)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-4000:]
    assert f"killing the run after checkpoint-{KILL_AFTER}" in killed.stdout
    assert not out.exists()
    assert tmp.is_dir()
    checkpoints = sorted(p.name for p in tmp.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"], checkpoints
    assert not (tmp / DONE_FILE).exists() and not (tmp / "model.safetensors").exists()

    # 2. Edited settings do not resume the partial run (steps 1-4 with one objective, 5-7 with another): refused,
    #    naming the key, with the checkpoints kept.
    edited = _run([*train, "--learning_rate", "0.02"], root)
    assert edited.returncode == 2, edited.stderr[-4000:]
    assert "learning_rate: 0.01 then, 0.02 now" in edited.stderr and "--overwrite" in edited.stderr
    assert sorted(p.name for p in tmp.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    # 3. The same command again resumes from checkpoint-4 and finishes: <out>/ complete, <out>.tmp/ gone.
    resumed = _run(train, root)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    log = resumed.stdout + resumed.stderr
    assert f"resuming from {tmp / f'checkpoint-{KILL_AFTER}'}" in log, log[-4000:]
    assert log.count(": loss ") == 7 - KILL_AFTER  # logged steps 5-7 only: continued, not restarted
    assert out.is_dir() and (out / DONE_FILE).exists()
    assert not tmp.exists()
    assert not list(out.glob("checkpoint-*"))
    assert json.loads((out / "train_summary.json").read_text())["stage"] == "stage"

    # 4. An uninterrupted run of the same stage, to another folder.
    straight_out = root / "straight"
    straight = _run([*train, "--output_dir", str(straight_out)], root)
    assert straight.returncode == 0, straight.stderr[-4000:]
    assert "resuming from" not in straight.stdout + straight.stderr
    assert (straight.stdout + straight.stderr).count(": loss ") == 7

    got, expected = _weights(out), _weights(straight_out)
    assert got.keys() == expected.keys()
    initial = load_file(str(Path(yaml.safe_load(stage_file.read_text())["model"]) / "model.safetensors"))
    moved = max((expected[k] - initial[k]).abs().max().item() for k in expected)
    assert moved > 1e-3, "training did not move the weights: the comparison would be vacuous"
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
