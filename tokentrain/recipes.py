"""Run a recipe: its numbered stages in order, each skipped only when its finished output is identical work.

    run_recipe("recipes/weighted_ntp_e2e/", run_dir="runs/e2e", overrides={"max_steps": "100"})

- **Variables.** `{run_dir}`, `{data_dir}`, the recipe's `variables.yaml` (`--model X` sets `{model}` everywhere) and,
  inside a grid, the grid's variables.
- **Overrides.** `--key value` reaches every stage that accepts the key (one that no stage accepts is an error);
  `--<stage>.<key> value` reaches one stage (`--05_train.learning_rate 1e-4`). A recipe-wide `--output_dir` is
  refused: every stage has its own.
- **Skip, stale, changed.** Each stage writes `stage.json` (provenance.py). A finished stage is skipped when its
  resolved config and inputs are unchanged; rerun when only inputs that tokentrain redone since changed (its
  consumers of a redone stage are *stale*); and stops with the changed keys otherwise (`--overwrite` or `--from`).
- **Redo.** `--overwrite` redoes every stage, `--from NAME` that stage and the ones after it, `--only NAME` that one.
- **Resume.** A killed stage leaves `<output>.tmp/`; training and generate stages resume from it when its stage.json
  matches.
- **Grids.** A `grid` stage runs its sub-recipe per combination through `SubRecipes` (in worker processes when
  `workers` > 1); each sub-stage follows the same rules.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from . import provenance
from .config import (
    ConfigError,
    accepted_keys,
    default_data_dir,
    load_stage,
    recipe_stages,
    recipe_variables,
)
from .stages import config_class, stage_module
from .stages.base import Stage, StageContext, check_output_dir, is_complete

logger = logging.getLogger("tokentrain")


# --------------------------------------------------------------------------------------------------- one stage


def run_stage(stage: Stage, overwrite: bool = False, sub_recipes: SubRecipes | None = None, header: str = "") -> str:
    """Run `stage` unless its finished output is identical work. Returns 'done', 'skipped' or 'redone (stale)'."""
    out = stage.config.output_dir
    if not out:
        raise ConfigError(f"{stage.path or stage.name}: output_dir is required")
    module = stage_module(stage.config.stage, vars(stage.config))
    delegates = getattr(module, "DELEGATES", False)
    stage.record = provenance.stage_record(
        stage.name, stage.config.stage, stage.resolved(), not_inputs=getattr(module, "NOT_INPUTS", ())
    )
    status = "done"
    if is_complete(out) and not overwrite:
        old = provenance.read_record(out)
        diff = provenance.compare(old, stage.record) if old is not None else None
        if old is None:
            logger.warning(
                "%s: %s has no stage.json (an older tokentrain): cannot check its settings; kept", header, out
            )
            return "skipped"
        if diff.config or diff.changed_inputs:
            raise ConfigError(
                f"{stage.name}: {out} was made with other settings or inputs ({diff.describe()}). Pass --overwrite "
                f"to redo it, or run the recipe with --from {stage.name} to redo it and the stages after it"
            )
        if diff.only_stale and not delegates:
            logger.info("%s: stale, rerunning: %s", header or stage.name, diff.describe())
            overwrite, status = True, "redone (stale)"
        elif not delegates:
            logger.info("%s: %s is complete and unchanged, skipped (--overwrite to redo)", header or stage.name, out)
            return "skipped"
    check_output_dir(out, overwrite=True)  # before any compute: a file, or a folder tokentrain did not write
    logger.info("%s", header or f"{stage.name} ({stage.config.stage}) -> {out}")
    start = time.time()
    try:
        module.run(stage, StageContext(overwrite=overwrite, sub_recipes=sub_recipes))
    except BaseException:
        partial = Path(out).with_name(Path(out).name + ".tmp")
        if partial.exists():
            logger.error(
                "%s failed; its partial output is in %s (rerun the same command to resume it where the stage "
                "supports that; --overwrite discards it)",
                stage.name,
                partial,
            )
        raise
    logger.info("%s finished in %.0f s", stage.name, time.time() - start)
    return status


# --------------------------------------------------------------------------------------------------- a recipe


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(overrides for every stage, {stage name: its own overrides}) from `--key` and `--<stage>.<key>` pairs."""
    common, scoped = {}, {}
    for key, value in overrides.items():
        scope, dot, name = key.rpartition(".")
        if dot:
            scoped.setdefault(scope, {})[name] = value
        else:
            common[key] = value
    return common, scoped


