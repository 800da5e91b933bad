"""`stage: prepare`, `task: chat_preferences`: chat preference rows in TRL's explicit-prompt layout (the real-scale
AlignDistil recipe's data, spec aligndistil section 8).

Datasets such as HuggingFaceH4/ultrafeedback_binarized store each side as a whole conversation (`chosen`, `rejected`:
the user turn(s) and the reply) beside a plain-text `prompt`. TRL's DPOTrainer and AlignDistil need the shared prompt
as messages and each side as the reply alone, so each row becomes

    prompt   = chosen[:-1]          the messages before the final reply (with the chat template's generation prompt,
                                    the prompt the policy sees when it samples, on-policy and in evaluation)
    chosen   = [chosen[-1]]         the chosen reply (an assistant message)
    rejected = [rejected[-1]]

A row whose two conversations differ before the final reply, or does not end with an assistant message on both sides,
is dropped and counted (the first few indices are logged). Writes `<name>.jsonl` per entry of `splits` and
`prepare_summary.json` (rows kept and dropped per split).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from .base import ConfigError, Stage, StageConfig, StageContext, require, stage_output

logger = logging.getLogger(__name__)


@dataclass
class Config(StageConfig):
    task: str = field(default="chat_preferences", metadata={"help": "chat_preferences."})
    dataset: str = field(default="", metadata={"help": "Hub name or local copy of the preference dataset."})
    splits: dict = field(
        default_factory=dict,
        metadata={"help": "output name -> split, e.g. {train: train_prefs, test: 'test_prefs[:500]'}."},
    )


def split_row(row: dict) -> dict | None:
    """The explicit-prompt form of one row, or None when its sides do not share the prompt or lack a final reply."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
        return None
    if chosen[:-1] != rejected[:-1] or not chosen[:-1]:
        return None
    if chosen[-1].get("role") != "assistant" or rejected[-1].get("role") != "assistant":
        return None
    return {"prompt": chosen[:-1], "chosen": [chosen[-1]], "rejected": [rejected[-1]]}


def run(stage: Stage, ctx: StageContext) -> None:
    from ..data import load_rows

    cfg = stage.config
    require(stage, "dataset", "splits")
    for name, split in cfg.splits.items():
        if not isinstance(split, str) or not split:
            raise ConfigError(f"{stage.name}: splits.{name} must name a split, got {split!r}")
    summary = {}
    with stage_output(stage, ctx) as tmp:
        for name, split in cfg.splits.items():
            rows = load_rows(cfg.dataset, split)
            missing = [c for c in ("chosen", "rejected") if c not in rows.column_names]
            if missing:
                raise KeyError(f"{stage.name}: {cfg.dataset} ({split}) lacks column(s) {missing}")
            kept, dropped = 0, []
            with open(tmp / f"{name}.jsonl", "w") as f:
                for i, row in enumerate(rows):
                    out = split_row(row)
                    if out is None:
                        dropped.append(i)
                        continue
                    f.write(json.dumps(out) + "\n")
                    kept += 1
            if not kept:
                raise ValueError(f"{stage.name}: no row of {cfg.dataset} ({split}) is a chat preference pair")
            summary[name] = {"split": split, "rows": kept, "dropped": len(dropped), "first_dropped": dropped[:10]}
            logger.info(
                "%s: %d rows from %s (%s), %d dropped (first: %s)",
                name,
                kept,
                cfg.dataset,
                split,
                len(dropped),
                dropped[:10],
            )
        (tmp / "prepare_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
