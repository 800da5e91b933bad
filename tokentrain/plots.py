"""PNG plots and tidy results of a run folder: `tokentrain plot RUN_DIR`, and what a `report` stage writes.

A run folder is what `tokentrain run` writes: one folder per stage output (stage.json and _COMPLETE inside), a grid
holding one folder per combination of its variables (`seed0/`, `lr3e-05/`). `stage_outputs` walks it and gives every
output the grid variables it was run with; each plot picks the outputs it needs, so `plot_run` draws whatever the
folder holds:

- `training_curves`, one per training stage (train_summary.json): the loss and every other logged metric against the
  optimizer step (eval metrics beside their train counterparts), and an early-stopped SFT's greedy accuracy checks;
- `accuracy_vs_lr`: per evaluation set of a learning-rate grid, each model's accuracy against the learning rate, mean
  ± sd over the seeds (error bars); models evaluated on the same rows outside the grid as horizontal lines;
- `preference_curves`: reward margin and chosen / rejected log-probs against the step, per preference method, mean
  ± sd over the seeds (bands), one row per learning rate;
- `rejected_weight_histogram`, `weight_by_position` (critical_dpo's contrastive scores): the histogram of the
  `rejected_weights` per seed, and their mean by position relative to the first token where the rejected response
  departs from the chosen one, mean ± sd over the seeds;
- `prior_weight_by_kind`: PRIOR's mean normalised weight by token kind (an e2e evaluate with `prior_signals`).

Each PNG carries its title and, per panel, the title, axis labels and series labels in its text metadata
(`Description`, JSON): a test or a script can check what a plot shows without reading pixels.

The walk and the tidy results.csv of the same numbers live in tokentrain/reports/results.py.

matplotlib is an optional dependency (`pip install 'tokentrain[plot]'`); it is imported only when a plot is drawn,
through its object-oriented API (no pyplot, no global backend).
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from .reports.results import (
    TRAIN_SUMMARY,
    StageOutput,
    _evaluated,
    _is_number,
    _num,
    _read_json,
    stage_outputs,
)

LR_VARIABLES = ("lr", "learning_rate")  # the grid variable a learning-rate sweep is named by
# logged keys that are counters or run totals, not curves
NOT_CURVES = {"epoch", "step", "num_tokens", "num_input_tokens_seen", "train_runtime"}
PAIRED = ("chosen", "rejected", "margins")  # TRL's preference metrics: one panel per prefix, one line per side
PAIRED_PREFIXES = ("rewards", "logps", "logits")
PREFERENCE_KEYS = {
    "rewards/margins": ("reward margin", "β·(log-ratio chosen − rejected) (nats)"),
    "logps/chosen": ("chosen log-prob", "log-prob per sequence (nats)"),
    "logps/rejected": ("rejected log-prob", "log-prob per sequence (nats)"),
}
UNITS = {
    "loss": "loss (nats)",
    "grad_norm": "gradient norm (L2)",
    "train_tokens_per_second": "tokens per second",
    "learning_rate": "learning rate",
    "entropy": "entropy (nats per token)",
    "mean_token_accuracy": "token accuracy (fraction)",
    "rewards/accuracies": "pairs with chosen > rejected (fraction)",
    "rewards": "β·log-ratio to the reference (nats)",
    "logps": "log-prob per sequence (nats)",
    "logits": "mean logit",
    "critical_dpo/weighted_margin": "weighted β·log-ratio margin (nats)",
    "critical_dpo/rejected_weight_mean": "mean weight on rejected tokens",
    "weighted_ntp/ref_nll": "reference NLL (nats per token)",
    "weighted_ntp/weight_max": "largest token weight",
    "weighted_ntp/selected_frac": "tokens trained on (fraction)",
    "weighted_ntp/excess_mean": "excess loss (nats per token)",
}
PRIOR_KINDS = {
    "value_first": "first token\nof a value",
    "value_rest": "other tokens\nof a value",
    "other": "all other\ntokens",
    "eos": "end token\n</s>",
}
POSITIONS = 8  # weight_by_position: tokens shown on each side of the first divergent one


class MissingMatplotlib(ImportError):
    """matplotlib is not installed."""


# ------------------------------------------------------------------------------------------------------------ plots


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw every plot the run folder's outputs allow into `out_dir` (default `<run_dir>/plots`); the PNGs written.

    Training curves go to `train/<output folder>.png`, the others to `<plot name>.png`. A folder with nothing to plot
    is a FileNotFoundError naming what is looked for."""
    outputs = stage_outputs(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    figures = []
    for o in outputs:
        if (o.path / TRAIN_SUMMARY).is_file():
            figures.append((f"train/{(o.rel if o.rel != '.' else o.name).replace('/', '_')}.png", training_curves(o)))
    for plot in (
        accuracy_vs_lr,
        preference_curves,
        rejected_weight_histogram,
        weight_by_position,
        prior_weight_by_kind,
    ):
        fig = plot(outputs)
        if fig is not None:
            figures.append((f"{plot.__name__}.png", fig))
    if not figures:
        raise FileNotFoundError(
            f"{run_dir}: nothing to plot (no finished stage output with train_summary.json, eval.json or scored pairs)"
        )
    return [save_png(fig, out_dir / name) for name, fig in figures]


def training_curves(output: StageOutput):
    """The loss and every logged metric of one training stage against the step; greedy accuracy checks if any."""
    summary = output.json(TRAIN_SUMMARY) or {}
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}  # panel -> series label -> points
    for entry in summary.get("log_history", []):
        if "train_loss" in entry:  # the run's closing summary, not a point of a curve
            continue
        for key, value in entry.items():
            if key in NOT_CURVES or not _is_number(value):
                continue
            panel, series = (key[5:], "eval") if key.startswith("eval_") else (key, "train")
            prefix, _, side = panel.rpartition("/")
            if side in PAIRED and prefix in PAIRED_PREFIXES:  # TRL's chosen / rejected metrics share a panel
                panel, series = prefix, side if series == "train" else f"{series} {side}"
            panels.setdefault(panel, {}).setdefault(series, []).append((entry["step"], float(value)))
    order = sorted(panels, key=lambda p: p != "loss")  # loss first, then as logged
    checks = summary.get("accuracy_checks") or []
    fig, axes = _figure(len(order) + bool(checks), fixed=True)
    cfg = output.config
    what = [str(cfg.get("objective") or cfg.get("stage"))]
    what += [f"{k} {_num(cfg[k])}" for k in ("weighting", "reduction", "beta", "learning_rate") if k in cfg]
    fig.suptitle(f"Training curves of {output.rel} ({', '.join(what)})")
    for ax, panel in zip(axes, order):
        for series, points in panels[panel].items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(points) < 30 else None, label=series)
        _labels(ax, panel, "optimizer step", _unit(panel))
    if checks:
        ax = axes[len(order)]
        ax.plot([c["step"] for c in checks], [c["accuracy"] for c in checks], marker="o", label="greedy accuracy")
        if cfg.get("stop_accuracy"):
            ax.axhline(cfg["stop_accuracy"], color="grey", ls="--", label=f"stop at ≥ {cfg['stop_accuracy']:g}")
        where = Path(str(cfg.get("stop_dataset", ""))).name
        _labels(ax, f"accuracy checks on {where}", "optimizer step", "greedy accuracy (fraction)")
    return fig


