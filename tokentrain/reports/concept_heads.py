"""`report: concept_heads_mini` (spec `specs/concept_heads.md` section 7) reads the mini experiment's folders:

    <inputs>/seed<s>/eval/eval.json      NTP and CAFT of each seed: exact match all / seen / unseen, per-head acc and
                                         CE with the frozen phase-1 heads, phase-2 train_seconds
    options.base/eval.json               the phase-0 model ("base"), zero-shot, with the same heads

and writes the table (one row per arm: mean ± sample sd over seeds) and `per_head_accuracy.png` (top-1 accuracy of
each head by arm, seeds as error bars) into the report folder.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

ARMS = {"ntp": "NTP (beta 0)", "caft": "CAFT (beta 0.01, sine decay)"}
PLOT = "per_head_accuracy.png"


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"report: {path} is missing (did every stage of the grid finish?)")
    return json.loads(path.read_text())


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.mean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def _pct(s: dict) -> str:
    if len(s["per_seed"]) == 1:  # one seed: no spread to report
        return f"{100 * s['mean']:.1f}"
    return f"{100 * s['mean']:.1f} ± {100 * s['sd']:.1f}"


def _arm(evals: list[dict]) -> dict[str, Any]:
    """Mean ± sd over seeds of every figure of one arm (its eval.json entries, one per seed)."""
    out: dict[str, Any] = {}
    for key in ("exact_match", "exact_match_seen", "exact_match_unseen"):
        if all(key in e for e in evals):
            out[key] = _stats([e[key] for e in evals])
    if all("acc" in e for e in evals):
        n = len(evals[0]["acc"])
        out["acc"] = [_stats([e["acc"][i] for e in evals]) for i in range(n)]
        out["ce"] = [_stats([e["ce"][i] for e in evals]) for i in range(n)]
    out["train_seconds"] = [e.get("train_seconds") for e in evals]
    return out


def concept_heads_mini(inputs: str | Path, options: dict[str, Any], out_dir: str | Path | None = None):
    """(results, printed table) of the mini experiment; writes the per-head accuracy plot into `out_dir`."""
    inputs = Path(inputs)
    seeds = sorted((p for p in inputs.glob("seed*") if p.is_dir()), key=lambda p: int(p.name[4:]))
    if not seeds:
        raise FileNotFoundError(f"report: no seed<s>/ folders under {inputs}")
    evals = [_read(s / "eval" / "eval.json") for s in seeds]
    for s, e in zip(seeds, evals):
        missing = [arm for arm in ARMS if arm not in e]
        if missing:
            raise KeyError(f"report: {s / 'eval' / 'eval.json'} has no {missing} (models: {sorted(e)})")
    results: dict[str, Any] = {"seeds": [s.name for s in seeds], "arms": {}}
    base = _read(Path(options["base"]) / "eval.json")["base"] if options.get("base") else None
    if base is not None:
        results["base"] = _arm([base])
    for arm in ARMS:
        results["arms"][arm] = _arm([e[arm] for e in evals])
    # paired by seed: CAFT - NTP on the same data order
    diffs = [e["caft"]["exact_match"] - e["ntp"]["exact_match"] for e in evals if "exact_match" in e["ntp"]]
    if diffs:
        results["caft_minus_ntp_exact_match"] = _stats(diffs)
    table = format_table(results)
    if out_dir is not None:
        plot_per_head_accuracy(results, Path(out_dir) / PLOT)
        results["plot"] = PLOT
    return results, table


def format_table(results: dict[str, Any]) -> str:
    arms = results["arms"]
    n = len(next(iter(arms.values())).get("acc", []))
    header = ["arm", "EM all %", "EM seen %", "EM unseen %"]
    header += [f"acc_{i}" for i in range(n)] + [f"CE_{i}" for i in range(n)] + ["phase-2 s per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = ([("phase-0 model, zero-shot", results["base"])] if "base" in results else []) + [
        (ARMS[arm], r) for arm, r in arms.items()
    ]
    for label, r in rows:
        cells = [label] + [
            _pct(r[k]) if k in r else "" for k in ("exact_match", "exact_match_seen", "exact_match_unseen")
        ]
        if "acc" in r:
            cells += [f"{s['mean']:.3f}" for s in r["acc"]] + [f"{s['mean']:.2f}" for s in r["ce"]]
        else:
            cells += [""] * (2 * n)
        secs = [s for s in r["train_seconds"] if s is not None]
        cells.append(", ".join(f"{s:.0f}" for s in secs) if label != "phase-0 model, zero-shot" else "")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(results["seeds"])
    lines += ["", f"Seeds: {seeds} (EM: mean ± sample sd; acc and CE: means; heads: the same frozen phase-1 heads)."]
    if "caft_minus_ntp_exact_match" in results:
        d = results["caft_minus_ntp_exact_match"]
        per_seed = ", ".join(f"{100 * x:+.1f}" for x in d["per_seed"])
        lines.append(
            f"CAFT - NTP exact match (all), paired by seed: {100 * d['mean']:+.2f} ± {100 * d['sd']:.2f} points "
            f"({per_seed})."
        )
    if "acc" in arms.get("caft", {}) and "acc" in arms.get("ntp", {}):
        gains = ", ".join(
            f"head {i}: {arms['caft']['acc'][i]['mean'] - arms['ntp']['acc'][i]['mean']:+.3f}" for i in range(n)
        )
        lines.append(f"CAFT - NTP per-head accuracy: {gains}.")
    return "\n".join(lines)


def plot_per_head_accuracy(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: top-1 accuracy of each head (x) for each arm, mean over seeds with sd error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ([("phase-0 model, zero-shot (one model)", results["base"])] if "base" in results else []) + [
        (ARMS[arm], r) for arm, r in results["arms"].items()
    ]
    groups = [(label, r) for label, r in groups if "acc" in r]
    if not groups:
        return
    n = len(groups[0][1]["acc"])
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for k, (label, r) in enumerate(groups):
        xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(n)]
        means = [s["mean"] for s in r["acc"]]
        sds = [s["sd"] for s in r["acc"]]
        ax.bar(xs, means, width, yerr=sds, capsize=3, label=label)
    ax.set_xticks(range(n))
    ax.set_xticklabels([f"{i}\n(t+{1 + i})" for i in range(n)])
    ax.set_xlabel("head i (predicts token t+1+i from position t; 0 = the model's own next-token head)")
    ax.set_ylabel("top-1 accuracy on answer tokens (fraction)")
    seeds = len(results["seeds"])
    ax.set_title(f"Per-head accuracy with the same frozen phase-1 heads (mean ± sd over {seeds} seeds)")
    ax.legend()
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
