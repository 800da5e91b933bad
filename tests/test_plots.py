"""`tokentrain plot` and the report stage's results.csv and plots, from a small real run: an arith_chain base SFT with
accuracy checks, a grid of 2 seeds x 2 learning rates of DPO and critical_dpo on contrastively scored pairs, dev
evaluations, and an e2e evaluation with the PRIOR diagnostic. Every plot is checked to be a valid PNG whose metadata
names the expected titles and series, and the plotted numbers are checked against the run's own files."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from datasets import load_from_disk  # noqa: E402
from PIL import Image  # noqa: E402

from tokentrain import plots  # noqa: E402
from tokentrain.cli import main  # noqa: E402
from tokentrain.reports import results  # noqa: E402
from tokentrain.tasks.arithmetic import make_problems  # noqa: E402

TRAIN = """\
stage: train
objective: critical_dpo
model: "{top_dir}/base"
dataset: "{parent_dir}/pairs_scored"
reduction: sequence
beta: 1.0
learning_rate: "{lr}"
max_steps: 2
per_device_train_batch_size: 4
logging_steps: 1
save_strategy: "no"
max_length: 64
seed: "{seed}"
bf16: false
"""
RECIPE = {
    "00_prepare.yaml": "stage: prepare\ntask: arith_chain\noutput_dir: data\nseed: 0\n"
    "splits:\n  pool: [96, 0]\n  dev: [4, 777]\n",
    "01_sft_base.yaml": """\
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
stop_dataset: "{run_dir}/data/dev.jsonl"
stop_task: arithmetic
stop_accuracy: 0.99
stop_check_from: 2
stop_check_every: 2
stop_max_new_tokens: 8
""",
    "02_evaluate_base.yaml": """\
stage: evaluate
task: arithmetic
gold_column: gold
dataset: "{run_dir}/data/dev.jsonl"
models:
  base: "{run_dir}/base"
max_new_tokens: 8
heldout_nll: false
output_dir: eval_base
""",
    "03_seeds.yaml": "stage: grid\nrecipe: seed\nvariables:\n  seed: [0, 1]\noutput_dir: seeds\n",
    "seed/01_score.yaml": """\
stage: score
signal: contrastive
pos_model: "{top_dir}/base"
neg_model: "{top_dir}/data/init"
tokenizer: "{top_dir}/base"
dataset: "{top_dir}/pairs{seed}.jsonl"
output_dir: pairs_scored
""",
    "seed/02_lrs.yaml": "stage: grid\nrecipe: ../lr\nvariables:\n  lr: [1.0e-3, 3.0e-3]\noutput_dir: lrs\n",
    "lr/01_dpo.yaml": TRAIN + "weighting: none\noutput_dir: dpo\n",
    "lr/02_cdpo.yaml": TRAIN + "weighting: rejected\noutput_dir: cdpo\n",
    "lr/03_evaluate_dev.yaml": """\
stage: evaluate
task: arithmetic
gold_column: gold
dataset: "{top_dir}/data/dev.jsonl"
models:
  dpo: "{run_dir}/dpo"
  cdpo: "{run_dir}/cdpo"
max_new_tokens: 8
heldout_nll: false
output_dir: eval_dev
""",
    "04_prepare_e2e.yaml": "stage: prepare\ntask: e2e_synthetic\nnum_rows: 40\nseed: 0\noutput_dir: e2e\n",
    "05_score_prior.yaml": """\
stage: score
signal: ref_logps
model: "{run_dir}/e2e/init"
dataset: "{run_dir}/e2e/train.jsonl"
drop_prompt: true
output_dir: scored_prior
""",
    "06_evaluate_e2e.yaml": """\
stage: evaluate
task: e2e
dataset: "{run_dir}/e2e/test.jsonl"
models:
  init: "{run_dir}/e2e/init"