def accuracy_vs_lr(outputs: list[StageOutput]):
    """Per evaluation set of a learning-rate grid: accuracy (%) against the learning rate per model, mean ± sd over
    the other grid variables (seeds); models evaluated on the same rows outside the grid as horizontal lines."""
    evals = [o for o in outputs if o.kind == "evaluate" and o.json("eval.json")]
    lr_var = next((v for v in LR_VARIABLES if any(v in o.variables for o in evals)), None)
    if lr_var is None:
        return None
    panels: dict[str, list[StageOutput]] = {}
    for o in evals:
        if lr_var in o.variables:
            panels.setdefault(o.name, []).append(o)
    fig, axes = _figure(len(panels), ncols=2, size=(7.4, 4.4))
    colours, seeds = _colours(outputs), 1
    for ax, (name, group) in zip(axes, panels.items()):
        curves: dict[str, dict[float, list[float]]] = {}
        for o in group:
            for model, metrics in _model_results(o):
                curves.setdefault(model, {}).setdefault(float(o.variables[lr_var]), []).append(100 * metrics)
        for model, by_lr in curves.items():
            lrs = sorted(by_lr)
            means = [statistics.mean(by_lr[lr]) for lr in lrs]
            sds = [_sd(by_lr[lr]) for lr in lrs]
            seeds = max(seeds, *(len(v) for v in by_lr.values()))
            ax.errorbar(lrs, means, yerr=sds, marker="o", capsize=4, color=colours.get(model), label=model)
        dataset = group[0].config.get("dataset")
        refs: dict[tuple[str, str], list[float]] = {}  # models evaluated on these rows outside the grid
        for ref in (o for o in evals if lr_var not in o.variables and o.config.get("dataset") == dataset):
            for model, value in _model_results(ref):
                refs.setdefault((model, ref.name), []).append(100 * value)
        for (model, where), values in refs.items():
            mean, spread = statistics.mean(values), f" ± sd over {len(values)}" if len(values) > 1 else ""
            label = f"{model} ({where}, outside the grid{spread})"
            ax.axhline(mean, color=colours.get(model), ls="--", label=label)
            if len(values) > 1:
                ax.axhspan(mean - _sd(values), mean + _sd(values), color=colours.get(model), alpha=0.12)
        all_lrs = sorted({lr for by_lr in curves.values() for lr in by_lr})
        ax.set_xscale("log")
        ax.set_xticks(all_lrs, [f"{lr:g}" for lr in all_lrs])
        ax.minorticks_off()
        rows = _rows_evaluated(group[0])
        where = f"{Path(str(dataset)).name}" + (f", {rows} rows" if rows else "")
        _labels(ax, f"{name}: {where}", f"learning rate ({lr_var}, log scale)", "greedy accuracy (%)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)  # beside, not over
    fig.suptitle(
        f"Accuracy against learning rate (mean ± sd over {seeds} seeds)"
        if seeds > 1
        else "Accuracy against learning rate (one seed)"
    )
    return fig


def preference_curves(outputs: list[StageOutput]):
    """Reward margin and chosen / rejected log-probs against the step per preference method, mean ± sd over seeds,
    one row per learning rate of the grid."""
    runs = []
    for o in outputs:
        history = (o.json(TRAIN_SUMMARY) or {}).get("log_history", []) if (o.path / TRAIN_SUMMARY).is_file() else []
        if any("rewards/margins" in e for e in history):
            runs.append((o, [e for e in history if "train_loss" not in e]))
    if not runs:
        return None
    lr_var = next((v for v in LR_VARIABLES if any(v in o.variables for o, _ in runs)), None)
    lrs = sorted({float(o.variables[lr_var]) for o, _ in runs if lr_var in o.variables}) if lr_var else []
    rows = lrs or [None]
    fig, axes = _figure(len(rows) * len(PREFERENCE_KEYS), ncols=len(PREFERENCE_KEYS), size=(5.2, 3.6))
    colours, seeds = _colours(outputs), 1
    for r, lr in enumerate(rows):
        for c, (key, (title, unit)) in enumerate(PREFERENCE_KEYS.items()):
            ax = axes[r * len(PREFERENCE_KEYS) + c]
            methods: dict[str, list[dict[int, float]]] = {}
            for o, history in runs:
                if lr is not None and float(o.variables.get(lr_var, math.nan)) != lr:
                    continue
                methods.setdefault(o.name, []).append({e["step"]: e[key] for e in history if key in e})
            for method, curves in sorted(methods.items(), key=lambda m: list(colours).index(m[0])):
                steps = sorted(set.intersection(*(set(c) for c in curves)))  # steps every seed logged
                mean = [statistics.mean(c[s] for c in curves) for s in steps]
                sd = [_sd([c[s] for c in curves]) for s in steps]
                seeds = max(seeds, len(curves))
                line = ax.plot(steps, mean, color=colours[method], label=method)[0]
                ax.fill_between(
                    steps,
                    [m - d for m, d in zip(mean, sd)],
                    [m + d for m, d in zip(mean, sd)],
                    color=line.get_color(),
                    alpha=0.2,
                    linewidth=0,
                )
            _labels(ax, title + (f" · lr {lr:g}" if lr is not None else ""), "optimizer step", unit)
    spread = f"mean ± sd over {seeds} seeds" if seeds > 1 else "one seed"
    fig.suptitle(f"Preference training: reward margin and log-probs per method ({spread})")
    return fig


def rejected_weight_histogram(outputs: list[StageOutput]):
    """Histogram of the contrastive weights on rejected tokens, one step line per scored set (seed)."""
    scored = _scored_pairs(outputs)
    if not scored:
        return None
    import numpy as np

    fig, (ax,) = _figure(1, ncols=1, size=(7.5, 4.6))
    edges = np.linspace(0.0, 1.0, 21)
    for o, rows in scored:
        weights = [w for row in rows for _, w in row["tokens"]]
        counts, _ = np.histogram(np.clip(weights, 0.0, 1.0), bins=edges)
        ax.stairs(counts, edges, label=f"{o.label()}: mean {statistics.mean(weights):.3f}, {len(weights):,} tokens")
    ax.set_yscale("log")
    _labels(ax, "rejected_weights = 1 − s_t (end token excluded: weight 1 by rule)", "weight", "tokens (log scale)")
    fig.suptitle("Contrastive weights on the rejected responses' tokens")
    return fig


def weight_by_position(outputs: list[StageOutput]):
    """Mean rejected weight by position relative to the first divergent token, mean ± sd over scored sets."""
    scored = _scored_pairs(outputs)
    if not scored:
        return None
    per_set = []  # per scored set: position -> mean weight
    for _, rows in scored:
        at: dict[int, list[float]] = {}
        for row in rows:
            if row["diverge"] is None:
                continue
            for t, w in row["tokens"]:
                if abs(t - row["diverge"]) <= POSITIONS:
                    at.setdefault(t - row["diverge"], []).append(w)
        per_set.append({p: statistics.mean(ws) for p, ws in at.items()})
    positions = sorted(set.intersection(*(set(s) for s in per_set)))
    means = [statistics.mean(s[p] for s in per_set) for p in positions]
    sds = [_sd([s[p] for s in per_set]) for p in positions]
    fig, (ax,) = _figure(1, ncols=1, size=(7.5, 4.6))
    spread = f"mean ± sd over {len(per_set)} scored sets (seeds)" if len(per_set) > 1 else "one scored set"
    ax.errorbar(positions, means, yerr=sds if len(per_set) > 1 else None, marker="o", capsize=4, label=spread)
    ax.axvline(0, color="grey", ls="--", label="first divergent token")
    if 0 in positions:
        ax.annotate(
            f"{means[positions.index(0)]:.2f}",
            (0, means[positions.index(0)]),
            textcoords="offset points",
            xytext=(8, 0),
            va="center",
        )
    ax.set_ylim(0, 1.05)
    _labels(
        ax,
        "rejected_weights (end token excluded)",
        "position relative to the first divergent token (tokens)",
        "mean weight 1 − s_t",
    )
    fig.suptitle("Rejected-token weight by position relative to where the responses part")
    return fig


def prior_weight_by_kind(outputs: list[StageOutput]):
    """PRIOR's mean normalised weight by token kind (eval.json `prior_diagnostic`), mean ± sd over evaluations."""
    found = [(o, o.json("eval.json")) for o in outputs if o.kind == "evaluate"]
    found = [(o, d["prior_diagnostic"]) for o, d in found if isinstance(d, dict) and d.get("prior_diagnostic")]
    if not found:
        return None
    kinds = [k for k in PRIOR_KINDS if any(k in d for _, d in found)]
    values = [[d[k] for _, d in found if k in d and _is_number(d[k])] for k in kinds]
    means = [statistics.mean(v) for v in values]
    fig, (ax,) = _figure(1, ncols=1, size=(7.0, 4.6))
    bars = ax.bar(
        [PRIOR_KINDS[k] for k in kinds],
        means,
        yerr=[_sd(v) for v in values] if len(found) > 1 else None,
        capsize=4,
        color="C3",
        label="mean weight" + (f" ± sd over {len(found)} evaluations" if len(found) > 1 else ""),
    )
    ax.bar_label(bars, fmt="%.3f", padding=3)
    ax.axhline(1.0, color="grey", ls="--", label="1 = plain SFT (the mean)")
    _labels(ax, f"from {', '.join(o.rel for o, _ in found)}", "token kind", "mean normalised weight w̃")
    ax.set_ylim(0, max(means) * 1.25)
    fig.suptitle("PRIOR weight by token kind (normalised to mean 1 per row)")
    return fig


def save_png(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG (atomically) with its title and panels (titles, axis labels, series) in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    described = {"title": fig.get_suptitle(), "panels": [_describe(ax) for ax in fig.axes if ax.get_visible()]}
    metadata = {"Title": described["title"], "Description": json.dumps(described), "Software": "tokentrain"}
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, metadata=metadata)
    os.replace(tmp, path)
    return path


def png_description(path: str | Path) -> dict[str, Any]:
    """What `save_png` wrote into a PNG's metadata: {title, panels: [{title, xlabel, ylabel, series}]}."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text["Description"])


# -------------------------------------------------------------------------------------------------- tidy results


# ---------------------------------------------------------------------------------------------------------- pieces


def _matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingMatplotlib("plots need matplotlib: pip install 'tokentrain[plot]'") from None
    return Figure


def _figure(panels: int, ncols: int = 4, size: tuple[float, float] = (4.4, 3.3), fixed: bool = False):
    """A figure with `panels` axes in rows of `ncols` (the unused ones removed), each about `size` inches. `fixed`
    spaces them by fixed margins instead of matplotlib's constrained layout, which costs half the drawing time (the
    training curves: one figure per training stage)."""
    Figure = _matplotlib()
    ncols = max(1, min(ncols, panels))
    nrows = max(1, math.ceil(panels / ncols))
    width, height = size[0] * ncols, size[1] * nrows + 0.5
    fig = Figure(figsize=(width, height), layout=None if fixed else "constrained")
    if fixed:  # margins in inches: room for tick labels and an axis label left, a title above each panel
        fig.subplots_adjust(
            left=0.95 / width,
            right=1 - 0.2 / width,
            bottom=0.55 / height,
            top=1 - 0.8 / height,
            wspace=0.42,
            hspace=0.5,
        )
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[panels:]:
        fig.delaxes(ax)
    return fig, axes[:panels]


def _labels(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[1]) > 1 or ax.get_legend_handles_labels()[1][:1] not in ([], ["train"]):
        ax.legend(fontsize=8)  # a lone training curve is named by the panel's title


def _describe(ax) -> dict[str, Any]:
    return {
        "title": ax.get_title(),
        "xlabel": ax.get_xlabel(),
        "ylabel": ax.get_ylabel(),
        "series": ax.get_legend_handles_labels()[1],
    }


def _unit(key: str) -> str:
    return UNITS.get(key, key)


def _colours(outputs: list[StageOutput]) -> dict[str, str]:
    """One colour per model or method name across every plot of a run: the evaluated models in the order their
    evaluate stages list them, then the other training outputs."""
    names = [m for o in outputs if o.kind == "evaluate" for m in (o.config.get("models") or {})]
    names += [o.name for o in outputs if (o.path / TRAIN_SUMMARY).is_file()]
    return {name: f"C{k % 10}" for k, name in enumerate(dict.fromkeys(names))}


def _model_results(output: StageOutput) -> list[tuple[str, float]]:
    """(model, accuracy) of an evaluate output: `accuracy` for graded tasks, `slot_acc` for e2e."""
    out = []
    for model, metrics in _evaluated(output).items():
        value = metrics.get("accuracy", metrics.get("slot_acc"))
        if _is_number(value):
            out.append((model, float(value)))
    return out


def _rows_evaluated(output: StageOutput) -> int | None:
    for metrics in _evaluated(output).values():
        if "correct" in metrics:
            return sum(int(metrics.get(k, 0)) for k in ("correct", "wrong", "unparsable"))
    return None


def _scored_pairs(outputs: list[StageOutput]) -> list[tuple[StageOutput, list[dict[str, Any]]]]:
    """Per contrastive score output: per row, the first divergent position and the (position, weight) of every
    rejected token but the end token (its weight is 1 by the contrastive EOS rule)."""
    found = [o for o in outputs if o.kind == "score" and o.config.get("signal") == "contrastive"]
    result = []
    for o in found:
        rows = _read_pairs(str(o.path), (o.json("stage.json") or {}).get("run_id"))
        if rows is not None:
            result.append((o, rows))
    return result


@functools.lru_cache(maxsize=16)
def _read_pairs(path: str, run_id: str | None) -> list[dict[str, Any]] | None:
    """`_scored_pairs` of one output, read once per run_id (the histogram and the position plot share it)."""
    from datasets import load_from_disk

    from .heatmap import _first_difference
    from .models import load_tokenizer

    data = load_from_disk(path)
    if "rejected_weights" not in data.column_names:
        return None
    meta = _read_json(Path(path) / "signal_meta.json") or {}
    eos = load_tokenizer(meta["tokenizer"]).eos_token_id if meta.get("tokenizer") else None
    rows = []
    for chosen, rejected, weights in zip(data["chosen_ids"], data["rejected_ids"], data["rejected_weights"]):
        end = len(rejected) - 1 if rejected and rejected[-1] == eos else len(rejected)
        rows.append(
            {
                "diverge": _first_difference(list(chosen), list(rejected)),
                "tokens": [(t, float(w)) for t, w in enumerate(weights[:end])],
            }
        )
    return rows


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0
