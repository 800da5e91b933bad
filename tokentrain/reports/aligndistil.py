"""`report: aligndistil_mini` (spec aligndistil section 7): the nine-row table over seeds and the convergence plot.

Reads `<inputs>/seed<s>/<options.eval or "eval">/eval.json` (an `evaluate` stage with `task: keyword_length`) for every
seed folder: per model the true reward, keyword rate, length, win rate against DPO, KL(π‖π_dpo), the mean α_t of
training and the held-out reward curve its training stage logged; and the mean α_t by the token a position predicts.
Writes, besides report.json and report.md, `convergence.png` (reward against optimizer step, mean over seeds with a
± 1 sd band) when matplotlib is installed (`pip install tokentrain[plot]`).
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROWS = {
    "sft": "(1) SFT",
    "dpo": "(2) DPO, lr 1e-4 (the teacher)",
    "dpo_lr3e-4": "(3) DPO at the student's lr 3e-4 (control)",
    "const1": "(4) AlignDistil, constant ratio 1",
    "const2": "(5) AlignDistil, constant ratio 2",
    "adaptive_r5": "(6) AlignDistil, adaptive r 5",
    "adaptive_r20": "(7) AlignDistil, adaptive r 20",
    "dpo_ref2": "(8) Theorem-1 teacher (dpo_ref), ratio 2",
    "on_policy": "(9) AlignDistil, adaptive r 20, on-policy",
}
METRICS = {  # key in eval.json -> (column, scale, decimals)
    "reward": ("true reward", 1, 3),
    "keyword_rate": ("keyword %", 100, 1),
    "length": ("length (words)", 1, 2),
    "win_rate": ("win % vs DPO", 100, 1),
    "kl_to_kl_model": ("KL(π‖π_dpo)", 1, 3),
    "alpha_mean": ("mean α_t", 1, 3),
}
CURVE_STEPS = (10, 20, 60)  # R@k columns


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"report: {path} is missing (did every stage of the grid finish?)")
    return json.loads(path.read_text())


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.mean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def _cell(stat: dict | None, scale: float = 1, decimals: int = 3) -> str:
    if stat is None:
        return "-"
    mean = f"{scale * stat['mean']:.{decimals}f}"
    return mean if len(stat["values"]) == 1 else f"{mean} ± {scale * stat['sd']:.{decimals}f}"


def curve_stats(curves: list[list[dict]]) -> dict[str, Any]:
    """Per step present in every seed's curve: mean and sd of the reward; R@k; the curve mean over steps >= 10."""
    steps = sorted(set.intersection(*(set(c["step"] for c in curve) for curve in curves)))
    by_step = {s: [next(c["reward"] for c in curve if c["step"] == s) for curve in curves] for s in steps}
    later = [s for s in steps if s >= 10]
    means = [statistics.mean(by_step[s]) for s in later]
    per_seed_mean = [statistics.mean(by_step[s][k] for s in later) for k in range(len(curves))] if later else []
    return {
        "steps": steps,
        "mean": [statistics.mean(by_step[s]) for s in steps],
        "sd": [statistics.stdev(by_step[s]) if len(curves) > 1 else 0.0 for s in steps],
        "at": {str(k): _stats(by_step[k]) for k in CURVE_STEPS if k in by_step},
        "curve_mean": _stats(per_seed_mean) if means else None,
    }


def aligndistil_mini(
    inputs: str | Path, options: dict[str, Any], out_dir: str | Path | None = None
) -> tuple[dict[str, Any], str]:
    """(results, printed table); see the module docstring for the folders read. `options.eval`: the evaluate stage's
    output folder name inside each seed folder (default "eval"); `options.control`: the row the paired differences
    are taken against (default "dpo_lr3e-4", the spec's mandatory control)."""
    inputs = Path(inputs)
    seeds = sorted((p for p in inputs.glob("seed*") if p.is_dir()), key=lambda p: int(p.name[4:]))
    if not seeds:
        raise FileNotFoundError(f"report: no seed<s>/ folders under {inputs}")
    evals = [_read(s / options.get("eval", "eval") / "eval.json") for s in seeds]
    names = [n for n in ROWS if all(n in e["models"] for e in evals)]
    names += [n for n in evals[0]["models"] if n not in ROWS and all(n in e["models"] for e in evals)]
    results: dict[str, Any] = {"seeds": [s.name for s in seeds], "rows": {}}
    for name in names:
        runs = [e["models"][name] for e in evals]
        row: dict[str, Any] = {"label": ROWS.get(name, name)}
        for key in METRICS:
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = _stats(values) if len(values) == len(runs) else None
        curves = [r.get("reward_curve") for r in runs]
        row["curve"] = curve_stats(curves) if all(curves) else None
        results["rows"][name] = row
    kinds = [e.get("alpha_by_kind") for e in evals]
    if all(kinds):
        results["alpha_by_kind"] = {
            k: _stats([seed[k]["alpha_mean"] for seed in kinds]) for k in kinds[0] if kinds[0][k]["positions"]
        }
    control = options.get("control", "dpo_lr3e-4")
    if control in results["rows"]:
        results["vs_control"] = paired_differences(results["rows"], control)
    table = format_report(results)
    if out_dir is not None:
        results["plot"] = plot_convergence(results, Path(out_dir) / "convergence.png")
    return results, table


