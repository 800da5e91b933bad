"""The real-scale recipe `recipes/critical_dpo/gsm8k_solutions/` end to end on local files: the hub model replaced by a
tiny Llama whose tokenizer is trained in code on GSM8K text, the hub dataset by the shared folder's copy (through the
recipe's {model} and {gsm8k} variables), every stage file as shipped apart from size overrides. Skipped with a reason
when ../shared/data is absent (a fresh clone)."""

from __future__ import annotations

import json
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
    if not (data / "gsm8k" / "example_model_solutions.jsonl.gz").exists():
        pytest.skip(f"{data}/gsm8k not found: the shared data folder is absent (set TOKENTRAIN_DATA to its path)")
    return data


def test_gsm8k_solutions_recipe_runs_on_local_files(shared, tmp_path, capsys, one_thread):
    train = load_rows(shared / "gsm8k", split="train").select(range(300))
    texts = [r["question"] + "\n" + r["answer"] for r in train] + ["Question:\nAnswer:\n####"]
    model = build_tiny(
        tmp_path / "tiny",
        texts,
        vocab_size=1000,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_positions=2048,
    )
    run = tmp_path / "run"
    argv = ["run", str(ROOT / "recipes" / "critical_dpo" / "gsm8k_solutions"), "--run_dir", str(run)]
    argv += ["--data_dir", str(shared), "--model", str(model), "--gsm8k", str(shared / "gsm8k")]
    argv += ["--bf16", "false", "--gradient_checkpointing", "false", "--dtype", "float32"]
    argv += ["--max_steps", "2", "--eval_steps", "1", "--save_steps", "1", "--max_new_tokens", "8"]
    assert main(argv) == 0

    summary = json.loads((run / "samples" / "generate_summary.json").read_text())
    assert (summary["pos_sft_rows"], summary["neg_sft_rows"], summary["pairs_rows"]) == (666, 869, 545)  # spec D
    for side in ("pos", "neg"):  # LoRA adapters on the tiny base, best of the held-out evals kept
        assert (run / side / "adapter_config.json").exists()
        assert "best_metric" in json.loads((run / side / "train_summary.json").read_text())
    meta = json.loads((run / "pairs_scored" / "signal_meta.json").read_text())
    assert meta["signal"] == "contrastive" and meta["rows"] + meta["dropped_rows"] == 545
    for name in ("critical_dpo", "dpo", "rpo"):
        assert (run / name / "adapter_config.json").exists()
    results = json.loads((run / "eval_gsm8k_heldout" / "eval.json").read_text())
    assert set(results) == {"base", "sft", "dpo", "rpo", "critical_dpo"}
    for r in results.values():
        assert r["correct"] + r["wrong"] + r["unparsable"] == 329  # the held-out GSM8K test rows only


def test_old_checkpointing_name_on_the_command_line_wins_over_the_file(tmp_path):
    """`--gradient_checkpointing false` (TRL's name) on a recipe whose file says activation_checkpointing: true is
    the user's choice, not a conflict (it was refused as 'the same setting; give one')."""
    from tokentrain.config import load_stage
    from tokentrain.stages.train import _trainer_kwargs

    path = tmp_path / "01_sft.yaml"
    path.write_text("stage: sft\nmodel: m\ndataset: d\nactivation_checkpointing: true\n")
    stage = load_stage(path, {"gradient_checkpointing": "false"}, {"run_dir": str(tmp_path)})
    assert _trainer_kwargs(stage)["activation_checkpointing"] is False
    both = tmp_path / "02_sft.yaml"
    both.write_text("stage: sft\nmodel: m\ndataset: d\nactivation_checkpointing: true\ngradient_checkpointing: false\n")
    with pytest.raises(Exception, match="same setting"):
        _trainer_kwargs(load_stage(both, {}, {"run_dir": str(tmp_path)}))
