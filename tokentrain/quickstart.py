"""`tokentrain quickstart <stem>`: the embedded recipe of an objective, on CPU with data made in code, in minutes.

The quickstart recipes, the accelerate configs and launch.sh ship inside the package (`tokentrain/shipped/`), so they
work after a plain `pip install` from any folder; the repository's `recipes/quickstart/`, `accelerate_configs/` and
`launch.sh` are links to them.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path


def shipped() -> Path:
    """The package's shipped files (quickstart recipes, accelerate configs, launch.sh), as a real folder."""
    return Path(str(resources.files("tokentrain") / "shipped"))


QUICKSTARTS = shipped() / "quickstart"


def quickstart(stem: str, run_dir: str | None = None, overwrite: bool = False) -> None:
    """Run recipes/quickstart/<stem>/ into `run_dir` (default runs/quickstart/<stem>) and print its results."""
    from .config import recipe_stages
    from .data import read_meta
    from .recipes import run_recipe
    from .stages.evaluate import format_accuracy_table, format_table

    recipe = QUICKSTARTS / stem
    if not recipe.is_dir():
        known = sorted(p.name for p in QUICKSTARTS.iterdir() if p.is_dir())
        raise FileNotFoundError(f"no quickstart for {stem!r}; quickstarts: {known}")
    run_dir = run_dir or str(Path("runs") / "quickstart" / stem)
    start = time.time()
    files = recipe_stages(recipe)
    print(f"tokentrain quickstart {stem}: {len(files)} stages -> {run_dir}")
    for f in files:
        first = f.read_text().splitlines()[0]
        print(f"  {f.name:<22} {first.lstrip('# ') if first.startswith('#') else ''}")
    run_recipe(recipe, run_dir, None, {}, overwrite)
    results = json.loads((Path(run_dir) / "eval" / "eval.json").read_text())
    diagnostic = results.pop("prior_diagnostic", None)
    print(f"\nquickstart {stem} finished in {time.time() - start:.0f} s; results on the held-out rows:")
    graded = all("accuracy" in r for r in results.values())
    print(format_accuracy_table(results) if graded else format_table(results))
    if diagnostic:
        print("PRIOR mean weight by token kind:", {k: round(v, 3) for k, v in diagnostic.items()})
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
    else:
        print(f"see the signal: tokentrain inspect {run_dir}/scored_prior --column ref_logps --out prior.html")
