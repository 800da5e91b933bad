"""`stage: score`, `signal: whp_labels`: WHP generic labels of the forget rows (spec specs/unlearning.md 2.3-2.6).

The baseline reads the translated text (every anchored term replaced by its translation), the reinforced model the
original; per aligned completion position the label is argmax(v_b - alpha * ReLU(v_r - v_b)) (`signals.whp_labels`).
The output is a saved `datasets` folder: the input columns plus `completion_ids`, `target_ids`, `token_weights`,
`prompt_ids` and `n_anchor_matches`; `stats.json` (rows, weighted positions, changed, flipped, term_first, leak, also
printed); `signal_meta.json` naming the tokenizer by absolute path, the models, the dictionary and the settings.
`tokentrain inspect <output> --column token_weights` shows the weights; `signals.whp_labels.label_token_rows` gives
per position the original token, its generic label, the weight and whether it lies in or after a match.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from .base import ConfigError, ModelKeys, RowsStage, Stage, StageContext, load_stage_rows, require, stage_output

logger = logging.getLogger(__name__)


@dataclass
class Config(RowsStage, ModelKeys):
    signal: str = field(default="whp_labels", metadata={"help": "whp_labels (this module)."})
    baseline: str = field(
        default="", metadata={"help": "The model to unlearn from (hub name or folder): it reads the translated text."}
    )
    reinforced: str = field(
        default="", metadata={"help": "The baseline fine-tuned further on the forget rows (the reinforce stage)."}
    )
    anchor_terms: str = field(
        default="",
        metadata={
            "help": "YAML/JSON dictionary `term: translation` (spec 2.3); empty: reinforcement-only labels (TOFU)."
        },
    )
    alpha: float = field(
        default=5.0, metadata={"help": "alpha of v_b - alpha * ReLU(v_r - v_b), >= 0 (paper 5; MUSE uses 1)."}
    )
    repeat_penalty: float = field(
        default=0.0, metadata={"help": "rho >= 0: pushes down first tokens of translations already used (rule (b))."}
    )
    tokenizer: str = field(default="", metadata={"help": "The trainer's tokenizer (default: the baseline's)."})
    batch_size: int = field(default=8, metadata={"help": "Rows per forward (sorted by length, longest first)."})
    chunk_size: int = field(default=4096, metadata={"help": "Positions projected through the LM heads at once."})


def run(stage: Stage, ctx: StageContext) -> dict:
    from accelerate import Accelerator

    from ..data import write_meta
    from ..models import has_tokenizer, load_model, load_tokenizer, vocab_size
    from ..signals.anchors import load_anchor_terms
    from ..signals.whp_labels import score_whp_labels

    cfg = stage.config
    require(stage, "baseline", "reinforced", "dataset", why="(signal 'whp_labels')")
    if not (math.isfinite(cfg.alpha) and cfg.alpha >= 0):
        raise ConfigError(f"{stage.name}: alpha must be a finite number >= 0, got {cfg.alpha!r}")
    if not (math.isfinite(cfg.repeat_penalty) and cfg.repeat_penalty >= 0):
        raise ConfigError(f"{stage.name}: repeat_penalty must be a finite number >= 0, got {cfg.repeat_penalty!r}")
    if cfg.batch_size < 1 or cfg.chunk_size < 1:
        raise ConfigError(f"{stage.name}: batch_size and chunk_size must be >= 1")
    anchors = load_anchor_terms(cfg.anchor_terms) if cfg.anchor_terms else None  # errors name the file and keys
    accelerator = Accelerator()
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.baseline)
    reinforced_tokenizer = load_tokenizer(cfg.reinforced) if has_tokenizer(cfg.reinforced) else None
    kwargs = cfg.model_kwargs(trainable=False)
    baseline = load_model(cfg.baseline, trainable=False, merge_adapter=True, **kwargs).to(accelerator.device)
    reinforced = load_model(cfg.reinforced, trainable=False, merge_adapter=True, **kwargs).to(accelerator.device)
    dataset = load_stage_rows(cfg)
    with stage_output(stage, ctx) as tmp:
        columns, stats = score_whp_labels(
            dataset,
            baseline,
            reinforced,
            tokenizer,
            anchors=anchors,
            alpha=cfg.alpha,
            repeat_penalty=cfg.repeat_penalty,
            batch_size=cfg.batch_size,
            chunk_size=cfg.chunk_size,
            accelerator=accelerator,
            reinforced_tokenizer=reinforced_tokenizer,
        )
        if accelerator.is_main_process:
            from datasets import Sequence, Value

            features = {
                "completion_ids": Sequence(Value("int32")),
                "target_ids": Sequence(Value("int32")),
                "token_weights": Sequence(Value("float32")),
                "prompt_ids": Sequence(Value("int32")),
                "n_anchor_matches": Value("int32"),
            }
            dataset = dataset.remove_columns([c for c in features if c in dataset.column_names])
            for name, feature in features.items():
                dataset = dataset.add_column(name, columns[name], feature=feature)
            dataset.save_to_disk(str(tmp))
            (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
            write_meta(
                tmp,
                {
                    "signal": "whp_labels",
                    "baseline": cfg.baseline,
                    "reinforced": cfg.reinforced,
                    "anchor_terms": str(Path(cfg.anchor_terms).resolve()) if cfg.anchor_terms else None,
                    "alpha": cfg.alpha,
                    "repeat_penalty": cfg.repeat_penalty,
                    "tokenizer": _absolute(tokenizer.name_or_path),
                    "vocab_size": len(tokenizer),
                    "baseline_vocab_size": vocab_size(baseline),
                    **{k: v for k, v in stats.items() if k not in ("alpha", "repeat_penalty")},
                },
            )
            logger.info("labelled %d rows -> %s", len(dataset), cfg.output_dir)
    return stats


def _absolute(name: str) -> str:
    """A local tokenizer as an absolute path (`tokentrain inspect` and the trainer find it from any folder)."""
    return str(Path(name).resolve()) if Path(name).exists() else name
