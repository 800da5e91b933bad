"""Self-distilled data for the heads' phase 1: the frozen base model's own answers to general prompts.

Spec: `specs/concept_heads.md` sections 2 (columns, alignment) and 4 (stage `generate`). The heads must learn the
base model's distribution, not its mode, so completions are *sampled* at temperature 1.0, top_p 1.0 and top_k 0 (all
set explicitly, and none of the model's own `generation_config` sampling defaults such as min_p or a repetition
penalty apply). Prompts are tokenised exactly as the trainer tokenises them (`data.prompt_ids`: the chat template with
the generation prompt for chat rows), batched longest first (little padding), left-padded, strided over processes
with accelerate and returned in input order.

Columns written per row: `prompt` (as given: str or chat messages), `completion` (the decoded sample, special tokens
skipped), `prompt_ids` and `completion_ids` (int32: the exact ids fed to / sampled from the model; the completion ends
with the sampled EOS when there is one), `finish_reason` ("eos" or "length").

The phase-1 trainer trains on the stored ids, not on a re-tokenisation of the text (sampled ids need not be the
canonical tokenisation of their text), after `prepare_generated_dataset` has checked every row: its own tokenisation
of `prompt` must equal `prompt_ids` (error: row and first differing position), decoding `completion_ids` must give
`completion`, and every id must be a valid id of the model. Rows with an empty completion are counted and dropped.
Labels: -100 on the prompt, every completion id (the sampled EOS included).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..data import SignalAlignmentError, require_columns
from ..data import prompt_ids as tokenize_prompt
from ..tokens import IGNORE_INDEX, left_padded

logger = logging.getLogger(__name__)

COLUMNS = ("prompt", "completion", "prompt_ids", "completion_ids", "finish_reason")
FINISH_REASONS = ("eos", "length")


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids that end a sample: the tokenizer's EOS and every EOS of the model's generation config (chat models
    end a turn with their own token, e.g. Llama 3's <|eot_id|>)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, (list, tuple)) else [configured]))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config names an EOS token")
    return sorted(ids)


@torch.no_grad()
def sample_completions(
    dataset,
    model,
    tokenizer,
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    chat_template: str | None = None,
    accelerator=None,
    progress: bool = True,
):
    """Sample one completion per row of `dataset` (column `prompt`, str or chat messages) from the frozen `model`.

    Returns a `datasets.Dataset` with the columns `COLUMNS`, one row per input row in input order, the same on every
    process. Sampling is seeded per process (`seed` + process index), so a run is reproducible for a given process
    count.
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from datasets import Dataset, Sequence, Value
    from transformers import GenerationConfig

    from ..runtime import progress as progress_display

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    if not temperature > 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature > 0, top_p in (0, 1] and top_k >= 0, got {temperature}, {top_p}, {top_k}")
    require_columns(dataset, ["prompt"], hint="01_generate reads general prompts (str or chat messages)")
    accelerator = accelerator or Accelerator()
    rows = list(dataset)
    prompts = [tokenize_prompt(row, tokenizer, chat_template) for row in rows]
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"row {i}: the prompt tokenises to no token")
        if max_positions is not None and len(ids) + max_new_tokens > max_positions:
            raise ValueError(
                f"row {i}: prompt of {len(ids)} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                f"{max_positions} positions: shorten or filter the prompt, or lower max_new_tokens"
            )

    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    # A clean config: generate() fills unset fields from model.generation_config (min_p, repetition_penalty, ...),
    # which would change the distribution sampled from. Swapped in for the call, restored after.
    sampling = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_token_id,
    )

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first
    mine = order[accelerator.process_index :: accelerator.num_processes]
    batches = [mine[j : j + batch_size] for j in range(0, len(mine), batch_size)]
    accelerator.print(
        f"generate: {len(prompts)} prompts, {len(batches)} batches of up to {batch_size} on this process, "
        f"{max_new_tokens} new tokens at temperature {temperature}, top_p {top_p}, top_k {top_k} (0 = off)"
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    saved_config = model.generation_config
    model.generation_config = sampling
    torch.manual_seed(seed + accelerator.process_index)
    results = []
    try:
        for batch in progress_display(batches, desc="Sampling", enabled=progress and accelerator.is_main_process):
            input_ids, attention_mask = left_padded([prompts[i] for i in batch], pad_id)  # (B, T)
            width = input_ids.shape[1]
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=sampling
            )
            for b, i in enumerate(batch):
                generated = out[b, width:].tolist()
                end = next((j for j, t in enumerate(generated) if t in stops), None)
                reason = "length" if end is None else "eos"
                completion_ids = generated if end is None else generated[: end + 1]
                results.append((i, completion_ids, reason))
    finally:
        model.generation_config = saved_config
        model.train(was_training)
    gathered = gather_object(results) if accelerator.num_processes > 1 else results
    by_row = {i: (ids, reason) for i, ids, reason in gathered}
    columns: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    for i, row in enumerate(rows):
        ids, reason = by_row[i]
        columns["prompt"].append(row["prompt"])
        columns["completion"].append(tokenizer.decode(ids, skip_special_tokens=True))
        columns["prompt_ids"].append(prompts[i])
        columns["completion_ids"].append(ids)
        columns["finish_reason"].append(reason)
    counts = {r: columns["finish_reason"].count(r) for r in FINISH_REASONS}
    empty = sum(1 for c in columns["completion"] if not c)
    accelerator.print(
        f"generate: {counts['eos']} completions ended with EOS, {counts['length']} hit max_new_tokens, {empty} empty"
    )
    dataset = Dataset.from_dict(columns)
    features = dataset.features.copy()
    features["prompt_ids"] = features["completion_ids"] = Sequence(Value("int32"))
    return dataset.cast(features)


