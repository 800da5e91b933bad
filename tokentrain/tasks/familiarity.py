"""Book unlearning metrics (spec `specs/unlearning.md` section 4): familiarity, anchor probability, perplexities.

- `familiarity`: share of prompts (JSONL {prompt, expect: [terms]}) whose greedy continuation of `max_new_tokens` new
  tokens (after BOS + prompt; the prompt is not part of the continuation) contains any expected term under the
  dictionary's rule: case-sensitive, whole words, a space matching any whitespace run. (The WHP paper had GPT-4 sort
  completions of 300 prompts into four classes; this is tokentrain's automatic stand-in.)
- `anchor_prob`: mean of pi(x_j | x_<j) over the term-first positions of the forget rows (the token starting each
  term's first match in its row, whatever the label weight there): how much the model still expects the book's own
  names where they stand.
- `forget_ppl` / `retain_ppl`: exp(mean NLL over completion tokens with a prefix) on the original forget rows /
  held-out retain rows (one token mean over all rows, not a mean of row perplexities).
Pure functions over per-token NLLs / log-probs first, then the helpers that run a model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..signals.anchors import (
    AnchorTerms,
    compile_terms,
    contains_term,
    require_fast_tokenizer,
    row_text,
    term_first_tokens,
    tokenize_with_offsets,
)

# ------------------------------------------------------------------------------------------------ pure metrics


def mentions(text: str, terms: Sequence[str]) -> bool:
    """Whether `text` contains any of `terms` as a whole word, case-sensitively ("Queen" is not in "Queenly")."""
    return contains_term(text, compile_terms([" ".join(t.split()) for t in terms]))


def familiarity(completions: Sequence[str], expects: Sequence[Sequence[str]]) -> float:
    """Share of completions that mention one of their expected terms."""
    if len(completions) != len(expects):
        raise ValueError(f"{len(completions)} completions but {len(expects)} expect lists")
    if not completions:
        raise ValueError("familiarity needs at least one prompt")
    return sum(mentions(c, e) for c, e in zip(completions, expects)) / len(completions)


def perplexity(token_nlls: Sequence[Sequence[float]]) -> float:
    """exp(mean NLL) over every token of every row (token-weighted, not a mean of row perplexities)."""
    n = sum(len(r) for r in token_nlls)
    if n == 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(sum(sum(r) for r in token_nlls) / n)


def anchor_prob(token_logps: Sequence[Sequence[float]], positions: Sequence[Sequence[int]]) -> float:
    """Mean probability exp(logp) over the given completion-token indices of each row (nan when there are none)."""
    probs = [math.exp(row[k]) for row, ks in zip(token_logps, positions) for k in ks]
    return sum(probs) / len(probs) if probs else float("nan")


# ---------------------------------------------------------------------------------------------------- prompts


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Familiarity prompts, one JSON object {prompt: str, expect: [str, ...]} per line; errors name the line."""
    path = Path(str(path))
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not a JSON object ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise ValueError(f"{path}, line {n}: needs a non-empty string `prompt`")
            expect = row.get("expect")
            if isinstance(expect, str):
                expect = [expect]
            if not expect or not all(isinstance(t, str) and t.strip() for t in expect):
                raise ValueError(f"{path}, line {n}: `expect` must be a non-empty list of non-empty terms")
            prompts.append({"prompt": row["prompt"], "expect": list(expect)})
    if not prompts:
        raise ValueError(f"{path}: no prompt")
    return prompts


# ------------------------------------------------------------------------------------------- model-running helpers


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """BOS (EOS when the tokenizer has none) + the prompt's tokens, special tokens not added twice."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [start, *tokenizer(text=prompt, add_special_tokens=False)["input_ids"]]


def complete_prompts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy continuations of `max_new_tokens` new tokens (stopping at EOS), decoded without the prompt."""
    from ..models import generate

    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    return generate(model, tokenizer, ids, max_new_tokens, batch_size=batch_size, desc="Familiarity", progress=False)


def completion_logps(model, tokenizer, rows, batch_size: int = 16, accelerator=None) -> list[list[float]]:
    """log pi(x_j | x_<j) of every completion token with a prefix, per row, as the trainer tokenises the rows."""
    from ..signals.ref_logps import score_ref_logps

    _, logps = score_ref_logps(rows, model, tokenizer, batch_size=batch_size, accelerator=accelerator)
    return logps


def anchor_positions(rows, tokenizer, anchors: AnchorTerms) -> list[list[int]]:
    """Per row, the indices into its completion tokens of the term-first tokens (section 2.6, any weight)."""
    from ..data import target_positions, tokenize_row

    require_fast_tokenizer(tokenizer, "anchor_prob")
    out = []
    for i, example in enumerate(rows):
        tokens = tokenize_row(example, tokenizer)
        s, add_special = row_text(example, tokenizer)
        s_ids, offsets = tokenize_with_offsets(tokenizer, s, add_special)
        if s_ids != tokens["input_ids"]:
            raise ValueError(f"row {i}: the rebuilt text does not tokenise to the trainer's ids; cannot place anchors")
        index = {j: k for k, j in enumerate(target_positions(tokens["labels"]))}
        out.append([index[j] for j in term_first_tokens(offsets, anchors.find(s)) if j in index])
    return out


def evaluate_book(
    model,
    tokenizer,
    prompts: Sequence[dict[str, Any]],
    forget_rows,
    retain_rows=None,
    anchors: AnchorTerms | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    accelerator=None,
) -> tuple[dict[str, float], list[str]]:
    """(metrics, completions) of one model: familiarity, anchor_prob (with a dictionary), forget_ppl, retain_ppl
    (with retain rows); the completions in prompt order, for the stage to write beside the metrics."""
    completions = complete_prompts(model, tokenizer, [p["prompt"] for p in prompts], max_new_tokens, batch_size)
    metrics = {"familiarity": familiarity(completions, [p["expect"] for p in prompts])}
    forget_logps = completion_logps(model, tokenizer, forget_rows, batch_size, accelerator)
    if anchors is not None:
        metrics["anchor_prob"] = anchor_prob(forget_logps, anchor_positions(forget_rows, tokenizer, anchors))
    metrics["forget_ppl"] = perplexity([[-v for v in r] for r in forget_logps])
    if retain_rows is not None:
        retain_logps = completion_logps(model, tokenizer, retain_rows, batch_size, accelerator)
        metrics["retain_ppl"] = perplexity([[-v for v in r] for r in retain_logps])
    return metrics, completions
