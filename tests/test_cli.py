"""CLI stages end to end on data made in code: atomic outputs, skip of finished stages, --overwrite, clear errors."""

import json

from tokentrain.cli import main


def test_prepare_stage_writes_atomically_and_skips_when_complete(tmp_path, capsys):
    out = tmp_path / "data"
    argv = ["prepare", "--task", "e2e_synthetic", "--num_rows", "120", "--vocab_size", "300", "--output_dir", str(out)]
    assert main(argv) == 0
    assert (out / "_COMPLETE").exists() and not (tmp_path / "data.tmp").exists()
    rows = [json.loads(line) for line in (out / "train.jsonl").open()]
    assert rows[0]["prompt"].startswith("<s>") and rows[0]["completion"].endswith("</s>")
    assert (out / "init" / "config.json").exists()

    marker = (out / "train.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0  # finished: skipped, untouched
    assert "is complete, skipped" in capsys.readouterr().err
    assert (out / "train.jsonl").stat().st_mtime_ns == marker

    assert main([*argv, "--overwrite"]) == 0  # redone on request
    assert (out / "train.jsonl").stat().st_mtime_ns != marker


def test_bad_key_is_an_error_exit_naming_it(tmp_path, capsys):
    assert main(["prepare", "--task", "e2e_synthetic", "--num_rowz", "5", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "num_rowz" in err and "num_rows" in err


def test_quickstart_weighted_ntp(tmp_path, capsys):
    """The README's first command: the whole pipeline on data made in code (about 100 s on 2 idle cores)."""
    assert main(["quickstart", "weighted_ntp", "--run_dir", str(tmp_path / "qs")]) == 0
    out = capsys.readouterr().out
    assert "quickstart weighted_ntp finished" in out and "| prior |" in out and "PRIOR mean weight" in out
    results = json.loads((tmp_path / "qs" / "eval" / "eval.json").read_text())
    assert set(results.pop("prior_diagnostic")) == {"value_first", "value_rest", "other", "eos"}
    assert set(results) == {"ntp", "prior", "rho1", "rm"}
    assert all(0.0 <= r["slot_acc"] <= 1.0 and r["heldout_nll"] > 0 for r in results.values())
