"""`stage: score`: run frozen models over a dataset once and store token-aligned signal columns beside the rows.

Signals: `ref_logps` (a reference model's per-token log-probs, with `completion_ids`; weighted_ntp) and `contrastive`
(pos/neg models -> `rejected_weights` beside TRL's `prompt_ids`/`chosen_ids`/`rejected_ids`; critical_dpo). The output
is a saved `datasets` folder with `signal_meta.json` naming the tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .base import ConfigError, ModelKeys, RowsStage, Stage, StageContext, load_stage_rows, require, stage_output

logger = logging.getLogger(__name__)

SIGNALS = ("ref_logps", "contrastive")


@dataclass
class Config(RowsStage, ModelKeys):
    signal: str = field(default="ref_logps", metadata={"help": "Signal to compute: ref_logps or contrastive."})
    model: str = field(default="", metadata={"help": "ref_logps: the frozen reference model (hub name or folder)."})
    pos_model: str = field(default="", metadata={"help": "contrastive: the positive model (folder or adapter)."})
    neg_model: str = field(default="", metadata={"help": "contrastive: the negative model (folder or adapter)."})
    ce_beta: float = field(default=1.0, metadata={"help": "contrastive: b in (1+b)·z⁺ − b·z⁻."})
    score_chosen: bool = field(default=False, metadata={"help": "contrastive: also write chosen_weights (s_t)."})
    chunk_size: int = field(default=1024, metadata={"help": "contrastive: positions projected to logits at once."})
    max_prompt_length: int = field(default=512, metadata={"help": "contrastive: drop rows with a longer prompt."})
    max_length: int = field(default=1024, metadata={"help": "contrastive: drop rows with longer prompt+completion."})
    tokenizer: str = field(default="", metadata={"help": "The policy's tokenizer (default: the reference's)."})
    drop_prompt: bool = field(default=False, metadata={"help": "Score completions seen after [BOS] alone."})
    batch_size: int = field(default=16, metadata={"help": "Rows per forward (sorted by length, longest first)."})


def run(stage: Stage, ctx: StageContext) -> None:
    cfg = stage.config
    for key in ("batch_size", "chunk_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{stage.name}: {key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.signal == "contrastive":
        return _score_contrastive(stage, ctx)
    if cfg.signal != "ref_logps":
        raise ConfigError(f"{stage.name}: signal must be one of {list(SIGNALS)}, got {cfg.signal!r}")
    _score_ref_logps(stage, ctx)


def _score_ref_logps(stage: Stage, ctx: StageContext) -> None:
    """Frozen reference -> `completion_ids` + `ref_logps` columns, written beside the input columns."""
    from accelerate import Accelerator

    from ..data import write_meta
    from ..models import check_same_vocab, has_tokenizer, load_model, load_tokenizer, vocab_size
    from ..signals.ref_logps import policy_prompt_ids, score_ref_logps

    cfg = stage.config
    require(stage, "model", "dataset")
    accelerator = Accelerator()
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    reference = load_model(cfg.model, trainable=False, **cfg.model_kwargs(trainable=False)).to(accelerator.device)
    own = load_tokenizer(cfg.model) if cfg.tokenizer and has_tokenizer(cfg.model) else None
    check_same_vocab(tokenizer, reference, f"reference model {cfg.model}", model_tokenizer=own)
    dataset = load_stage_rows(cfg)
    with stage_output(stage, ctx) as tmp:
        ids, logps = score_ref_logps(
            dataset, reference, tokenizer, cfg.drop_prompt, cfg.batch_size, accelerator=accelerator
        )
        if accelerator.is_main_process:
            from datasets import Sequence, Value

            columns = {
                "prompt_ids": (policy_prompt_ids(dataset, tokenizer), "int32"),
                "completion_ids": (ids, "int32"),
                "ref_logps": (logps, "float32"),
            }
            dataset = dataset.remove_columns([c for c in columns if c in dataset.column_names])
            for name, (values, dtype) in columns.items():
                dataset = dataset.add_column(name, values, feature=Sequence(Value(dtype)))
            dataset.save_to_disk(str(tmp))
            write_meta(
                tmp,
                {
                    "signal": "ref_logps",
                    "reference": cfg.model,
                    "drop_prompt": cfg.drop_prompt,
                    "tokenizer": _tokenizer_name(tokenizer),
                    "vocab_size": len(tokenizer),
                    "reference_vocab_size": vocab_size(reference),
                    "rows": len(dataset),
                },
            )
            logger.info("scored %d rows (%d tokens) -> %s", len(ids), sum(map(len, ids)), cfg.output_dir)


def _score_contrastive(stage: Stage, ctx: StageContext) -> None:
    """pos/neg models -> `prompt_ids`, `chosen_ids`, `rejected_ids`, `rejected_weights` [, `chosen_weights`] columns
    (spec critical_dpo section 2); rows the length filter drops are left out, the others keep their columns."""
    from accelerate import Accelerator

    from ..data import write_meta
    from ..models import check_same_vocab, has_tokenizer, load_model, load_tokenizer
    from ..signals.contrastive import score_contrastive

    cfg = stage.config
    require(stage, "pos_model", "neg_model", "dataset", why="(signal 'contrastive')")
    if Path(cfg.pos_model).resolve() == Path(cfg.neg_model).resolve() or cfg.pos_model == cfg.neg_model:
        raise ConfigError(
            f"{stage.name}: pos_model and neg_model are both {cfg.pos_model!r}; the contrastive estimate needs the "
            "positive and the negative fine-tunes"
        )
    accelerator = Accelerator()
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.pos_model)
    models = {}
    for side in ("pos_model", "neg_model"):
        path = getattr(cfg, side)
        model = load_model(path, merge_adapter=True, trainable=False, **cfg.model_kwargs(trainable=False))
        own = load_tokenizer(path) if has_tokenizer(path) else None
        check_same_vocab(tokenizer, model.to(accelerator.device), f"{side} {path}", model_tokenizer=own)
        models[side] = model
    dataset = load_stage_rows(cfg)
    require_cols = [c for c in ("prompt", "chosen", "rejected") if c not in dataset.column_names]
    if require_cols:
        raise KeyError(
            f"{cfg.dataset}: preference rows need columns prompt, chosen, rejected; missing {require_cols} (a "
            "generate stage writes them to <output_dir>/pairs.jsonl)"
        )
    with stage_output(stage, ctx) as tmp:
        columns = score_contrastive(
            dataset,
            models["pos_model"],
            models["neg_model"],
            tokenizer,
            ce_beta=cfg.ce_beta,
            score_chosen=cfg.score_chosen,
            batch_size=cfg.batch_size,
            chunk_size=cfg.chunk_size,
            max_prompt_length=cfg.max_prompt_length,
            max_length=cfg.max_length,
            accelerator=accelerator,
        )
        if accelerator.is_main_process:
            from datasets import Sequence, Value

            kept = columns.pop("kept_rows")
            n_rows, dataset = len(dataset), dataset.select(kept)
            for name, values in columns.items():
                if name in dataset.column_names:
                    dataset = dataset.remove_columns(name)
                dtype = "int32" if name.endswith("_ids") else "float32"
                dataset = dataset.add_column(name, values, feature=Sequence(Value(dtype)))
            dataset.save_to_disk(str(tmp))
            weights = [w for row in columns["rejected_weights"] for w in row]
            meta = {
                "signal": "contrastive",
                "pos_model": cfg.pos_model,
                "neg_model": cfg.neg_model,
                "ce_beta": cfg.ce_beta,
                "score_chosen": cfg.score_chosen,
                "tokenizer": _tokenizer_name(tokenizer),
                "vocab_size": len(tokenizer),
                "rows": len(dataset),
                "dropped_rows": n_rows - len(kept),
                "rejected_weight_mean": sum(weights) / max(len(weights), 1),
                "rejected_weight_above_half": sum(w > 0.5 for w in weights) / max(len(weights), 1),
            }
            write_meta(tmp, meta)
            logger.info(
                "scored %d pairs (%d rejected tokens): mean rejected weight %.3f, %.1f%% of tokens above 0.5 -> %s",
                len(dataset),
                len(weights),
                meta["rejected_weight_mean"],
                100 * meta["rejected_weight_above_half"],
                cfg.output_dir,
            )


def _tokenizer_name(tokenizer) -> str:
    """The tokenizer as `tokentrain inspect` finds it from any folder: an absolute path for a local one."""
    name = tokenizer.name_or_path
    return str(Path(name).resolve()) if Path(name).exists() else name
