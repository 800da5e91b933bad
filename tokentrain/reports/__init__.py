"""REPORTS: report name -> (module, function): the tables a `report` stage builds from a grid's outputs.

Each function is `report(inputs: str, options: dict) -> (results: dict, table: str)`; one that draws plots also takes
`out_dir` (the report stage's output folder) and writes its PNG files there. One module per objective's report;
modules are imported on first use.
"""

from __future__ import annotations

import importlib

REPORTS: dict[str, tuple[str, str]] = {
    "critical_dpo_mini": ("critical_dpo", "critical_dpo_mini"),
    "concept_heads_mini": ("concept_heads", "concept_heads_mini"),
    "unlearning_mini": ("unlearning", "unlearning_mini"),
    "aligndistil_mini": ("aligndistil", "aligndistil_mini"),
}


def report(name: str):
    """The report function of `name`; an unknown name is a ValueError listing the known ones."""
    if name not in REPORTS:
        raise ValueError(f"report must be one of {sorted(REPORTS)}, got {name!r}")
    module, function = REPORTS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)