max_new_tokens: 12
prior_signals: "{run_dir}/scored_prior"
output_dir: eval_e2e
""",
    "07_report.yaml": 'stage: report\nreport: tiny\ninputs: "{run_dir}/seeds"\noutput_dir: report\n',
}


def _pairs(seed: int) -> list[dict]:
    """Preference rows: the correct chain and the same chain with one wrong digit (a line later for seed 1)."""
    rows = []
    for p in make_problems(8, 4242):
        lines = p["completion"].split("\n")
        k = min(seed + 1, len(lines) - 2)
        lines[k] = lines[k][:-1] + str((int(lines[k][-1]) + 1) % 10)
        rows.append({"prompt": p["prompt"], "chosen": p["completion"], "rejected": "\n".join(lines), "gold": p["gold"]})
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The small run, through the CLI; the report stage's builder is a stand-in (this run is not the mini's shape)."""
    import tokentrain.reports as reports

    root = tmp_path_factory.mktemp("plots")
    recipe, run = root / "tiny", root / "runs" / "tiny"
    for name, text in RECIPE.items():
        (recipe / name).parent.mkdir(parents=True, exist_ok=True)
        (recipe / name).write_text(text)
    run.mkdir(parents=True)
    for seed in (0, 1):
        (run / f"pairs{seed}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(seed)))
    real = reports.report
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reports, "report", lambda name: (lambda i, o: ({}, "table")) if name == "tiny" else real(name))
        assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    return run


def _png(path: Path) -> dict:
    with Image.open(path) as image:
        image.verify()  # a whole, valid PNG
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 400
        assert len(image.convert("RGB").getcolors(1 << 20)) > 50  # drawn, not blank
    return plots.png_description(path)


def _panels(description: dict) -> dict[str, dict]:
    return {p["title"]: p for p in description["panels"]}


# ------------------------------------------------------------------------------------------------------ the PNGs


def test_report_writes_every_plot_as_a_png_with_its_titles_and_series(run):
    out = run / "report" / "plots"
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        f"{name}.png"
        for name in (
            "accuracy_vs_lr",
            "preference_curves",
            "prior_weight_by_kind",
            "rejected_weight_histogram",
            "weight_by_position",
        )
    )
    trained = [
        f"seeds_seed{s}_lrs_lr{lr}_{m}.png" for s in (0, 1) for lr in ("0.001", "0.003") for m in ("cdpo", "dpo")
    ]
    assert sorted(p.name for p in (out / "train").glob("*.png")) == sorted(["base.png", *trained])

    base = _png(out / "train" / "base.png")
    assert base["title"] == "Training curves of base (sft, learning_rate 0.003)"
    panels = _panels(base)
    assert panels["loss"]["xlabel"] == "optimizer step" and panels["loss"]["ylabel"] == "loss (nats)"
    assert panels["accuracy checks on dev.jsonl"]["series"] == ["greedy accuracy", "stop at ≥ 0.99"]

    cdpo = _panels(_png(out / "train" / "seeds_seed1_lrs_lr0.003_cdpo.png"))
    assert cdpo["rewards"]["series"] == ["chosen", "rejected", "margins"]
    assert cdpo["logps"]["series"] == ["chosen", "rejected"]
    assert "critical_dpo/rejected_weight_mean" in cdpo

    accuracy = _png(out / "accuracy_vs_lr.png")
    assert accuracy["title"] == "Accuracy against learning rate (mean ± sd over 2 seeds)"
    (dev,) = accuracy["panels"]
    assert dev["title"] == "eval_dev: dev.jsonl, 4 rows" and dev["ylabel"] == "greedy accuracy (%)"
    assert dev["xlabel"] == "learning rate (lr, log scale)"
    assert sorted(dev["series"]) == ["base (eval_base, outside the grid)", "cdpo", "dpo"]

    preference = _png(out / "preference_curves.png")
    assert preference["title"] == "Preference training: reward margin and log-probs per method (mean ± sd over 2 seeds)"
    assert [p["title"] for p in preference["panels"]] == [
        f"{what} · lr {lr}"
        for lr in ("0.001", "0.003")
        for what in ("reward margin", "chosen log-prob", "rejected log-prob")
    ]
    assert all(sorted(p["series"]) == ["cdpo", "dpo"] for p in preference["panels"])

    (histogram,) = _png(out / "rejected_weight_histogram.png")["panels"]
    assert [s.split(":")[0] for s in histogram["series"]] == ["seed 0", "seed 1"]
    assert histogram["xlabel"] == "weight" and histogram["ylabel"] == "tokens (log scale)"

    (position,) = _png(out / "weight_by_position.png")["panels"]
    assert sorted(position["series"]) == ["first divergent token", "mean ± sd over 2 scored sets (seeds)"]

    prior = _png(out / "prior_weight_by_kind.png")
    assert prior["title"] == "PRIOR weight by token kind (normalised to mean 1 per row)"
    assert prior["panels"][0]["series"] == ["1 = plain SFT (the mean)", "mean weight"]