def paired_differences(rows: dict[str, Any], control: str) -> dict[str, Any]:
    """Per row, the per-seed differences to `control` (the same seed's SFT start, data and sampling seed), mean ± sd:
    final true reward, R@k and KL(π‖π_dpo). Seed-to-seed spread of the start cancels in a paired difference."""
    base = rows[control]
    out = {}
    for name, row in rows.items():
        if name == control or not row["curve"] or not base["curve"]:
            continue
        diffs = {}
        for key in ("reward", "kl_to_kl_model"):
            if row[key] and base[key]:
                diffs[key] = _stats([a - b for a, b in zip(row[key]["values"], base[key]["values"])])
        for k in CURVE_STEPS:
            mine, theirs = row["curve"]["at"].get(str(k)), base["curve"]["at"].get(str(k))
            if mine and theirs:
                diffs[f"R@{k}"] = _stats([a - b for a, b in zip(mine["values"], theirs["values"])])
        out[name] = diffs
    return out


def format_report(results: dict[str, Any]) -> str:
    seeds = len(results["seeds"])
    head = [col for col, _, _ in METRICS.values()] + [f"R@{k}" for k in CURVE_STEPS] + ["curve mean"]
    lines = [
        f"Mean ± sd over {seeds} seeds; one sample per held-out prompt (T 1, top_k 0, 14 new tokens). R@k: held-out "
        "reward after k optimizer steps; curve mean: over the checks at steps 10-60.",
        "",
        "| row | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
    ]
    for row in results["rows"].values():
        cells = [_cell(row[key], scale, dec) for key, (_, scale, dec) in METRICS.items()]
        curve = row["curve"]
        cells += [_cell(curve["at"].get(str(k))) if curve else "-" for k in CURVE_STEPS]
        cells.append(_cell(curve["curve_mean"]) if curve else "-")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    if results.get("vs_control"):
        cols = [f"R@{k}" for k in CURVE_STEPS] + ["reward", "kl_to_kl_model"]
        lines += [
            "",
            "Paired by seed: row minus the control (row 3), mean ± sd of the per-seed differences:",
            "",
            "| row | " + " | ".join(f"Δ {METRICS[c][0] if c in METRICS else c}" for c in cols) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for name, diffs in results["vs_control"].items():
            cells = [_signed(diffs.get(c)) for c in cols]
            lines.append(f"| {results['rows'][name]['label']} | " + " | ".join(cells) + " |")
    if "alpha_by_kind" in results:
        kinds = results["alpha_by_kind"]
        lines += [
            "",
            "Mean α_t (r 20, tvd) on held-out chosen responses, by the token the position predicts:",
            "",
            "| " + " | ".join(kinds) + " |",
            "|---" * len(kinds) + "|",
            "| " + " | ".join(_cell(v) for v in kinds.values()) + " |",
        ]
    return "\n".join(lines)


def _signed(stat: dict | None) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:+.3f}" + ("" if len(stat["values"]) == 1 else f" ± {stat['sd']:.3f}")


def plot_convergence(results: dict[str, Any], path: Path) -> str | None:
    """Held-out reward against optimizer step for every row with a curve: the mean over seeds, a ± 1 sd band (the
    seed spread), SFT's reward as a dotted line. Returns the file name, or None without matplotlib."""
    try:
        from matplotlib.figure import Figure  # the object-oriented API: no pyplot, no global backend
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'tokentrain[plot]'): no convergence.png")
        return None
    rows = {n: r for n, r in results["rows"].items() if r["curve"]}
    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.subplots()
    for name, row in rows.items():
        c = row["curve"]
        style = "--" if name.startswith("dpo_lr") or name == "dpo" else "-"  # the DPO rows dashed
        (line,) = ax.plot(c["steps"], c["mean"], style, marker="o", ms=3, label=row["label"])
        lo = [m - s for m, s in zip(c["mean"], c["sd"])]
        hi = [m + s for m, s in zip(c["mean"], c["sd"])]
        ax.fill_between(c["steps"], lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
    sft = results["rows"].get("sft")
    if sft and sft["reward"]:
        ax.axhline(sft["reward"]["mean"], color="grey", linestyle=":", linewidth=1, label="(1) SFT (start)")
    title = f"keyword_length mini: held-out reward during training ({len(results['seeds'])} seeds, mean ± sd)"
    ax.set_title(title)
    ax.set_xlabel("optimizer step (batch 32)")
    ax.set_ylabel("held-out mean true reward (1[K in y] − 0.1·|n − 4|)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, metadata={"Title": title})
    return path.name
