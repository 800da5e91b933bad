"""The concept_heads recipes end to end (slow): the real-scale recipe on local files (a tiny Llama whose tokenizer is
trained in code on GSM8K text, the shared GSM8K and MATH-500 copies, conversation rows made from GSM8K questions in
place of CAFT's auxiliary-head dataset), `tokentrain quickstart concept_heads`, and the mini recipe with every training
stage cut short. The recipes need ../shared/data; those tests skip with a reason when it is absent."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tokentrain.cli import main
from tokentrain.data import load_rows
from tokentrain.models import build_tiny

ROOT = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    for var in ("TOKENTRAIN_SHARED_DATA", "TOKENTRAIN_DATA"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def shared():
    data = _shared_data()
    if not (data / "gsm8k" / "train.jsonl.gz").exists() or not (data / "math500" / "test.jsonl.gz").exists():
        pytest.skip(f"{data}/gsm8k or math500 not found: the shared data folder is absent (set TOKENTRAIN_DATA)")
    return data


@pytest.mark.slow
def test_real_scale_recipe_runs_on_local_files(shared, tmp_path, one_thread):
    train = load_rows(shared / "gsm8k", split="train").select(range(300))
    texts = [r["question"] + "\n" + r["answer"] for r in train] + ["Question:\nAnswer:\n####", "user assistant"]
    model = build_tiny(
        tmp_path / "tiny",
        texts,
        vocab_size=1000,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_positions=4096,
    )
    conversations = tmp_path / "aux.jsonl"  # CAFT's auxiliary-head rows: only the first user turn is read
    with open(conversations, "w") as f:
        for r in list(train)[:6]:
            turns = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": "(discarded)"}]
            f.write(json.dumps({"conversation": turns}) + "\n")
        f.write(json.dumps({"conversation": []}) + "\n")  # no user turn: skipped and counted

    run = tmp_path / "run"
    argv = ["run", str(ROOT / "recipes" / "concept_heads"), "--run_dir", str(run), "--data_dir", str(shared)]
    argv += ["--model", str(model), "--gsm8k", str(shared / "gsm8k"), "--math500", str(shared / "math500")]
    argv += ["--aux_prompts", str(conversations), "--bf16", "false", "--activation_checkpointing", "false"]
    argv += ["--dtype", "float32", "--max_steps", "2", "--save_steps", "1", "--max_new_tokens", "8"]
    argv += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_length", "256"]
    for stage in ("05_evaluate_gsm8k", "06_evaluate_math500", "07_evaluate_heads"):
        argv += [f"--{stage}.dataset_split", "test[:6]"]
    assert main(argv) == 0

    summary = json.loads((run / "samples" / "generate_summary.json").read_text())
    assert summary["rows"] == 6 and summary["skipped"]["no_user_turn"] == 1
    assert (run / "heads" / "heads" / "heads.safetensors").exists()
    for name in ("caft", "ntp"):  # LoRA adapters (CAFT's r 8) on the tiny base, no head weight
        config = json.loads((run / name / "adapter_config.json").read_text())
        assert config["r"] == 8 and config["base_model_name_or_path"] == str(model)
    gsm8k = json.loads((run / "eval_gsm8k" / "eval.json").read_text())
    assert set(gsm8k) == {"base", "ntp", "caft"} and all(0 <= r["accuracy"] <= 1 for r in gsm8k.values())
    assert set(json.loads((run / "eval_math500" / "eval.json").read_text())) == {"base", "ntp", "caft"}
    heads = json.loads((run / "eval_heads" / "eval.json").read_text())
    for r in heads.values():  # exact_match: false: per-head metrics only, on the merged adapters
        assert "exact_match" not in r and len(r["ce"]) == 5 and all(math.isfinite(c) for c in r["ce"])
    assert heads["base"]["count"] == heads["caft"]["count"]

    # the full fine-tuning variant, run after the main recipe into the same folder (it reads {run_dir}/heads)
    argv[1] = str(ROOT / "recipes" / "concept_heads" / "full")
    argv = [
        a.replace("05_evaluate_gsm8k", "03_evaluate_gsm8k").replace("07_evaluate_heads", "04_evaluate_heads")
        for a in argv
    ]
    drop = argv.index("--06_evaluate_math500.dataset_split")
    del argv[drop : drop + 2]
    assert main(argv) == 0
    for name in ("caft_full", "ntp_full"):  # vanilla models: no adapter, no head weight
        assert (run / name / "model.safetensors").exists() and not (run / name / "adapter_config.json").exists()
    assert set(json.loads((run / "eval_heads_full" / "eval.json").read_text())) == {"ntp_full", "caft_full"}


@pytest.mark.slow
def test_quickstart_concept_heads(tmp_path, capsys):
    """The README command: phases 0-2 and the evaluation on equations made in code (about 150 s on 2 loaded cores)."""
    assert main(["quickstart", "concept_heads", "--run_dir", str(tmp_path / "qs")]) == 0
    out = capsys.readouterr().out
    assert "quickstart concept_heads finished" in out and "| caft |" in out and "the paper's diagnostic" in out
    results = json.loads((tmp_path / "qs" / "eval" / "eval.json").read_text())
    assert set(results) == {"base", "ntp", "caft"}
    for r in results.values():
        assert r["rows"] == 400 and r["rows_seen"] == 200 and 0.0 <= r["exact_match"] <= 1.0
    assert results["base"]["exact_match"] == 0.0  # the base never saw `a+b=` followed by an answer and <eos>
    # the paper's diagnostic: the same frozen heads read the CAFT trunk better than the NTP trunk
    assert sum(results["caft"]["acc"][1:]) > sum(results["ntp"]["acc"][1:])


@pytest.mark.slow
def test_mini_recipe_runs_with_short_training(shared, tmp_path, capsys):
    """recipes/concept_heads/mini as shipped (3 seeds in 2 workers, the report and its plot), every training stage cut
    to 10 steps: the wiring, not the result (the full run: 30 minutes on the loaded 2-core machine, 9.3
    CPU-minutes; its table is in the README)."""
    run = tmp_path / "mini"
    argv = ["run", str(ROOT / "recipes" / "concept_heads" / "mini"), "--run_dir", str(run), "--data_dir", str(shared)]
    assert main([*argv, "--max_steps", "10", "--pretrain_windows", "320"]) == 0
    out = capsys.readouterr().out
    assert "| CAFT (beta 0.01, sine decay) |" in out and "paired by seed" in out
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["seeds"] == ["seed0", "seed1", "seed2"] and report["plot"] == "per_head_accuracy.png"
    assert (run / "report" / "per_head_accuracy.png").exists()
    for arm in report["arms"].values():
        assert len(arm["acc"]) == 5 and len(arm["exact_match"]["per_seed"]) == 3
