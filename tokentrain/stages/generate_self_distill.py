"""`stage: generate`, task `self_distill`: the frozen base model's own answers to general prompts, the data of the
concept heads' phase 1 (spec `specs/concept_heads.md` sections 2 and 4).

One completion per prompt, sampled at `temperature` / `top_p` / `top_k` exactly (1.0 / 1.0 / 0 by default: the heads
must learn the model's distribution, not its mode) by `signals.self_distill.sample_completions`, which writes
`prompt`, `completion`, `prompt_ids`, `completion_ids` (the exact ids, int32) and `finish_reason`. The output is a
saved `datasets` folder that the `train` stage (objective concept_heads, phase heads) reads as it is, plus
`generate_summary.json`.

Prompts are the rows' `prompt` column (str, or chat messages), or with `messages_column` the first user turn of each
row's conversation (CAFT's auxiliary-head dataset: `conversation`), sent through the chat template. Rows are sampled in
chunks of `chunk_rows`, each saved when complete with its own seed (`seed`, chunk index): a killed run resumes at the
first missing chunk and gives the same samples as an uninterrupted one (for a given number of processes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field

from ..runtime import distributed_state
from .base import ConfigError, ModelKeys, RowsStage, Stage, StageContext, load_stage_rows, require, stage_output

logger = logging.getLogger(__name__)


@dataclass
class Config(RowsStage, ModelKeys):
    model: str = field(default="", metadata={"help": "The frozen base model that answers (hub name or folder)."})
    task: str = field(default="self_distill", metadata={"help": "'self_distill': one sampled answer per prompt."})
    messages_column: str = field(
        default="",
        metadata={
            "help": "Column of chat messages whose first user turn is the prompt (e.g. 'conversation'); empty: the "
            "`prompt` column (or prompt_template)."
        },
    )
    max_prompt_length: int = field(
        default=0, metadata={"help": "Skip (and count) prompts of more tokens than this; 0: keep every prompt."}
    )
    max_new_tokens: int = field(default=1024, metadata={"help": "Tokens sampled at most per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (spec: 1.0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0 = off, the spec's)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off, the spec's)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate call (longest first)."})
    chunk_rows: int = field(
        default=1024, metadata={"help": "Prompts per saved chunk: a killed run resumes at the first missing chunk."}
    )


def run(stage: Stage, ctx: StageContext) -> None:
    cfg = stage.config
    if cfg.task != "self_distill":
        raise ConfigError(f"{stage.name}: task must be 'self_distill' here, got {cfg.task!r}")
    require(stage, "model", "dataset")
    for key in ("max_new_tokens", "batch_size", "chunk_rows"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{stage.name}: {key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.max_prompt_length < 0:
        raise ConfigError(f"{stage.name}: max_prompt_length must be >= 0 (0: no limit), got {cfg.max_prompt_length}")
    if not cfg.temperature > 0 or not 0 < cfg.top_p <= 1 or cfg.top_k < 0:
        raise ConfigError(
            f"{stage.name}: need temperature > 0, top_p in (0, 1] and top_k >= 0; got temperature {cfg.temperature}, "
            f"top_p {cfg.top_p}, top_k {cfg.top_k}"
        )
    from accelerate import Accelerator

    from ..models import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model, revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code)
    prompts, skipped = _prompts(stage, tokenizer)
    n_chunks = -(-len(prompts) // cfg.chunk_rows)
    accelerator = Accelerator()
    state = distributed_state()
    with stage_output(stage, ctx, keep_partial=True) as tmp:
        chunk_dir = tmp / "chunks"
        if state.is_main_process:
            chunk_dir.mkdir(exist_ok=True)
        state.wait_for_everyone()
        todo = [c for c in range(n_chunks) if not (chunk_dir / _chunk_name(c)).is_dir()]
        if len(todo) < n_chunks:
            logger.info("%s: resuming, %d of %d chunks already sampled", stage.name, n_chunks - len(todo), n_chunks)
        if todo:
            model = load_model(cfg.model, merge_adapter=True, trainable=False, **cfg.model_kwargs(trainable=False))
            model = model.to(accelerator.device)
            for c in todo:
                _sample_chunk(cfg, prompts, c, model, tokenizer, accelerator, chunk_dir)
        state.wait_for_everyone()
        if state.is_main_process:
            _write(stage, tmp, chunk_dir, n_chunks, skipped)


def _chunk_name(c: int) -> str:
    return f"chunk-{c:06d}"


def _prompts(stage: Stage, tokenizer):
    """(rows with a `prompt`, {reason: count} of the rows skipped): the first user turn of `messages_column` when it is
    set, rows whose prompt is longer than `max_prompt_length` tokens left out."""
    from datasets import Dataset

    from ..data import prompt_ids, require_columns

    cfg = stage.config
    rows = load_stage_rows(cfg)
    skipped = {"no_user_turn": 0, "too_long": 0}
    if cfg.messages_column:
        require_columns(rows, [cfg.messages_column], hint=f"{stage.name}: messages_column names it")
        prompts = []
        for i, messages in enumerate(rows[cfg.messages_column]):
            if not isinstance(messages, list):
                raise ValueError(
                    f"{stage.name}: row {i}: {cfg.messages_column!r} must be a list of {{role, content}} messages, got "
                    f"{type(messages).__name__}"
                )
            user = next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
            if not user:
                skipped["no_user_turn"] += 1
                continue
            prompts.append({"prompt": [{"role": "user", "content": user}]})
        rows = Dataset.from_list(prompts) if prompts else Dataset.from_dict({"prompt": []})
    else:
        require_columns(rows, ["prompt"], hint=f"{stage.name}: set prompt_template, or messages_column")
        rows = rows.select_columns(["prompt"])
    if cfg.max_prompt_length:
        keep = [i for i, row in enumerate(rows) if len(prompt_ids(row, tokenizer)) <= cfg.max_prompt_length]
        skipped["too_long"] = len(rows) - len(keep)
        rows = rows.select(keep)
    if len(rows) == 0:
        raise ValueError(f"{stage.name}: no prompt to answer in {cfg.dataset} (skipped: {skipped})")
    if any(skipped.values()):
        logger.warning("%s: %d prompts kept; skipped %s", stage.name, len(rows), skipped)
    return rows, skipped


def _sample_chunk(cfg, prompts, c: int, model, tokenizer, accelerator, chunk_dir) -> None:
    """Sample chunk `c` on every process (rows strided over them, gathered) and save it from the main process."""
    from ..signals.self_distill import sample_completions

    part = prompts.select(range(c * cfg.chunk_rows, min((c + 1) * cfg.chunk_rows, len(prompts))))
    out = sample_completions(
        part,
        model,
        tokenizer,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        seed=cfg.seed * 1_000_003 + c,  # per chunk: the same samples however often the run is interrupted
        accelerator=accelerator,
    )
    if accelerator.is_main_process:
        partial = chunk_dir / (_chunk_name(c) + ".part")
        if partial.exists():
            shutil.rmtree(partial)
        out.save_to_disk(str(partial))
        os.replace(partial, chunk_dir / _chunk_name(c))  # a chunk exists whole or not at all
    accelerator.wait_for_everyone()


def _write(stage: Stage, tmp, chunk_dir, n_chunks: int, skipped: dict) -> None:
    """Concatenate the chunks into the output dataset, write generate_summary.json, remove the chunks."""
    from datasets import concatenate_datasets, load_from_disk

    cfg = stage.config
    rows = concatenate_datasets([load_from_disk(str(chunk_dir / _chunk_name(c))) for c in range(n_chunks)])
    rows = rows.flatten_indices()  # own arrow files, not views of the chunks about to be removed
    rows.save_to_disk(str(tmp))
    shutil.rmtree(chunk_dir)
    reasons = rows["finish_reason"]
    lengths = [len(ids) for ids in rows["completion_ids"]]
    summary = {
        "stage": stage.name,
        "model": cfg.model,
        "rows": len(rows),
        "skipped": skipped,
        "eos": reasons.count("eos"),
        "length": reasons.count("length"),
        "empty": sum(1 for c in rows["completion"] if not c),
        "mean_completion_tokens": sum(lengths) / max(len(lengths), 1),
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "max_new_tokens": cfg.max_new_tokens,
    }
    (tmp / "generate_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(
        "%s: %d completions (%d ended with EOS, %d hit max_new_tokens, %d empty), %.1f tokens on average",
        stage.name,
        summary["rows"],
        summary["eos"],
        summary["length"],
        summary["empty"],
        summary["mean_completion_tokens"],
    )