# ------------------------------------------------------------------------------------------------------ the data


def _eval(run: Path, rel: str) -> dict:
    return json.loads((run / rel / "eval.json").read_text())


def test_accuracy_against_learning_rate_is_the_mean_and_sd_over_seeds(run):
    fig = plots.accuracy_vs_lr(results.stage_outputs(run))
    (ax,) = fig.axes
    curves = {c.get_label(): c for c in ax.containers}
    for model in ("dpo", "cdpo"):
        values = {
            lr: [100 * _eval(run, f"seeds/seed{s}/lrs/lr{lr}/eval_dev")[model]["accuracy"] for s in (0, 1)]
            for lr in ("0.001", "0.003")
        }
        line, _, (bars,) = curves[model]
        assert list(line.get_xdata()) == [0.001, 0.003]
        assert list(line.get_ydata()) == pytest.approx([statistics.mean(v) for v in values.values()])
        spans = [seg[1][1] - seg[0][1] for seg in bars.get_segments()]  # error bar: mean - sd to mean + sd
        assert spans == pytest.approx([2 * statistics.stdev(v) for v in values.values()])
    (base,) = [line for line in ax.lines if line.get_label().startswith("base")]
    assert base.get_ydata()[0] == pytest.approx(100 * _eval(run, "eval_base")["base"]["accuracy"])


def test_weight_plots_match_the_scored_pairs(run):
    outputs = results.stage_outputs(run)
    at_divergence, tokens = [], 0
    for seed in (0, 1):
        data = load_from_disk(str(run / "seeds" / f"seed{seed}" / "pairs_scored"))
        first = []
        for chosen, rejected, weights in zip(data["chosen_ids"], data["rejected_ids"], data["rejected_weights"]):
            k = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b)
            first.append(weights[k])
            tokens += len(weights) - 1  # the end token (weight 1 by rule) is left out
        at_divergence.append(statistics.mean(first))
    (ax,) = plots.weight_by_position(outputs).axes
    (curve,) = ax.containers
    x, y = curve.lines[0].get_xdata(), curve.lines[0].get_ydata()
    assert y[list(x).index(0)] == pytest.approx(statistics.mean(at_divergence))
    (ax,) = plots.rejected_weight_histogram(outputs).axes
    assert sum(sum(p.get_data().values) for p in ax.patches) == tokens


def test_training_curves_and_prior_bars_plot_the_logged_numbers(run):
    outputs = {o.rel: o for o in results.stage_outputs(run)}
    fig = plots.training_curves(outputs["seeds/seed0/lrs/lr0.001/cdpo"])
    summary = json.loads((run / "seeds/seed0/lrs/lr0.001/cdpo/train_summary.json").read_text())
    logged = [e for e in summary["log_history"] if "loss" in e]
    (loss,) = next(ax for ax in fig.axes if ax.get_title() == "loss").lines
    assert list(loss.get_xdata()) == [e["step"] for e in logged]
    assert list(loss.get_ydata()) == pytest.approx([e["loss"] for e in logged])
    (ax,) = plots.prior_weight_by_kind(list(outputs.values())).axes
    diagnostic = _eval(run, "eval_e2e")["prior_diagnostic"]
    heights = [b.get_height() for b in ax.patches]
    assert heights == pytest.approx([diagnostic[k] for k in ("value_first", "value_rest", "other", "eos")])


# ------------------------------------------------------------------------------------------------------ results.csv