def run_recipe(
    recipe: str | Path,
    run_dir: str | None = None,
    data_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    variables: dict[str, str] | None = None,
    start: str | None = None,
    only: str | None = None,
    check: bool = True,
) -> str:
    """Run the numbered stages of `recipe` in order (see the module docstring); returns the run folder.
    `variables` come from an enclosing grid; `check` validates the overrides against the whole recipe tree (the
    outermost call; sub-recipes of grids skip it)."""
    recipe = Path(recipe)
    files = recipe_stages(recipe)
    overrides = dict(overrides or {})
    run_dir = run_dir or str(Path("runs") / (recipe.name if recipe.is_dir() else recipe.parent.name))
    data_dir = data_dir or default_data_dir()
    common, scoped = split_overrides(overrides)
    own = recipe_variables(recipe, common)
    if check:
        check_overrides(recipe, common, scoped, start, only)
    variables = {"top_dir": run_dir, **own, **(variables or {}), "run_dir": run_dir, "data_dir": data_dir}
    variables["recipe_dir"] = str(recipe.resolve() if recipe.is_dir() else recipe.resolve().parent)
    common = {k: v for k, v in common.items() if k not in own}  # a recipe variable is set once, as the variable
    stages = [load_stage(f, {**common, **scoped.get(f.stem, {})}, variables, strict=False) for f in files]
    for stage in stages:
        stage.overrides = overrides  # a grid passes the command line on to its sub-recipe
    names = [s.name for s in stages]
    first = names.index(start) if start in names else None
    sub_recipes = SubRecipes(data_dir)
    logger.info("recipe %s: %d stages -> %s", recipe, len(stages), run_dir)
    for k, stage in enumerate(stages):
        if only and stage.name != only:
            continue
        redo = overwrite or (first is not None and k >= first) or only == stage.name
        header = f"[{k + 1}/{len(stages)}] {stage.name} ({stage.config.stage}) -> {stage.config.output_dir}"
        run_stage(stage, redo, sub_recipes, header)
    return run_dir


def check_overrides(recipe: Path, common: dict, scoped: dict, start: str | None, only: str | None) -> None:
    """Every override must reach a stage: errors name the key or stage and list what exists."""
    if "output_dir" in common:
        raise ConfigError(
            "--output_dir would give every stage of the recipe the same folder: each stage has its own output_dir. "
            "Move the whole run with --run_dir, or one stage's output with --<stage>.output_dir"
        )
    tree = _stage_files(recipe)  # name -> [stage files with that name, in this recipe and its grids' sub-recipes]
    top = [p.stem for p in recipe_stages(recipe)]
    for flag, name in (("--from", start), ("--only", only)):
        if name is not None and name not in top:
            raise ConfigError(f"{flag} {name!r}: {recipe} has no such stage; its stages: {top}")
    if start and only:
        raise ConfigError("give --from or --only, not both")
    for scope, keys in scoped.items():
        if scope not in tree:
            raise ConfigError(f"--{scope}.{next(iter(keys))}: no stage named {scope!r} in {recipe}; stages: {top}")
        known = set().union(*(_file_keys(p) for p in tree[scope]))
        bad = sorted(set(keys) - known)
        if bad:
            raise ConfigError(f"--{scope}.{bad[0]}: stage {scope} has no key {bad[0]!r} (`tokentrain run` lists none)")
    known = set().union(*(_file_keys(p) for files in tree.values() for p in files), _tree_variables(recipe))
    unused = sorted(k for k in common if k not in known)
    if unused:
        raise ConfigError(f"override(s) {unused} match no key of any stage in {recipe}")


