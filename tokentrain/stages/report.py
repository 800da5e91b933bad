"""`stage: report`: aggregate a grid's outputs into a table (report.json + report.md, printed)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .base import ConfigError, Stage, StageConfig, StageContext, stage_output


@dataclass
class Config(StageConfig):
    report: str = field(default="critical_dpo_mini", metadata={"help": "Which report: critical_dpo_mini."})
    inputs: str = field(default="", metadata={"help": "Folder the report reads (a grid stage's output)."})
    options: dict = field(default_factory=dict, metadata={"help": "Report-specific settings."})


def run(stage: Stage, ctx: StageContext) -> dict:
    from ..reports import report

    cfg = stage.config
    try:
        build = report(cfg.report)
    except ValueError as e:
        raise ConfigError(f"{stage.name}: {e}") from None
    results, table = build(cfg.inputs, cfg.options)
    with stage_output(stage, ctx) as tmp:
        (tmp / "report.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "report.md").write_text(table + "\n")
    print(table)
    return results