def test_results_csv_is_tidy_and_holds_every_number(run):
    import pandas as pd

    table = pd.read_csv(run / "report" / "results.csv")
    assert list(table.columns) == ["run", "model", "stage", "source", "seed", "lr", "metric", "value"]
    assert not table.duplicated(["run", "stage", "metric"]).any()  # one row per run and metric
    dev = table[(table.metric == "accuracy") & table.stage.str.endswith("eval_dev")]
    assert len(dev) == 2 * 2 * 2  # seeds x rates x models
    for row in dev.itertuples():
        lr = f"{row.lr:g}"  # the grid's folder name: lr0.001
        expected = _eval(run, f"seeds/seed{int(row.seed)}/lrs/lr{lr}/eval_dev")[row.model]["accuracy"]
        assert row.value == pytest.approx(expected)
        assert row.run == f"seeds/seed{int(row.seed)}/lrs/lr{lr}/{row.model}"  # the evaluated model's folder
    trained = table[(table.source == "train") & (table.metric == "train_loss")]
    assert len(trained) == 1 + 2 * 2 * 2  # the base and every grid run
    assert set(table.source) == {"evaluate", "train", "score"}
    weights = table[(table.metric == "rejected_weight_mean")].sort_values("seed")
    assert list(weights.seed) == [0, 1] and all(0 < v < 1 for v in weights.value)
    prior = table[table.metric.str.startswith("prior_diagnostic/")]
    kinds = ("value_first", "value_rest", "other", "eos")
    assert sorted(prior.metric) == sorted(f"prior_diagnostic/{k}" for k in kinds)
    assert set(prior.run) == {"eval_e2e"} and prior.model.isna().all()  # the stage's own numbers, no model
    summary = table.pivot_table(index="model", columns="lr", values="value", aggfunc="mean")  # pandas works on it
    assert summary.shape[0] >= 2


# ------------------------------------------------------------------------------------------------------ tokentrain plot


def test_plot_command_writes_the_pngs_of_a_folder(run, tmp_path, capsys):
    assert main(["plot", str(run / "base"), "--out", str(tmp_path / "p")]) == 0
    assert [p.relative_to(tmp_path / "p").as_posix() for p in (tmp_path / "p").rglob("*.png")] == ["train/base.png"]
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "nothing to plot" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_plot_help_imports_neither_matplotlib_nor_torch():
    code = (
        "import sys\nfrom tokentrain.cli import main\ntry:\n    main(['plot', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'matplotlib', 'datasets') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


def test_without_matplotlib_the_plots_say_how_to_install_it(run, tmp_path, monkeypatch):
    def missing():
        raise plots.MissingMatplotlib("plots need matplotlib: pip install 'tokentrain[plot]'")

    monkeypatch.setattr(plots, "_matplotlib", missing)
    with pytest.raises(ImportError, match=r"pip install 'tokentrain\[plot\]'"):
        plots.plot_run(run / "base", tmp_path)
    assert results.results_table(run)  # results.csv needs no matplotlib


def test_results_table_reads_evaluations_that_nest_their_models(tmp_path):
    """Some evaluate variants write {"models": {...}, "task": ..., "prompts": n}; nested metrics become a/b names."""
    out = tmp_path / "run" / "eval"
    out.mkdir(parents=True)
    (out / "stage.json").write_text(json.dumps({"config": {"stage": "evaluate", "models": {"m": "elsewhere/m"}}}))
    (out / "_COMPLETE").write_text("complete\n")
    evaluation = {"models": {"m": {"win_rate": 0.25, "kl": {"mean": 1.5}, "rows": [1, 2]}}, "task": "kw", "prompts": 8}
    (out / "eval.json").write_text(json.dumps(evaluation))
    rows = results.results_table(tmp_path / "run")
    assert [(r["run"], r["model"], r["metric"], r["value"]) for r in rows] == [
        ("elsewhere/m", "m", "win_rate", 0.25),
        ("elsewhere/m", "m", "kl/mean", 1.5),
        ("eval", "", "prompts", 8.0),
    ]
