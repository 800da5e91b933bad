"""`tokentrain quickstart <stem>`: the embedded recipe of an objective, on CPU with data made in code, in minutes.

The quickstart recipes, the accelerate configs and launch.sh ship inside the package (`tokentrain/shipped/`), so they
work after a plain `pip install` from any folder; the repository's `recipes/quickstart/`, `accelerate_configs/` and
`launch.sh` are links to them.
"""

from __future__ import annotations

import json
import os
import time
from importlib import resources
from pathlib import Path


def shipped() -> Path:
    """The package's shipped files (quickstart recipes, accelerate configs, launch.sh), as a real folder."""
    return Path(str(resources.files("tokentrain") / "shipped"))


QUICKSTARTS = shipped() / "quickstart"


def quickstart(stem: str, run_dir: str | None = None, overwrite: bool = False, overrides: dict | None = None) -> None:
    """Run recipes/quickstart/<stem>/ into `run_dir` (default runs/quickstart/<stem>) and print its results;
    `overrides` (`--key value`, `--<stage>.key value`) as for `tokentrain run`."""
    from .config import recipe_stages
    from .data import read_meta
    from .recipes import run_recipe

    recipe = QUICKSTARTS / stem
    if not recipe.is_dir():
        known = sorted(p.name for p in QUICKSTARTS.iterdir() if p.is_dir())
        raise FileNotFoundError(f"no quickstart for {stem!r}; quickstarts: {known}")
    run_dir = run_dir or str(Path("runs") / "quickstart" / stem)
    if "OMP_NUM_THREADS" not in os.environ:
        # tiny models gain nothing from threads, and spin-waiting threads slow them badly on a busy machine
        import torch

        torch.set_num_threads(1)
    start = time.time()
    files = recipe_stages(recipe)
    print(f"tokentrain quickstart {stem}: {len(files)} stages -> {run_dir}")
    for f in files:
        first = f.read_text().splitlines()[0]
        print(f"  {f.name:<22} {first.lstrip('# ') if first.startswith('#') else ''}")
    run_recipe(recipe, run_dir, None, overrides or {}, overwrite)
    if stem == "unlearning":
        return _unlearning_summary(run_dir, time.time() - start)
    # the evaluate stage printed the results table on the held-out rows (and any diagnostic) just above
    print(f"\nquickstart {stem} finished in {time.time() - start:.0f} s; the table above is {run_dir}/eval/eval.json")
    print(f"outputs: {run_dir}/ (models, scored datasets with signal_meta.json, eval/eval.json)")
    if stem == "critical_dpo":
        meta = read_meta(Path(run_dir) / "pairs_scored") or {}
        print(
            f"pairs: {meta.get('rows')}; mean rejected-token weight {meta.get('rejected_weight_mean', 0):.3f}, "
            f"{100 * meta.get('rejected_weight_above_half', 0):.1f}% of rejected tokens above 0.5"
        )
        print(
            f"see the critical tokens: tokentrain inspect {run_dir}/pairs_scored --column rejected_weights "
            "--ids_column rejected_ids --out critical.html"
        )
    elif stem == "aligndistil":
        meta = read_meta(Path(run_dir) / "alpha") or {}
        print(
            f"mean α_t (5·TVD_t + 0.001) on the held-out chosen responses {meta.get('alpha_mean', 0):.3f}; where the "
            f"DPO and reverse-DPO models disagree: {run_dir}/alpha/aligndistil_alpha.html (or tokentrain inspect "
            f"{run_dir}/alpha --column aligndistil_alpha --ids_column completion_ids)"
        )
    elif stem == "concept_heads":
        results = json.loads((Path(run_dir) / "eval" / "eval.json").read_text())
        gains = [c - n for c, n in zip(results["caft"]["acc"][1:], results["ntp"]["acc"][1:])]
        print(
            "CAFT - NTP top-1 accuracy of the same frozen heads 1..4 on the answers: "
            + ", ".join(f"{g:+.3f}" for g in gains)
            + f" (the paper's diagnostic); the phase-1 heads: {run_dir}/heads/heads"
        )
    else:
        _weighted_ntp_summary(run_dir)
        print(f"see the signal: tokentrain inspect {run_dir}/scored_prior --column ref_logps --out prior.html")