# ------------------------------------------------------------------------------------------- the trainer's side


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_generated_row(example: dict[str, Any], row: int, tokenizer, vocab_size: int, chat_template=None) -> bool:
    """Check one generated row against this trainer's tokenizer; True if it has a completion to train on.

    Errors (each names the row): `prompt_ids` differ from the trainer's tokenisation of `prompt` (first differing
    position shown), an id outside [0, vocab_size), decoding `completion_ids` does not give `completion`, an unknown
    `finish_reason`.
    """
    stored, own = list(example["prompt_ids"]), tokenize_prompt(example, tokenizer, chat_template)
    if stored != own:
        j = _first_difference(stored, own)

        def show(ids):
            return f"{ids[j]} {tokenizer.decode([ids[j]])!r}" if j < len(ids) else "<end>"

        raise SignalAlignmentError(
            f"row {row}: stored 'prompt_ids' differ from this trainer's tokenisation of `prompt` at position {j} "
            f"(stored {show(stored)}, trainer {show(own)}; lengths {len(stored)} vs {len(own)}). Typical cause: rows "
            "generated with another tokenizer or chat template; re-run the generate stage with this model's tokenizer."
        )
    for column in ("prompt_ids", "completion_ids"):
        for j, t in enumerate(example[column]):
            if not 0 <= t < vocab_size:
                raise ValueError(
                    f"row {row}: {column}[{j}] = {t} is not a token id of this model (vocabulary of {vocab_size}): "
                    "the rows were generated by another model"
                )
    decoded = tokenizer.decode(list(example["completion_ids"]), skip_special_tokens=True)
    if decoded != example["completion"]:
        k = next((k for k, (x, y) in enumerate(zip(decoded, example["completion"])) if x != y), None)
        k = min(len(decoded), len(example["completion"])) if k is None else k
        raise SignalAlignmentError(
            f"row {row}: decoding 'completion_ids' gives {decoded[max(0, k - 20) : k + 40]!r}... but 'completion' has "
            f"{example['completion'][max(0, k - 20) : k + 40]!r}... (first difference at character {k}): the ids and "
            "the text do not belong together, or another tokenizer decoded them"
        )
    reason = example.get("finish_reason")
    if reason is not None and reason not in FINISH_REASONS:
        raise ValueError(f"row {row}: finish_reason {reason!r} is not one of {list(FINISH_REASONS)}")
    return bool(example["completion"])


def prepare_generated_dataset(
    dataset,
    tokenizer,
    vocab_size: int,
    max_length: int | None = None,
    packing: bool = False,
    chat_template: str | None = None,
    name: str = "train",
):
    """Training rows from generated rows: `input_ids` = prompt_ids + completion_ids, `labels` = -100 on the prompt and
    the completion ids, every row checked (`check_generated_row`). Rows with an empty completion, or whose completion
    lies wholly past `max_length`, are dropped and counted; the start is kept on truncation. With `packing`, TRL's
    bfd packing (`seq_lengths` added; sequences never split)."""
    from trl.data_utils import pack_dataset

    require_columns(dataset, list(COLUMNS[:4]), hint="the generate stage writes them (`tokentrain generate`)")

    def build(example, idx):
        keep = check_generated_row(example, idx, tokenizer, vocab_size, chat_template)
        prompt, completion = list(example["prompt_ids"]), list(example["completion_ids"])
        input_ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
        if max_length is not None and len(input_ids) > max_length:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        n_targets = sum(1 for t in labels[1:] if t != IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "_empty": not keep, "_n_targets": n_targets}

    processed = dataset.map(
        build, with_indices=True, remove_columns=dataset.column_names, desc=f"Checking {name} generated rows"
    )
    empty = [i for i, e in enumerate(processed["_empty"]) if e]
    cut = [i for i, (e, n) in enumerate(zip(processed["_empty"], processed["_n_targets"])) if not e and n == 0]
    if empty:
        logger.warning(
            "%s: %d of %d generated rows have an empty completion and are not trained on; first: %s",
            name,
            len(empty),
            len(processed),
            empty[:10],
        )
    if cut:
        logger.warning(
            "%s: %d rows have no completion token left after truncation to %s and are dropped; first: %s",
            name,
            len(cut),
            max_length,
            cut[:10],
        )
    if empty or cut:
        processed = processed.filter(lambda e, n: not e and n > 0, input_columns=["_empty", "_n_targets"])
    processed = processed.select_columns(["input_ids", "labels"])
    if packing:
        if max_length is None:
            raise ValueError("packing needs max_length")
        processed = pack_dataset(processed, max_length, "bfd")
    return processed
