"""`stage: grid`: run a sub-recipe once per combination of `variables` (product, in order), each in
`<output_dir>/<name>/` (`seed0`, `lr3e-05`, ...), `workers` at a time in their own processes.

A grid's work is its sub-recipe's stages: each is atomic, checked against its stage.json and skipped when identical,
so a killed grid resumes where each combination stopped, an edited sub-recipe stage stops with the changed keys, and a
grid whose combinations are all done is left untouched. The sub-recipe is run through `ctx.sub_recipes` (the recipe
runner), so this module never imports it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .. import provenance
from ..reports.results import combo_name
from .base import DONE_FILE, ConfigError, Stage, StageConfig, StageContext, is_complete, is_ours

logger = logging.getLogger(__name__)

# The recipe runner always enters a grid (its sub-stages decide what to skip); its sub-recipe is not an input.
DELEGATES = True
NOT_INPUTS = ("recipe",)


@dataclass
class Config(StageConfig):
    recipe: str = field(default="", metadata={"help": "A recipe folder run once per combination of `variables`."})
    variables: dict = field(
        default_factory=dict,
        metadata={"help": "name -> list of values; `{name}` in the sub-recipe is replaced, e.g. {seed: [0, 1, 2]}."},
    )
    workers: int = field(default=1, metadata={"help": "Combinations run at once, each in its own process."})
    threads: int = field(
        default=0, metadata={"help": "torch threads per worker (0: this process's torch threads / workers)."}
    )


def sub_recipe_path(stage_file: Path | None, recipe: str) -> Path:
    """A grid's `recipe`, relative to the grid's own stage file."""
    name = stage_file.name if stage_file is not None else "grid"
    if not recipe:
        raise ConfigError(f"{name}: a grid stage needs `recipe` (a folder of numbered stage files)")
    sub = Path(recipe)
    return sub if sub.is_absolute() or stage_file is None else stage_file.parent / sub


def combinations(stage: Stage) -> list[dict]:
    cfg = stage.config
    if not cfg.variables or not all(isinstance(v, list) and v for v in cfg.variables.values()):
        raise ConfigError(f"{stage.name}: variables must map names to non-empty lists, got {cfg.variables!r}")
    names = list(cfg.variables)
    return [dict(zip(names, values)) for values in itertools.product(*cfg.variables.values())]


def jobs(stage: Stage) -> list[tuple[str, str, dict]]:
    """(sub-recipe, run_dir, variables) per combination."""
    sub = sub_recipe_path(stage.path, stage.config.recipe)
    out = Path(stage.config.output_dir)
    result = []
    for combo in combinations(stage):
        variables = {
            **stage.variables,
            **{k: str(v) for k, v in combo.items()},
            "parent_dir": stage.variables["run_dir"],
        }
        variables.pop("run_dir")
        result.append((str(sub), str(out / combo_name(combo)), variables))
    return result


def run(stage: Stage, ctx: StageContext) -> None:
    import torch

    cfg = stage.config
    if cfg.workers < 1:
        raise ConfigError(f"{stage.name}: workers must be >= 1, got {cfg.workers}")
    runner = ctx.sub_recipes
    out = Path(cfg.output_dir)
    if out.exists() and not is_ours(out):
        raise FileExistsError(
            f"grid output_dir {out} exists and was not written by tokentrain: choose another output_dir or move it"
        )
    all_jobs = jobs(stage)
    todo = [job for job in all_jobs if ctx.overwrite or not runner.is_done(*job, stage.overrides)]
    if not todo and is_complete(out):
        logger.info("grid %s: all %d combinations are done", stage.name, len(all_jobs))
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE_FILE).unlink(missing_ok=True)  # incomplete until every combination is done again
    if stage.record is not None:
        provenance.write_record(out, stage.record)
    # a nested grid shares its worker's threads: divide what this process has, not the machine's cores
    threads = cfg.threads or max(1, torch.get_num_threads() // min(cfg.workers, max(len(todo), 1)))
    logger.info(
        "grid %s: %d of %d combinations of %s to run from %s, %d at a time (%d torch threads each)",
        stage.name,
        len(todo),
        len(all_jobs),
        list(cfg.variables),
        cfg.recipe,
        cfg.workers,
        threads,
    )
    failed = runner.run_all(todo, stage.overrides, ctx.overwrite, cfg.workers, threads, stage.name)
    if failed:
        raise RuntimeError(f"grid {stage.name}: {len(failed)} combination(s) failed:\n" + "\n".join(failed))
    if stage.record is not None:
        provenance.write_record(out, provenance.finish_record(stage.record))
    (out / DONE_FILE).write_text("complete\n")
