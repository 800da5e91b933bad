"""`stage: evaluate`, `task: familiarity`: how much each model still knows a book (spec specs/unlearning.md section 4).

Per model (`tasks.familiarity.evaluate_book`): `familiarity` (share of the prompts whose greedy continuation names one
of their expected terms), `anchor_prob` (mean probability of each term's first token where it first stands in a forget
row; with `anchor_terms`), `forget_ppl` on the forget rows (`dataset`) and `retain_ppl` on held-out general text
(`retain_dataset`). Writes eval.json ({model: metrics}), completions_<model>.jsonl and table.md (also printed).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .base import ConfigError, ModelKeys, RowsStage, Stage, StageContext, load_stage_rows, require, stage_output

logger = logging.getLogger(__name__)

METRICS = ("familiarity", "anchor_prob", "forget_ppl", "retain_ppl")


@dataclass
class Config(RowsStage, ModelKeys):
    task: str = field(default="familiarity", metadata={"help": "familiarity (this module)."})
    models: dict = field(default_factory=dict, metadata={"help": "name -> model (hub name or folder), in order."})
    prompts: str = field(
        default="", metadata={"help": "JSONL of {prompt, expect: [terms]}: greedy continuations are checked for them."}
    )
    anchor_terms: str = field(
        default="", metadata={"help": "The dictionary `term: translation`: anchor_prob reads its terms (optional)."}
    )
    retain_dataset: str = field(
        default="", metadata={"help": "Held-out general rows (prompt/completion) for retain_ppl (optional)."}
    )
    max_new_tokens: int = field(
        default=24, metadata={"help": "Greedy tokens after each prompt (mini 24, paper-scale 64)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Rows per forward and prompts per generation batch."})


def run(stage: Stage, ctx: StageContext) -> dict:
    from accelerate import Accelerator

    from ..data import load_rows
    from ..models import load_model, load_tokenizer
    from ..runtime import distributed_state
    from ..signals.anchors import load_anchor_terms
    from ..tasks.familiarity import evaluate_book, load_prompts

    cfg = stage.config
    require(stage, "models", "prompts", "dataset", why="(task familiarity)")
    if cfg.max_new_tokens < 1 or cfg.batch_size < 1:
        raise ConfigError(f"{stage.name}: max_new_tokens and batch_size must be >= 1")
    prompts = load_prompts(cfg.prompts)  # errors name the file and line
    anchors = load_anchor_terms(cfg.anchor_terms) if cfg.anchor_terms else None
    forget = load_stage_rows(cfg)
    retain = load_rows(cfg.retain_dataset) if cfg.retain_dataset else None
    accelerator = Accelerator()
    state = distributed_state()
    results, completions = {}, {}
    with stage_output(stage, ctx) as tmp:
        for name, path in cfg.models.items():
            tokenizer = load_tokenizer(path)
            model = load_model(path, merge_adapter=True, trainable=False, **cfg.model_kwargs(trainable=False))
            model = model.to(accelerator.device)
            metrics, texts = evaluate_book(
                model,
                tokenizer,
                prompts,
                forget,
                retain,
                anchors,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size,
                accelerator=accelerator,
            )
            results[name], completions[name] = metrics, texts
            logger.info("%s: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            del model
        if state.is_main_process:
            for name, texts in completions.items():
                rows = [{"prompt": p["prompt"], "expect": p["expect"], "completion": t} for p, t in zip(prompts, texts)]
                with open(tmp / f"completions_{Path(str(name)).name}.jsonl", "w") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            (tmp / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
            table = format_table(results)
            (tmp / "table.md").write_text(table + "\n")
            print(table)
    return results


def format_table(results: dict) -> str:
    """One row per model: familiarity and anchor_prob (lower: forgotten), forget_ppl (higher), retain_ppl (lower)."""
    lines = [
        "| model | familiarity ↓ | anchor_prob ↓ | forget_ppl ↑ | retain_ppl ↓ |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        cells = [
            "-" if r.get(k) is None else f"{r[k]:.3f}" if k in ("familiarity", "anchor_prob") else f"{r[k]:.1f}"
            for k in METRICS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
