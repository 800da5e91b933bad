"""`stage: evaluate`, `task: tofu`: TOFU forget/retain metrics of each model (spec specs/unlearning.md section 4).

Per model (`tasks.tofu.evaluate_tofu`): `forget_prob` (mean P(answer | question) over the forget rows, `dataset`),
`forget_truth_ratio` (mean min(R, 1/R), R from the paraphrased and perturbed answers), `retain_prob` (over
`retain_dataset`) and, with `forget_quality`, the KS-test p-value of the model's forget R values against a retain-only
model's: `retain_model` names one of `models` (evaluated here first), or `retain_model_eval` a metrics file written
before. Writes eval.json ({model: metrics}), metrics_<model>.json (the same metrics with the per-row R values at top
level, `forget_truth_ratio_values`: what `retain_model_eval` reads) and table.md (also printed).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .base import ConfigError, ModelKeys, RowsStage, Stage, StageContext, load_stage_rows, require, stage_output

logger = logging.getLogger(__name__)


@dataclass
class Config(RowsStage, ModelKeys):
    task: str = field(default="tofu", metadata={"help": "tofu (this module)."})
    models: dict = field(default_factory=dict, metadata={"help": "name -> model (hub name or folder), in order."})
    retain_dataset: str = field(
        default="", metadata={"help": "Retain rows (question, answer) for retain_prob (optional)."}
    )
    chat: bool = field(
        default=False, metadata={"help": "Chat models: questions in TRL's conversational form (as the prepare stage)."}
    )
    truth_ratio: bool = field(
        default=True, metadata={"help": "Compute forget_truth_ratio (needs paraphrased_answer and perturbed_answer)."}
    )
    forget_quality: bool = field(
        default=False,
        metadata={"help": "KS-test p-value against a retain-only model (retain_model or retain_model_eval)."},
    )
    retain_model: str = field(
        default="",
        metadata={"help": "forget_quality: the name, among `models`, of the model trained without the forget rows."},
    )
    retain_model_eval: str = field(
        default="",
        metadata={"help": "forget_quality: a retain-only model's metrics file (metrics_<model>.json of this task)."},
    )
    batch_size: int = field(default=16, metadata={"help": "Question/answer rows per forward."})


def run(stage: Stage, ctx: StageContext) -> dict:
    from accelerate import Accelerator

    from ..data import load_rows
    from ..models import load_model, load_tokenizer
    from ..runtime import distributed_state
    from ..tasks.tofu import TRUTH_RATIO_VALUES, evaluate_tofu

    cfg = stage.config
    require(stage, "models", "dataset", why="(task tofu)")
    if cfg.forget_quality and bool(cfg.retain_model) == bool(cfg.retain_model_eval):
        raise ConfigError(
            f"{stage.name}: forget_quality needs exactly one of retain_model (a name in models) or retain_model_eval "
            "(a metrics file of a retain-only model)"
        )
    if cfg.retain_model and cfg.retain_model not in cfg.models:
        raise ConfigError(f"{stage.name}: retain_model {cfg.retain_model!r} is not one of models {list(cfg.models)}")
    if cfg.batch_size < 1:
        raise ConfigError(f"{stage.name}: batch_size must be >= 1, got {cfg.batch_size}")
    forget = list(load_stage_rows(cfg))
    retain = list(load_rows(cfg.retain_dataset)) if cfg.retain_dataset else None
    # the retain-only model first: the others' forget_quality compares with its R values
    order = sorted(cfg.models, key=lambda name: name != cfg.retain_model)
    accelerator = Accelerator()
    results = {}
    with stage_output(stage, ctx) as tmp:
        reference = cfg.retain_model_eval or None
        for name in order:
            path = cfg.models[name]
            tokenizer = load_tokenizer(path)
            model = load_model(path, merge_adapter=True, trainable=False, **cfg.model_kwargs(trainable=False))
            compare = cfg.forget_quality and name != cfg.retain_model
            results[name] = evaluate_tofu(
                model.to(accelerator.device),
                tokenizer,
                forget,
                retain,
                chat=cfg.chat,
                truth_ratio_metric=cfg.truth_ratio,
                forget_quality=compare,
                retain_model_eval=reference if compare else None,
                batch_size=cfg.batch_size,
                accelerator=accelerator,
            )
            del model
            if name == cfg.retain_model:  # what the other models' forget_quality reads, written before they run
                reference = str(tmp / f"metrics_{Path(str(name)).name}.json")
                if accelerator.is_main_process:
                    Path(reference).write_text(json.dumps(results[name], indent=2) + "\n")
                accelerator.wait_for_everyone()
            logger.info(
                "%s: %s",
                name,
                ", ".join(f"{k} {v:.4g}" for k, v in results[name].items() if k != TRUTH_RATIO_VALUES),
            )
        results = {name: results[name] for name in cfg.models}  # the order of the stage file
        if distributed_state().is_main_process:
            for name, metrics in results.items():
                (tmp / f"metrics_{Path(str(name)).name}.json").write_text(json.dumps(metrics, indent=2) + "\n")
            summary = {n: {k: v for k, v in m.items() if k != TRUTH_RATIO_VALUES} for n, m in results.items()}
            (tmp / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
            table = format_table(summary)
            (tmp / "table.md").write_text(table + "\n")
            print(table)
    return results


def format_table(results: dict) -> str:
    lines = [
        "| model | forget_prob ↓ | forget_truth_ratio ↑ | retain_prob ↑ | forget_quality ↑ |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        cells = [
            "-" if r.get(k) is None else f"{r[k]:.3g}" if k == "forget_quality" else f"{r[k]:.3f}"
            for k in ("forget_prob", "forget_truth_ratio", "retain_prob", "forget_quality")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
