"""`stage: report`: aggregate a grid's outputs into a table (report.json + report.md, printed), with the run folder's
numbers as a tidy results.csv and its PNG plots in plots/ (tokentrain/plots.py)."""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import distributed_state
from .base import ConfigError, Stage, StageConfig, StageContext, stage_output

logger = logging.getLogger(__name__)


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
    with stage_output(stage, ctx) as tmp:
        # a report that draws plots takes `out_dir`, the output folder (written atomically with the table)
        extra = {"out_dir": tmp} if "out_dir" in inspect.signature(build).parameters else {}
        results, table = build(cfg.inputs, cfg.options, **extra)
        (tmp / "report.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "report.md").write_text(table + "\n")
        if distributed_state().is_main_process:
            _results_and_plots(stage, tmp)
    print(table)
    return results


def _results_and_plots(stage: Stage, out: Path) -> None:
    """results.csv (every number of the recipe's run folder, one row per run and metric) and its PNG plots in
    plots/ (skipped with a warning without matplotlib, the `plot` extra)."""
    from ..plots import MissingMatplotlib, plot_run
    from ..reports.results import results_table, write_results_csv

    run_dir = stage.variables.get("run_dir") or str(Path(stage.config.output_dir).parent)
    write_results_csv(results_table(run_dir), out / "results.csv")
    try:
        written = plot_run(run_dir, out / "plots")
    except (MissingMatplotlib, FileNotFoundError) as e:
        logger.warning("%s: no plots: %s", stage.name, e)
        return
    logger.info("%s: results.csv and %d plots in %s/plots", stage.name, len(written), stage.config.output_dir)
