"""Every number a run folder holds, as data: `stage_outputs` walks a run folder (the output of `tokentrain run`: one
folder per stage output with stage.json and _COMPLETE inside, a grid holding one folder per combination of its
variables, named by `combo_name`) and gives every output the grid variables it was run with; `results_table` /
`write_results_csv` turn what the stages wrote (evaluations, training summaries, scoring and sampling summaries) into
a tidy table, one row per run and metric, that `pandas.read_csv` reads. `tokentrain/plots.py` draws from the same
walk. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def combo_name(combo: dict) -> str:
    """The folder of one grid combination: `seed0`, `lr3e-05_seed1`, ..."""
    return "_".join(f"{k}{v}" for k, v in combo.items())


TRAIN_SUMMARY = "train_summary.json"


@dataclass
class StageOutput:
    """One finished stage output of a run folder."""

    path: Path
    rel: str  # relative to the run folder, with "/"
    kind: str  # its stage kind (config `stage`)
    config: dict[str, Any]
    variables: dict[str, Any]  # the grid variables of the combinations it sits in, e.g. {"seed": 0, "lr": 3e-05}

    @property
    def name(self) -> str:
        return self.path.name

    def json(self, name: str) -> Any:
        return _read_json(self.path / name)

    def label(self) -> str:
        """Its grid variables ("seed 0, lr 3e-05"), or its folder when it has none."""
        return ", ".join(f"{k} {_num(v)}" for k, v in self.variables.items()) or self.rel


def stage_outputs(run_dir: str | Path) -> list[StageOutput]:
    """Every finished stage output under `run_dir` (itself included), in folder order, with its grid variables."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder {root} does not exist")
    found: list[StageOutput] = []

    def visit(folder: Path, variables: dict[str, Any]) -> None:
        record = _read_json(folder / "stage.json")
        config = (record or {}).get("config") or {}
        if record is not None and (folder / "_COMPLETE").exists():
            rel = folder.relative_to(root).as_posix()
            found.append(StageOutput(folder, rel, str(config.get("stage", "")), config, variables))
        combos = {}
        if config.get("stage") == "grid":  # its children are named after their variables (a running grid too)
            grid = config.get("variables") or {}
            for values in itertools.product(*grid.values()):
                combo = dict(zip(grid, values))
                combos[combo_name(combo)] = combo
        elif record is not None:  # another stage's output: a model, a dataset, files; no stage output inside
            return
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and not child.name.endswith(".tmp"):
                visit(child, {**variables, **combos.get(child.name, {})})

    visit(root, {})
    return found


RESULT_COLUMNS = ("run", "model", "stage", "source")  # then the grid variables, then metric and value


def results_table(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every number of the run folder, one row per run and metric: `run` (the model or data folder measured, relative
    to the run folder), `model` (its name in eval.json, or its folder), `stage` (the output that wrote it), `source`
    (evaluate, train, score, generate), the grid variables (`seed`, `lr`, ...), `metric`, `value`."""
    root = Path(run_dir).resolve()
    rows: list[dict[str, Any]] = []
    for o in stage_outputs(run_dir):
        base = {"stage": o.rel, **o.variables}
        folders, evaluated = o.config.get("models") or {}, _evaluated(o)
        for model, metrics in evaluated.items():
            run = _relative(folders[model], root) if model in folders else o.rel
            rows += _metric_rows({**base, "run": run, "model": model, "source": "evaluate"}, metrics)
        evaluation = o.json("eval.json") if o.kind == "evaluate" else None
        if isinstance(evaluation, dict):  # what is not a model's: the PRIOR diagnostic, counts, ...
            other = {k: v for k, v in evaluation.items() if k not in evaluated and k != "models"}
            rows += _metric_rows({**base, "run": o.rel, "model": "", "source": "evaluate"}, other)
        summary = o.json(TRAIN_SUMMARY)
        if summary:
            head = {**base, "run": o.rel, "model": o.name, "source": "train"}
            rows += _metric_rows(head, {k: v for k, v in summary.items() if k != "log_history"})
            checks = summary.get("accuracy_checks") or []
            if checks:
                rows += _metric_rows(head, {"accuracy_check_last": checks[-1]["accuracy"]})
        for source, name in (("score", "signal_meta.json"), ("generate", "generate_summary.json")):
            data = o.json(name)
            if data:
                rows += _metric_rows({**base, "run": o.rel, "model": "", "source": source}, data)
    return rows


def write_results_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """`rows` (from `results_table`) as CSV: the fixed columns, the grid variables in order of appearance, metric,
    value. Written atomically."""
    variables = []
    for row in rows:
        variables += [k for k in row if k not in RESULT_COLUMNS + ("metric", "value") and k not in variables]
    columns = [*RESULT_COLUMNS, *variables, "metric", "value"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def _metric_rows(head: dict[str, Any], metrics: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """One row per number of `metrics`; nested dicts give `outer/inner` metric names, other values are left out."""
    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows += _metric_rows(head, value, f"{prefix}{key}/")
        elif _is_number(value):
            rows.append({**head, "metric": f"{prefix}{key}", "value": float(value)})
    return rows


def _evaluated(output: StageOutput) -> dict[str, dict[str, Any]]:
    """model -> its metrics in an evaluate output's eval.json: the entries named after the stage's `models` (all dict
    entries when it names none), looked up in the `models` entry of the variants that nest them there."""
    evaluation = output.json("eval.json") if output.kind == "evaluate" else None
    if not isinstance(evaluation, dict):
        return {}
    if isinstance(evaluation.get("models"), dict):
        evaluation = evaluation["models"]
    names = output.config.get("models") or {}
    return {k: v for k, v in evaluation.items() if isinstance(v, dict) and (k in names or not names)}


def _relative(folder: str, root: Path) -> str:
    path = Path(folder).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(folder)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
