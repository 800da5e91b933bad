"""Multi-process runs for real: 2 CPU processes (gloo) through `accelerate launch` and the repo's cpu.yaml.

Spec: specs/weighted_ntp.md section 3 and 6, P5 (`prior`/`column`: 2 processes x batch 2 = 1 process x batch 4,
loss and gradients) and P8 (`rho1` `global`: 2 x 2 = 1 x 4), and V9 (`micro_batch` ranks each process's rows apart,
D = sum over processes of ceil(rho * N_p): the same as one process with 2 accumulation micro-batches of 2).
DESIGN.md: "batch 4 x GA 1 = batch 1 x GA 4 = 2 processes x batch 2". One launch trains every multi-process run
(tests/scripts/wntp_train.py); the 1-process references run here, in this process, with the same script's code.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tokentrain.data import completion_ids_of, tokenize_row

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "wntp_train.py"
CPU_CONFIG = REPO / "accelerate_configs" / "cpu.yaml"
ATOL = 1e-6

# name -> (2-process run, 1-process run that must match it). Plain SGD, lr 0.5; 12 rows; sequential order, so step s
# of 2 processes x batch 2 (rank 0: rows 4s, 4s+1; rank 1: rows 4s+2, 4s+3) holds the rows of 1 process x batch 4.
RUNS = {
    "column": ({"weighting": "column", "batch": 2, "ga": 1, "steps": 3}, {"batch": 4, "ga": 1}),
    "prior": ({"weighting": "prior", "batch": 2, "ga": 1, "steps": 3}, {"batch": 4, "ga": 1}),
    # batch 1 x GA 2 on each process: rank 0 takes rows 0, 2 and rank 1 rows 1, 3 in the first step.
    "prior_ga": ({"weighting": "prior", "batch": 1, "ga": 2, "steps": 3}, {"batch": 4, "ga": 1}),
    "rho1_global": (
        {"weighting": "rho1", "rho1_ratio": 0.6, "rho1_scope": "global", "batch": 2, "ga": 1, "steps": 2},
        {"batch": 4, "ga": 1},
    ),
    # global ranking gathers the selected count whatever average_tokens_across_devices says: the loss must be scaled
    # by the processes either way (before the fix, the gradient was 2x too small here).
    "rho1_global_no_avg": (
        {
            "weighting": "rho1",
            "rho1_ratio": 0.6,
            "rho1_scope": "global",
            "average_tokens_across_devices": False,
            "batch": 2,
            "ga": 1,
            "steps": 2,
        },
        {"batch": 4, "ga": 1},
    ),
    # micro_batch: each process ranks its own 2 rows, exactly like 2 accumulation micro-batches of 2 rows.
    "rho1_micro_batch": (
        {"weighting": "rho1", "rho1_ratio": 0.6, "rho1_scope": "micro_batch", "batch": 2, "ga": 1, "steps": 2},
        {"batch": 2, "ga": 2},
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and several OpenMP threads on a busy 2-core machine spin-wait for each
    other (steps 100x slower, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load_script():
    spec = importlib.util.spec_from_file_location("wntp_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows_path(pc_rows, tiny_tokenizer, tmp_path_factory):
    """The 12 conftest rows with `completion_ids`, random `token_weights` and tie-free random `ref_logps`."""
    g = torch.Generator().manual_seed(3)
    path = tmp_path_factory.mktemp("mp_rows") / "rows.jsonl"
    with open(path, "w") as f:
        for row in pc_rows:
            tokens = tokenize_row(row, tiny_tokenizer)
            ids = completion_ids_of(tokens["input_ids"], tokens["labels"])
            weights = 2 * torch.rand(len(ids), generator=g)
            ref_logps = torch.log(0.02 + 0.96 * torch.rand(len(ids), generator=g))
            f.write(
                json.dumps(
                    {**row, "completion_ids": ids, "token_weights": weights.tolist(), "ref_logps": ref_logps.tolist()}
                )
                + "\n"
            )
    return path


@pytest.fixture(scope="module")
def launched(tiny_model_dir, rows_path, tmp_path_factory):
    """Every 2-process run, trained in one `accelerate launch`; -> {name: (log history, weights)}."""
    out = tmp_path_factory.mktemp("mp_out")
    runs = out / "runs.json"
    runs.write_text(json.dumps([{"name": name, **two} for name, (two, _) in RUNS.items()]))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "EXPECT_PROCESSES": "2"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_CONFIG),
        str(SCRIPT),
        "--model",
        str(tiny_model_dir),
        "--rows",
        str(rows_path),
        "--runs",
        str(runs),
        "--out",
        str(out),
    ]
    start = time.time()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    print(f"accelerate launch of {len(RUNS)} runs: {time.time() - start:.1f} s")
    results = {}
    for name in RUNS:
        record = json.loads((out / name / "log.json").read_text())
        assert record["processes"] == 2
        results[name] = (record["log"], torch.load(out / name / "weights.pt"))
    return results


@pytest.fixture(scope="module")
def single(tiny_model_dir, rows_path, tmp_path_factory):
    """callable(name) -> (log history, weights) of the 1-process run matching RUNS[name], cached."""
    script = _load_script()
    out = tmp_path_factory.mktemp("sp_out")
    cache = {}

    def get(name):
        if name not in cache:
            two, one = RUNS[name]
            config = {**two, **one}
            cache[name] = script.run_one(tiny_model_dir, rows_path, out, name=name, **config)
        return cache[name]

    return get


def _losses(log):
    return [h["loss"] for h in log if "loss" in h]


def assert_same_run(a, b, atol=ATOL):
    (log_a, weights_a), (log_b, weights_b) = a, b
    assert _losses(log_a) == pytest.approx(_losses(log_b), rel=1e-6, abs=atol)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], atol=atol, rtol=0, msg=name)


def max_diff(a, b):
    return max((a[1][n] - b[1][n]).abs().max().item() for n in a[1])


@pytest.mark.parametrize("name", ["column", "prior", "prior_ga"])
def test_p5_two_processes_equal_one(launched, single, name):
    """P5: the normaliser is counted over processes (and accumulation steps), and each process's loss is scaled by P
    against DDP's gradient average: 2 processes x 2 (or x 1 x GA 2) = 1 process x 4, loss and weights after 3 steps."""
    ours, reference = launched[name], single(name)
    assert len(_losses(ours[0])) == 3
    assert_same_run(ours, reference)