def _stage_files(recipe: Path) -> dict[str, list[Path]]:
    """Stage name -> its files, in `recipe` and (recursively) in the sub-recipes of its grid stages."""
    from .stages.grid import sub_recipe_path

    tree: dict[str, list[Path]] = {}
    for path in recipe_stages(recipe):
        tree.setdefault(path.stem, []).append(path)
        raw = _raw(path)
        if raw.get("stage") == "grid":
            for name, files in _stage_files(sub_recipe_path(path, str(raw.get("recipe", "")))).items():
                tree.setdefault(name, []).extend(files)
    return tree


def _tree_variables(recipe: Path) -> set[str]:
    from .stages.grid import sub_recipe_path

    names = set(recipe_variables(recipe))
    for path in recipe_stages(recipe):
        raw = _raw(path)
        if raw.get("stage") == "grid":
            names |= _tree_variables(sub_recipe_path(path, str(raw.get("recipe", ""))))
    return names


def _raw(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    return raw


def _file_keys(path: Path) -> set[str]:
    """The keys the stage in `path` accepts (its kind's keys and its trainer config's fields)."""
    raw = _raw(path)
    kind = raw.get("stage")
    try:
        cls = config_class(kind, raw)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in raw.items() if k in ("stage", "objective") and k in fields})
    return accepted_keys(kind, cfg.trainer_config_class(), raw)


# --------------------------------------------------------------------------------------------------- grids


@dataclasses.dataclass
class SubRecipes:
    """How a grid stage runs its sub-recipe (handed to it in StageContext, so stages never import this module)."""

    data_dir: str

    def is_done(self, recipe: str, run_dir: str, variables: dict, overrides: dict) -> bool:
        """Every stage of the sub-recipe finished with identical work (nested grids: every combination)."""
        from .stages.grid import jobs

        common, scoped = split_overrides(overrides)
        own = recipe_variables(recipe, common)
        variables = {"top_dir": run_dir, **own, **variables, "run_dir": run_dir, "data_dir": self.data_dir}
        variables["recipe_dir"] = str(Path(recipe).resolve())
        common = {k: v for k, v in common.items() if k not in own}
        for path in recipe_stages(recipe):
            stage = load_stage(path, {**common, **scoped.get(path.stem, {})}, variables, strict=False)
            out = stage.config.output_dir
            old = provenance.read_record(out) if is_complete(out) else None
            if old is None:
                return False
            module = stage_module(stage.config.stage, vars(stage.config))
            new = provenance.stage_record(
                stage.name, stage.config.stage, stage.resolved(), not_inputs=getattr(module, "NOT_INPUTS", ())
            )
            if not provenance.compare(old, new).identical:
                return False
            if getattr(module, "DELEGATES", False):
                stage.overrides = overrides
                if not all(self.is_done(*job, overrides) for job in jobs(stage)):
                    return False
        return True

    def run_all(self, todo: list, overrides: dict, overwrite: bool, workers: int, threads: int, name: str) -> list:
        """Run each (recipe, run_dir, variables) job; returns the failures as lines (every one, not only the first)."""
        import torch

        failed = []
        if workers == 1:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for recipe, run_dir, variables in todo:
                    run_recipe(recipe, run_dir, self.data_dir, overrides, overwrite, variables, check=False)
            finally:
                torch.set_num_threads(before)
            return failed
        import concurrent.futures
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {
                pool.submit(
                    _grid_worker, recipe, run_dir, self.data_dir, overrides, variables, threads, overwrite
                ): run_dir
                for recipe, run_dir, variables in todo
            }
            for future in concurrent.futures.as_completed(futures):
                try:
                    future.result()
                    logger.info("grid %s: %s finished", name, futures[future])
                except Exception as e:  # report every failed combination, not only the first
                    failed.append(f"{futures[future]}: {type(e).__name__}: {e}")
        return failed


def _grid_worker(recipe, run_dir, data_dir, overrides, variables, threads, overwrite) -> None:
    import torch

    from .runtime import setup_logging

    torch.set_num_threads(threads)
    setup_logging(prefix=Path(run_dir).name)
    run_recipe(recipe, run_dir, data_dir, overrides, overwrite, variables, check=False)
