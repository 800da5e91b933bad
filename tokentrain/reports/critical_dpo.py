"""`report: critical_dpo_mini` (spec critical_dpo section 7) reads the mini experiment's folders:

    <inputs>/seed<s>/samples/generate_summary.json        pairs, |D_p|, |D_n|, wrong samples per question
    <inputs>/seed<s>/pairs_scored/signal_meta.json        mean rejected weight
    <inputs>/seed<s>/eval_pos/eval.json                   the positive model (= SFT on D_p) on the test set
    <inputs>/seed<s>/lrs/lr<lr>/eval_{dev,test}/eval.json SFT on D_p and the preference methods at each grid rate
    <inputs>/seed<s>/lrs/lr<lr>/<method>/train_summary.json  chosen/rejected log-prob logs of training

and `options.base` (the base model's eval folder). Each method's learning rate is the grid value with the best mean
dev accuracy over seeds; its test accuracy is reported as mean ± sd over seeds at that rate.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

METHODS = {
    "sft_dp": "+ SFT on D_p, lr from the grid (not in the spec)",
    "dpo": "+ DPO (none, sequence, β 1)",
    "cdpo_paper": "+ critical_dpo paper form (rejected, sequence, β 1)",
    "cdpo_code": "+ critical_dpo code form (rejected, position_mean, β 0.1)",
}


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"report: {path} is missing (did every stage of the grid finish?)")
    return json.loads(path.read_text())


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:  # one seed: no spread to report
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def _logps_drift(summary: dict, key: str) -> float | None:
    """Last minus first logged value of `key` (e.g. logps/chosen) during training; None when not logged."""
    values = [entry[key] for entry in summary.get("log_history", []) if key in entry]
    return values[-1] - values[0] if len(values) >= 2 else None


def critical_dpo_mini(inputs: str | Path, options: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(results, printed table) of the mini experiment; see the module docstring for the folders read."""
    inputs = Path(inputs)
    seeds = sorted((p for p in inputs.glob("seed*") if p.is_dir()), key=lambda p: int(p.name[4:]))
    if not seeds:
        raise FileNotFoundError(f"report: no seed<s>/ folders under {inputs}")
    lrs = sorted({p.name[2:] for s in seeds for p in (s / "lrs").glob("lr*") if p.is_dir()}, key=float)
    base = _read(Path(options["base"]) / "eval.json")["base"]["accuracy"]
    results: dict[str, Any] = {"seeds": [s.name for s in seeds], "lrs": lrs, "base_test": base, "methods": {}}

    per_seed = []
    for s in seeds:
        summary = _read(s / "samples" / "generate_summary.json")
        meta = _read(s / "pairs_scored" / "signal_meta.json")
        per_seed.append(
            {
                "seed": s.name,
                "pairs": summary["pairs_rows"],
                "pos_sft": summary["pos_sft_rows"],
                "neg_sft": summary["neg_sft_rows"],
                "wrong_per_question": summary["mean_wrong_per_question"],
                "samples_per_question": summary["samples"] / max(summary["questions"], 1),
                "unparsable_fraction": summary["unparsable_fraction"],
                "rejected_weight_mean": meta["rejected_weight_mean"],
                "rejected_weight_above_half": meta["rejected_weight_above_half"],
                "sft_test": _read(s / "eval_pos" / "eval.json")["sft"]["accuracy"],
            }
        )
    results["per_seed"] = per_seed
    sft = [r["sft_test"] for r in per_seed]
    weight = statistics.mean(r["rejected_weight_mean"] for r in per_seed)

    for method in METHODS:
        grid = {}
        for lr in lrs:
            dev, test, chosen, rejected = [], [], [], []
            for s in seeds:
                folder = s / "lrs" / f"lr{lr}"
                dev.append(_read(folder / "eval_dev" / "eval.json")[method]["accuracy"])
                test.append(_read(folder / "eval_test" / "eval.json")[method]["accuracy"])
                train = _read(folder / method / "train_summary.json")
                chosen.append(_logps_drift(train, "logps/chosen"))
                rejected.append(_logps_drift(train, "logps/rejected"))
            grid[lr] = {
                "dev": dev,
                "test": test,
                "chosen_logp_drift": None if None in chosen else statistics.mean(chosen),
                "rejected_logp_drift": None if None in rejected else statistics.mean(rejected),
            }
        best = max(lrs, key=lambda lr: statistics.mean(grid[lr]["dev"]))  # ties: the smaller rate
        results["methods"][method] = {"selected_lr": best, "grid": grid}

    lines = [
        "| method | selected lr | test acc % (mean ± sd) | test at each lr (" + " / ".join(lrs) + ") | "
        "mean rejected weight | Δ chosen / rejected log-prob |",
        "|---|---|---|---|---|---|",
        f"| base | - | {100 * base:.1f} | - | - | - |",
        f"| + SFT on D_p (the positive model, lr 1e-3) | - | {_mean_sd(sft)} | - | - | - |",
    ]
    for method, label in METHODS.items():
        r = results["methods"][method]
        grid, best = r["grid"], r["selected_lr"]
        at_lr = " / ".join(
            (
                f"**{100 * statistics.mean(grid[lr]['test']):.1f}**"
                if lr == best
                else f"{100 * statistics.mean(grid[lr]['test']):.1f}"
            )
            for lr in lrs
        )
        drift = grid[best]
        drifts = (
            f"{drift['chosen_logp_drift']:+.2f} / {drift['rejected_logp_drift']:+.2f}"
            if drift["chosen_logp_drift"] is not None
            else "-"
        )
        w = {"sft_dp": "-", "dpo": "1 (all tokens)"}.get(method, f"{weight:.3f}")
        lines.append(f"| {label} | {best} | {_mean_sd(grid[best]['test'])} | {at_lr} | {w} | {drifts} |")
    lines += [
        "",
        "| seed | pairs | D_p | D_n | wrong samples per question | unparsable | mean rejected weight | weights > 0.5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in per_seed:
        lines.append(
            f"| {r['seed']} | {r['pairs']} | {r['pos_sft']} | {r['neg_sft']} | "
            f"{r['wrong_per_question']:.2f} of {r['samples_per_question']:g} | "
            f"{100 * r['unparsable_fraction']:.1f}% | {r['rejected_weight_mean']:.3f} | "
            f"{100 * r['rejected_weight_above_half']:.1f}% |"
        )
    return results, "\n".join(lines)