def _weighted_ntp_summary(run_dir: str) -> None:
    """Each weighting's slot accuracy against NTP, and what slot accuracy does not count: the length of the outputs
    (the gain again with both outputs of each MR cut to the shorter one's words) and the MR slots stated with another
    value (the training rows' habitual slips, prepare's `noise`)."""
    from .tasks.e2e import contradicted_slots, slot_accuracy

    run = Path(run_dir)
    names, methods = ("ntp", "prior", "rho1", "rm"), ("prior", "rho1")
    if not all((run / "eval" / f"outputs_{name}.jsonl").is_file() for name in names):
        return  # the evaluation did not run (or not for every model): nothing to compare
    outputs = {}
    for name in names:
        rows = [json.loads(line) for line in (run / "eval" / f"outputs_{name}.jsonl").open()]
        outputs[name] = {r["mr"]: r["output"].split() for r in rows}  # words
    mrs = list(outputs["ntp"])

    def accuracy(name: str, cut: dict | None = None) -> float:
        realised, total = slot_accuracy(mrs, [" ".join(outputs[name][mr][: cut[mr] if cut else None]) for mr in mrs])
        return realised / total

    gains, cut_gains = {}, {}
    for m in methods:
        shorter = {mr: min(len(outputs[m][mr]), len(outputs["ntp"][mr])) for mr in mrs}
        gains[m] = accuracy(m) - accuracy("ntp")
        cut_gains[m] = accuracy(m, shorter) - accuracy("ntp", shorter)
    words = {name: sum(len(outputs[name][mr]) for mr in mrs) / len(mrs) for name in names}
    parts = []
    for name in names:
        flags = [f for mr in mrs for f in contradicted_slots(mr, " ".join(outputs[name][mr]))]
        parts.append(f"{name} {words[name]:.1f} words, {100 * sum(flags) / len(flags):.1f}%")
    print(
        "slot accuracy against NTP: "
        + ", ".join(f"{m} {gains[m]:+.3f}" for m in methods)
        + "; with both outputs of each MR cut to the shorter one: "
        + ", ".join(f"{m} {cut_gains[m]:+.3f}" for m in methods)
    )
    print("words per output and MR slots stated with another value: " + "; ".join(parts))
    noise = json.loads((run / "data" / "stage.json").read_text())["config"].get("noise", 0.0)
    if noise:
        print(
            f"The training descriptions state a habitual value (restaurant, English, city centre, ...) instead of the "
            f"MR's for {100 * noise:.0f}% of their slots. Rho-1's RM, trained on the clean rows, finds those tokens "
            "unlikely, so Rho-1 leaves them out of its loss. PRIOR's text-only reference finds them easy and "
            "down-weights them, and the predictable </s> too, so PRIOR's outputs can run longer. Slot accuracy counts "
            "the realised MR slots and penalises nothing: read it with the words and wrong slots above."
        )
    for m in methods:
        ratio = words[m] / words["ntp"]
        if gains[m] <= 0:
            print(f"{m} shows no slot-accuracy gain over NTP in this run (one seed; the README has 3).")
        elif ratio >= 1.2 and cut_gains[m] < gains[m] / 2:
            print(
                f"{m}'s outputs are {ratio:.1f}x as long as NTP's; cut to the same length its gain is "
                f"{cut_gains[m]:+.3f} of {gains[m]:+.3f}: it comes from saying more, not from better values."
            )


def _unlearning_summary(run_dir: str, seconds: float) -> None:
    """The unlearning quickstart's results: its evaluation table (familiarity, anchor_prob, perplexities) and the
    generic labels' statistics."""
    run = Path(run_dir)
    stats = json.loads((run / "labels" / "stats.json").read_text())
    print(f"\nquickstart unlearning finished in {seconds:.0f} s; results in the table above (eval/table.md)")
    print(
        f"generic labels: {stats['weighted']} of {stats['positions']} book positions trained; "
        f"{100 * stats['changed']:.1f}% differ from the text, {100 * stats['flipped']:.1f}% from the baseline's own "
        f"guess; names kept at term-first positions (leak) {100 * stats['leak']:.1f}%"
    )
    print(f"outputs: {run_dir}/ (models, labels/ with stats.json, eval/ with completions_<model>.jsonl)")
    print(f"see the labels: tokentrain inspect {run_dir}/labels --column token_weights --out labels.html")