@pytest.mark.parametrize("name", ["rho1_global", "rho1_global_no_avg"])
def test_p8_rho1_global_two_processes_equal_one(launched, single, name):
    """P8: `global` ranks the union of both processes' tokens, as one process does with all 4 rows, with
    average_tokens_across_devices true or false (the selected count is always the global one)."""
    assert_same_run(launched[name], single(name))


def test_v9_rho1_micro_batch_ranks_each_process_apart(launched, single):
    """V9 on a real model: `micro_batch` ranks each process's rows alone and D = sum_p ceil(rho * N_p), which is
    1 process with 2 accumulation micro-batches of 2 rows; it differs from the `global` ranking."""
    assert_same_run(launched["rho1_micro_batch"], single("rho1_micro_batch"))
    assert max_diff(launched["rho1_micro_batch"], launched["rho1_global"]) > 1e-4
    selected = {
        name: [h["weighted_ntp/selected_frac"] for h in launched[name][0] if "weighted_ntp/selected_frac" in h]
        for name in ("rho1_micro_batch", "rho1_global")
    }
    for fracs in selected.values():  # ceil(0.6 N) / N, at least 0.6 and well below 1
        assert all(0.6 <= f < 0.7 for f in fracs), selected


def test_multi_process_runs_are_not_trivial(launched):
    """Guards: the runs moved the weights and the weightings differ from each other."""
    assert max_diff(launched["column"], launched["prior"]) > 1e-4
    assert max_diff(launched["prior"], launched["rho1_global"]) > 1e-4
    assert all(math.isfinite(x) for name in RUNS for x in _losses(launched[name][0]))
