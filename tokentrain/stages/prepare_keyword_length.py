"""`stage: prepare`, `task: keyword_length`: the AlignDistil mini experiment's data and model, made in code (spec
aligndistil section 7; the task is `tasks/keyword_length.py`).

Writes `sft.jsonl` (prompt, completion, keyword), `prefs.jsonl` and `heldout.jsonl` (prompt, chosen, rejected, keyword;
held-out prompts use (K, W1, W2) triples that occur in no training row), `data_summary.json` (row counts, behaviour
rewards) and `init/`: the 68-word tokenizer and the 90,944-parameter Llama, both from `seed`, which also draws the data.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from .base import ConfigError, Stage, StageConfig, StageContext, stage_output

logger = logging.getLogger(__name__)


@dataclass
class Config(StageConfig):
    task: str = field(default="keyword_length", metadata={"help": "keyword_length (data and model made in code)."})
    sft_rows: int = field(default=8000, metadata={"help": "Behaviour samples for SFT (spec: 8,000)."})
    pref_rows: int = field(default=2000, metadata={"help": "Bradley-Terry labelled preference pairs (spec: 2,000)."})
    heldout_rows: int = field(default=512, metadata={"help": "Held-out prompts with unseen triples (spec: 512)."})


def run(stage: Stage, ctx: StageContext) -> None:
    from ..tasks.keyword_length import data_summary, make_data, make_model, make_tokenizer

    cfg = stage.config
    for key in ("sft_rows", "pref_rows", "heldout_rows"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{stage.name}: {key} must be >= 1, got {getattr(cfg, key)}")
    data = make_data(cfg.seed, cfg.sft_rows, cfg.pref_rows, cfg.heldout_rows)
    with stage_output(stage, ctx) as tmp:
        for name, rows in data.items():
            with open(tmp / f"{name}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        tokenizer = make_tokenizer()
        model = make_model(tokenizer, cfg.seed)
        model.save_pretrained(tmp / "init")
        tokenizer.save_pretrained(tmp / "init")
        summary = {**data_summary(data), "parameters": sum(p.numel() for p in model.parameters()), "seed": cfg.seed}
        (tmp / "data_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info(
            "keyword_length (seed %d): %s rows; behaviour reward %.3f (SFT), chosen %.3f vs rejected %.3f; "
            "%d-parameter Llama, vocab %d in init/",
            cfg.seed,
            summary["rows"],
            summary["sft_completion_reward"],
            summary["prefs_chosen_reward"],
            summary["prefs_rejected_reward"],
            summary["parameters"],
            len(tokenizer),
        )
