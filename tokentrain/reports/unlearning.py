"""`report: unlearning_mini` (spec specs/unlearning.md section 7): forget-vs-retain tables and scatter plot of the mini
experiment. `inputs` is the mini's run folder; it reads

    eval_alice_original/eval.json                           the checkpoint ("original") on Alice
    alice/seed<s>/eval/eval.json                            reinforced, whp, ga, npo, simnpo on Alice, per seed
    alice/seed<s>/labels/stats.json                         WHP's label statistics (changed, flipped, leak)
    eval_tofu_original_forget<XX>/eval.json                 the TOFU original (and the checkpoint before TOFU)
    tofu/forget<XX>_seed<s>/lrs/lr<lr>/eval/eval.json       whp, ga, npo, simnpo per split, seed and learning rate
    tofu/forget<XX>_seed<s>/labels/stats.json               the reinforcement-only labels' statistics

and writes, beside report.json and report.md, `forget_retain.png` (matplotlib, imported only here): Alice's forget
perplexity against held-out Shakespeare perplexity, and per TOFU split forget_prob against retain_prob, one point per
model and seed. Entries are mean ± sd over the seeds found (sample sd; one seed: the value alone).

"Retain cost" on TOFU: (retain_prob of the original - the method's) / (forget_prob of the original - the method's),
from the means: retain probability lost per unit of forget probability removed (lower is better; "-" when the method
removed none).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

METHODS = ("whp", "ga", "npo", "simnpo")
ALICE_METRICS = ("familiarity", "anchor_prob", "forget_ppl", "retain_ppl")
TOFU_METRICS = ("forget_prob", "forget_truth_ratio", "retain_prob")
LABEL_STATS = ("changed", "flipped", "leak")
COLOURS = {"original": "black", "reinforced": "grey", "whp": "tab:blue", "ga": "tab:red", "npo": "tab:orange"}
COLOURS["simnpo"] = "tab:green"
LR_MARKERS = ("o", "^", "s", "D")


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"report unlearning_mini: {path} is missing (did every stage of the mini finish?)")
    return json.loads(path.read_text())


def _seed_dirs(folder: Path, prefix: str = "seed") -> list[Path]:
    return sorted((p for p in folder.glob(f"{prefix}*") if p.is_dir()), key=lambda p: p.name)


def mean_sd(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.mean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


# ------------------------------------------------------------------------------------------------------- collect


def collect_alice(run: Path) -> dict[str, Any]:
    seeds = _seed_dirs(run / "alice")
    if not seeds:
        raise FileNotFoundError(f"report unlearning_mini: no seed<s>/ folders under {run / 'alice'}")
    original = _read(run / "eval_alice_original" / "eval.json")["original"]
    per_seed = [_read(s / "eval" / "eval.json") for s in seeds]
    stats = [_read(s / "labels" / "stats.json") for s in seeds]
    models = {"original": {k: _summary([original[k]]) for k in ALICE_METRICS}}
    for name in ("reinforced", *METHODS):
        models[name] = {k: _summary([r[name][k] for r in per_seed]) for k in ALICE_METRICS}
    return {
        "seeds": [s.name for s in seeds],
        "models": models,
        "labels": {k: _summary([s[k] for s in stats]) for k in LABEL_STATS},
    }


def collect_tofu(run: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    combos = _seed_dirs(run / "tofu", prefix="forget")
    splits = sorted({c.name.split("_seed")[0] for c in combos})
    for split in splits:
        seeds = [c for c in combos if c.name.startswith(split + "_seed")]
        originals = _read(run / f"eval_tofu_original_{split}" / "eval.json")
        lrs = sorted({p.name[2:] for s in seeds for p in (s / "lrs").glob("lr*") if p.is_dir()}, key=float)
        if not lrs:
            raise FileNotFoundError(f"report unlearning_mini: no lrs/lr<lr>/ folders under {seeds[0]}")
        entry = {
            "seeds": [s.name.split("_")[-1] for s in seeds],
            "lrs": lrs,
            "original": {name: {k: _summary([m[k]]) for k in TOFU_METRICS} for name, m in originals.items()},
            "labels": {k: _summary([_read(s / "labels" / "stats.json")[k] for s in seeds]) for k in ("changed",)},
            "methods": {},
        }
        for lr in lrs:
            evals = [_read(s / "lrs" / f"lr{lr}" / "eval" / "eval.json") for s in seeds]
            entry["methods"][lr] = {m: {k: _summary([e[m][k] for e in evals]) for k in TOFU_METRICS} for m in METHODS}
        out[split] = entry
    if not out:
        raise FileNotFoundError(f"report unlearning_mini: no forget<XX>_seed<s>/ folders under {run / 'tofu'}")
    return out


def retain_cost(original: dict, method: dict) -> float | None:
    """Retain probability lost per unit of forget probability removed, from the means (None: nothing removed)."""
    forgot = original["forget_prob"]["mean"] - method["forget_prob"]["mean"]
    if forgot <= 0:
        return None
    return (original["retain_prob"]["mean"] - method["retain_prob"]["mean"]) / forgot


# --------------------------------------------------------------------------------------------------------- tables


def _cell(summary: dict, digits: int) -> str:
    return mean_sd(summary["values"], digits)


def alice_table(alice: dict) -> str:
    lines = [
        f"Alice (experiment (a)), mean ± sd over {len(alice['seeds'])} seeds; original = the checkpoint (one run)",
        "",
        "| model | familiarity ↓ | anchor_prob ↓ | forget_ppl ↑ | retain_ppl ↓ |",
        "|---|---|---|---|---|",
    ]
    digits = {"familiarity": 3, "anchor_prob": 3, "forget_ppl": 1, "retain_ppl": 1}
    for name, metrics in alice["models"].items():
        cells = [_cell(metrics[k], digits[k]) for k in ALICE_METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    labels = alice["labels"]
    lines += [
        "",
        "WHP labels: changed (target ≠ text) "
        + _cell(labels["changed"], 3)
        + ", flipped (target ≠ baseline argmax) "
        + _cell(labels["flipped"], 3)
        + ", leak (term-first targets = the book's own token) "
        + _cell(labels["leak"], 3),
    ]
    return "\n".join(lines)


def tofu_table(split: str, entry: dict) -> str:
    original = entry["original"]["original"]
    lines = [
        f"TOFU {split} (experiment (b)), mean ± sd over {len(entry['seeds'])} seeds; 2 epochs per method",
        "",
        "| model | lr | forget_prob ↓ | forget_truth_ratio ↑ | retain_prob ↑ | retain cost ↓ |",
        "|---|---|---|---|---|---|",
    ]
    for name, metrics in entry["original"].items():
        label = "original" if name == "original" else f"{name} (before TOFU)"
        cells = [_cell(metrics[k], 3) for k in TOFU_METRICS]
        lines.append(f"| {label} | - | " + " | ".join(cells) + " | - |")
    for lr, methods in entry["methods"].items():
        for name, metrics in methods.items():
            cost = retain_cost(original, metrics)
            cells = [_cell(metrics[k], 3) for k in TOFU_METRICS]
            lines.append(f"| {name} | {lr} | " + " | ".join(cells) + f" | {'-' if cost is None else f'{cost:.2f}'} |")
    lines += ["", f"WHP labels (reinforcement only): changed {_cell(entry['labels']['changed'], 3)}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- plot


def plot_forget_retain(alice: dict, tofu: dict, path: Path) -> Path:
    """One panel for Alice (forget vs retain perplexity, log-log) and one per TOFU split (forget_prob vs retain_prob);
    one point per model and seed; originals as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    panels = 1 + len(tofu)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.6), squeeze=False)
    ax = axes[0][0]
    for name, metrics in alice["models"].items():
        xs, ys = metrics["forget_ppl"]["values"], metrics["retain_ppl"]["values"]
        marker, size = ("*", 220) if name == "original" else ("o", 45)
        ax.scatter(xs, ys, c=COLOURS[name], marker=marker, s=size, alpha=0.85, edgecolors="white", linewidths=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = {ax.xaxis: (1, 2, 5), ax.yaxis: (1, 1.2, 1.5, 2, 3, 5, 7)}  # plain numbers at round values
    for axis, subs in ticks.items():
        axis.set_major_locator(LogLocator(base=10, subs=subs))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("Alice perplexity, forget_ppl (exp nats/token, log scale; → more forgotten)")
    ax.set_ylabel("held-out Shakespeare perplexity, retain_ppl\n(exp nats/token, log scale; ↓ better)")
    ax.set_title(f"(a) Alice, 1 epoch at lr 3e-4 ({len(alice['seeds'])} seeds)")
    ax.grid(True, which="both", alpha=0.3)

    lrs_seen: list[str] = []
    for k, (split, entry) in enumerate(tofu.items(), start=1):
        ax = axes[0][k]
        for name, metrics in entry["original"].items():
            marker = "*" if name == "original" else "X"
            ax.scatter(
                metrics["forget_prob"]["values"],
                metrics["retain_prob"]["values"],
                c="black",
                marker=marker,
                s=220 if marker == "*" else 90,
            )
        for lr, methods in entry["methods"].items():
            if lr not in lrs_seen:
                lrs_seen.append(lr)
            for name, metrics in methods.items():
                ax.scatter(
                    metrics["forget_prob"]["values"],
                    metrics["retain_prob"]["values"],
                    c=COLOURS[name],
                    marker=LR_MARKERS[lrs_seen.index(lr) % len(LR_MARKERS)],
                    s=45,
                    alpha=0.85,
                    edgecolors="white",
                    linewidths=0.5,
                )
        ax.set_xlabel("forget_prob: mean P(answer | question) on the split\n(probability 0-1; ← more forgotten)")
        ax.set_ylabel("retain_prob: mean P(answer | question),\n400 retain rows (probability 0-1; ↑ better)")
        ax.set_title(f"(b) TOFU {split}, 2 epochs ({len(entry['seeds'])} seeds)")
        ax.grid(True, alpha=0.3)

    handles = [Line2D([], [], color=COLOURS[n], marker="o", linestyle="", label=n) for n in ("reinforced", *METHODS)]
    handles.append(Line2D([], [], color="black", marker="*", markersize=12, linestyle="", label="original"))
    if tofu:
        handles.append(Line2D([], [], color="black", marker="X", linestyle="", label="checkpoint before TOFU"))
    for i, lr in enumerate(lrs_seen):
        marker = LR_MARKERS[i % len(LR_MARKERS)]
        handles.append(Line2D([], [], color="dimgrey", marker=marker, linestyle="", label=f"TOFU lr {lr}"))
    seeds = ", ".join(s.replace("seed", "") for s in alice["seeds"])
    fig.suptitle(f"Forget vs retain, mini experiment (tiny Llama, 1.12M parameters); one point per seed ({seeds})")
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 9), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------- report


def unlearning_mini(inputs: str | Path, options: dict[str, Any], out_dir: Path | None = None) -> tuple[dict, str]:
    """(results, printed table) of the mini experiment; with `out_dir` (the report stage's folder) also the plot."""
    if options:
        raise ValueError(f"report unlearning_mini takes no options, got {sorted(options)}")
    run = Path(inputs)
    alice = collect_alice(run)
    tofu = collect_tofu(run)
    table = "\n\n".join([alice_table(alice), *(tofu_table(split, entry) for split, entry in tofu.items())])
    results = {"alice": alice, "tofu": tofu}
    if out_dir is not None:
        plot_forget_retain(alice, tofu, Path(out_dir) / "forget_retain.png")
        results["plot"] = "forget_retain.png"
    return results, table
