"""Scoring pass: WHP generic labels (spec `specs/unlearning.md` sections 2.4-2.6).

For every completion position j of a forget row (tokenised exactly as TRL 1.16's SFTTrainer does), in float32:

    v_b = baseline logits row q_j - 1 on the translated text z      v_r = reinforced logits row j - 1 on s
    v_g = v_b - alpha * ReLU(v_r - v_b) - rho * 1[v in P_j]          target_j = argmax v_g

(`losses.unlearning.generic_labels`). token_weights[j] = 1.0 where j is aligned (`anchors.align_row`) and not inside
a later match of a term already seen in the row (rule (a)); elsewhere 0.0 and target_j = x_j. Without a dictionary,
z = s and q_j = j: reinforcement-only labels, every position with a prefix weighted.

Memory: both backbones run once per batch (hidden states (B, T, H)); only the weighted positions are gathered, (N, H),
and projected through each LM head by the path `signals.head.plan_head` picks from N, V and the device (direct: at
most `chunk_size` positions of full (n, V) logits; fused: (n, vocab tile) tiles with running argmaxes), keeping only
the argmaxes, never (B, T, V) logits. Rows are sorted by length (longest first), strided over processes
with accelerate and returned in input order on every process.

Errors: models of different logit widths or tokenizer vocabularies (both named, first differing token), a dictionary
with a slow tokenizer, a row whose completion tokenises to nothing, a row (original or translated) longer than the
models' positions (never truncated), `alpha` < 0 or not finite, `repeat_penalty` < 0, no dictionary match at all.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from trl.data_utils import common_prefix_length

from ..data import context_ids_of, row_kind, target_positions, tokenize_row
from ..losses.unlearning import generic_labels, generic_logits
from ..models import causal_lm
from ..runtime import progress
from ..tokens import IGNORE_INDEX
from .anchors import (
    AnchorTerms,
    align_row,
    check_match_counts,
    require_fast_tokenizer,
    row_text,
    tokenize_with_offsets,
)
from .head import head_device, hidden_states, logit_transform, logit_width, plan_head, project

logger = logging.getLogger(__name__)

PENALTY_MASK_ELEMENTS = 1 << 26  # rule (b)'s (n, V) bool mask is built at most this large (64 MiB)


@dataclass
class _Row:
    """One forget row, ready to score: both token sequences and the completion positions to label."""

    s_ids: list[int]  # what the policy and the reinforced model read
    z_ids: list[int]  # what the baseline reads (= s_ids without a dictionary)
    positions: list[int]  # completion positions j (input index of the token x_j), ascending
    context: list[int]  # the row's tokens that are not targets (its prompt), stored as `prompt_ids`
    q: list[int | None]  # per completion position: baseline row + 1, or None when not aligned
    weighted: list[bool]  # per completion position: aligned and not zeroed by rule (a)
    term_first: list[bool]  # per completion position
    penalty: list[list[int]]  # per completion position: rule (b)'s token ids
    n_matches: int


def _model_name(model, fallback: str) -> str:
    return getattr(causal_lm(model).config, "_name_or_path", "") or fallback


def check_label_models(baseline, reinforced, tokenizer, reinforced_tokenizer=None) -> None:
    """Baseline and reinforced must share the vocabulary: logit width and, when given, the tokenizers' vocab."""
    b_name, r_name = _model_name(baseline, "baseline"), _model_name(reinforced, "reinforced")
    b_width, r_width = logit_width(baseline), logit_width(reinforced)
    if b_width != r_width:
        raise ValueError(
            f"baseline {b_name!r} has {b_width} logits per position but reinforced {r_name!r} has {r_width}: the "
            "reinforced model must be a fine-tune of the baseline (same vocabulary)"
        )
    if len(tokenizer) > b_width:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but baseline {b_name!r} produces only {b_width} logits: it "
            "is not the baseline's tokenizer"
        )
    if reinforced_tokenizer is not None:
        own, other = tokenizer.get_vocab(), reinforced_tokenizer.get_vocab()
        if own != other:
            by_id_b = {i: t for t, i in own.items()}
            by_id_r = {i: t for t, i in other.items()}
            first = min(i for i in set(by_id_b) | set(by_id_r) if by_id_b.get(i) != by_id_r.get(i))
            raise ValueError(
                f"baseline {b_name!r} and reinforced {r_name!r} have different tokenizer vocabularies ({len(own)} vs "
                f"{len(other)} tokens); first differing id {first}: {by_id_b.get(first)!r} vs {by_id_r.get(first)!r}"
            )


def _plain_row_tokens(example, tokenizer) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """(input_ids, labels, offsets) of a plain-text prompt/completion row from one encoding of s with offsets: what
    `data.tokenize_row` gives (ids of prompt + completion + EOS; targets from the common prefix with the prompt's ids,
    TRL 1.16), without encoding the whole row a second time. The trainer re-tokenises every row with `tokenize_row`
    and refuses stored ids that differ, naming the row."""
    s, add_special = row_text(example, tokenizer)
    ids, offsets = tokenize_with_offsets(tokenizer, s, add_special)
    prompt_ids = tokenize_with_offsets(tokenizer, example["prompt"], add_special)[0]
    n_prompt = common_prefix_length(prompt_ids, ids)
    return ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:], offsets


def _prepare_row(i, example, tokenizer, anchors: AnchorTerms | None, chat_template) -> tuple[_Row, dict[str, int]]:
    plain = anchors is not None and row_kind(example) == "prompt_completion" and isinstance(example["prompt"], str)
    if plain:  # the offsets are needed anyway: one encoding of the row
        ids, labels, s_offsets = _plain_row_tokens(example, tokenizer)
    else:
        tokens = tokenize_row(example, tokenizer, chat_template)
        ids, labels = tokens["input_ids"], tokens["labels"]
    positions = target_positions(labels)
    if not positions:
        raise ValueError(f"row {i}: the completion tokenises to nothing; drop the row or give it text")
    if anchors is None:
        k = len(positions)
        context = context_ids_of(ids, labels)
        row = _Row(ids, ids, positions, context, list(positions), [True] * k, [False] * k, [[] for _ in range(k)], 0)
        return row, {}

    s, add_special = row_text(example, tokenizer, chat_template)
    if not plain:
        s_ids, s_offsets = tokenize_with_offsets(tokenizer, s, add_special)
        if s_ids != ids:
            raise ValueError(
                f"row {i}: the text rebuilt for anchor matching does not tokenise to the trainer's ids (unusual chat "
                "template?); anchored terms cannot be aligned on this row"
            )
    matches = anchors.find(s)
    z = anchors.translate(s, matches)
    z_ids, z_offsets = tokenize_with_offsets(tokenizer, z, add_special)
    align = align_row(s_offsets, z_offsets, z_ids, matches, anchors.terms)
    q = [align.q[j] for j in positions]
    weighted = [align.q[j] is not None and not align.repeat[j] for j in positions]
    row = _Row(
        s_ids=ids,
        z_ids=z_ids,
        positions=positions,
        context=context_ids_of(ids, labels),
        q=q,
        weighted=weighted,
        term_first=[align.term_first[j] for j in positions],
        penalty=[align.penalty[j] if w else [] for j, w in zip(positions, weighted)],
        n_matches=len(matches),
    )
    counts: dict[str, int] = {}
    for m in matches:
        counts[m.term] = counts.get(m.term, 0) + 1
    return row, counts


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T) right-padded
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.tensor(s)
        attention_mask[b, : len(s)] = 1
    return input_ids, attention_mask


def _penalty_mask(penalties, rows: slice, start: int, end: int, device) -> torch.Tensor:
    """Rule (b)'s (n, end - start) bool mask of positions `rows` over vocabulary ids [start, end)."""
    pen_rows, pen_ids = penalties
    sel = (pen_rows >= rows.start) & (pen_rows < rows.stop) & (pen_ids >= start) & (pen_ids < end)
    mask = torch.zeros((rows.stop - rows.start, end - start), dtype=torch.bool, device=device)  # (n, v)
    mask[(pen_rows[sel] - rows.start).to(device), (pen_ids[sel] - start).to(device)] = True
    return mask


def _labels(baseline, reinforced, h_b, h_r, alpha, penalty, penalties, transforms, plan):
    """(generic labels, baseline argmax) of N positions, long (N,) each, from the hidden states (N, H) of each model
    by `plan`'s path. Ties go to the lowest id on both paths (torch.argmax; a later tile must be strictly larger)."""
    device, vocab = head_device(baseline), logit_width(baseline)
    n = h_b.shape[0]
    targets, base_top = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)  # (N,) each
    for sl in plan.chunks(n):
        k = sl.stop - sl.start
        best = {
            "g": torch.full((k,), float("-inf"), device=device),
            "b": torch.full((k,), float("-inf"), device=device),
        }
        arg = {
            "g": torch.zeros(k, dtype=torch.long, device=device),
            "b": torch.zeros(k, dtype=torch.long, device=device),
        }
        for start, end in plan.tiles(vocab):
            v_b = project(baseline, h_b[sl], transforms[0], start, end)  # (n, v) float32
            v_r = project(reinforced, h_r[sl], transforms[1], start, end).to(device)  # (n, v) float32
            mask = _penalty_mask(penalties, sl, start, end, device) if penalty > 0 else None
            if plan.path == "direct":  # one tile: the loss's own function
                arg["b"] = v_b.argmax(dim=-1)
                arg["g"] = generic_labels(v_b, v_r, alpha, mask, penalty, inplace=True)
                continue
            for key, v in (("b", v_b), ("g", generic_logits(v_b, v_r, alpha, mask, penalty, inplace=True))):
                value, index = v.max(dim=-1)  # (n,) first maximum within the tile
                better = value > best[key]
                best[key] = torch.where(better, value, best[key])
                arg[key] = torch.where(better, index + start, arg[key])
        targets[sl], base_top[sl] = arg["g"].cpu(), arg["b"].cpu()
    return targets, base_top


@torch.no_grad()
def score_whp_labels(
    dataset,
    baseline,
    reinforced,
    tokenizer,
    anchors: AnchorTerms | None = None,
    alpha: float = 5.0,
    repeat_penalty: float = 0.0,
    batch_size: int = 8,
    chunk_size: int = 4096,
    accelerator=None,
    chat_template: str | None = None,
    reinforced_tokenizer=None,
    head_path: str = "auto",
) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Generic labels of every row of `dataset` (prompt/completion, text or chat rows).

    Returns (columns, stats). `columns`, one entry per row in input order (the same on every process):
    `completion_ids` (list[int]), `target_ids` (list[int]), `token_weights` (list[float], 0.0/1.0), all of length
    |completion_ids|, `prompt_ids` (list[int], the row's other tokens: the trainer checks the context too) and
    `n_anchor_matches` (int). `stats` is what the stage writes to stats.json: rows, positions,
    weighted, changed, flipped, term_first, leak, anchor_matches, alpha, repeat_penalty (section 2.6).
    `head_path` forces the head computation ("direct" or "fused", `signals.head.plan_head`); "auto" picks it per
    batch, `chunk_size` caps its positions per chunk.
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if not (math.isfinite(repeat_penalty) and repeat_penalty >= 0):
        raise ValueError(f"repeat_penalty must be a finite number >= 0, got {repeat_penalty!r}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    check_label_models(baseline, reinforced, tokenizer, reinforced_tokenizer)
    if anchors is not None:
        require_fast_tokenizer(tokenizer)
    accelerator = accelerator or Accelerator()

    # ---- tokenise, match, align: every process the same
    rows: list[_Row] = []
    counts = dict.fromkeys(anchors.terms, 0) if anchors is not None else {}
    for i, example in enumerate(dataset):
        row, row_counts = _prepare_row(i, example, tokenizer, anchors, chat_template)
        for term, n in row_counts.items():
            counts[term] += n
        rows.append(row)
    if not rows:
        raise ValueError("the forget dataset has no row")
    if anchors is not None:
        accelerator.print(check_match_counts(anchors, counts))
    max_positions = min(
        getattr(causal_lm(m).config.get_text_config(), "max_position_embeddings", None) or 1 << 62
        for m in (baseline, reinforced)
    )
    for i, row in enumerate(rows):
        for what, ids in (("original", row.s_ids), ("translated", row.z_ids)):
            if len(ids) > max_positions:
                raise ValueError(
                    f"row {i} has {len(ids)} tokens ({what} text) but the models read at most {max_positions}: "
                    "lower block_tokens or shorten the row (labels are never truncated)"
                )
    n_weighted = sum(sum(r.weighted) for r in rows)
    accelerator.print(
        f"score whp_labels: {len(rows)} rows, {sum(len(r.positions) for r in rows)} completion positions, "
        f"{n_weighted} to label; alpha {alpha}, repeat_penalty {repeat_penalty}, "
        f"dictionary {anchors.source + f' ({len(anchors)} terms)' if anchors is not None else 'none'}, "
        f"batch {batch_size}, chunk {chunk_size} positions"
    )

    # ---- longest first, strided over processes
    order = sorted(range(len(rows)), key=lambda i: -max(len(rows[i].s_ids), len(rows[i].z_ids)))
    mine = order[accelerator.process_index :: accelerator.num_processes]
    batches = [mine[k : k + batch_size] for k in range(0, len(mine), batch_size)]

    baseline.eval()
    reinforced.eval()
    transforms = (logit_transform(baseline), logit_transform(reinforced))
    vocab = logit_width(baseline)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    for batch in progress(batches, desc="Scoring (whp_labels)", enabled=accelerator.is_main_process):
        # (b, baseline row, reinforced row) of every weighted position, row by row
        b_idx, z_pos, s_pos, pen_rows, pen_ids = [], [], [], [], []
        for b, i in enumerate(batch):
            row = rows[i]
            for j, q, w, pen in zip(row.positions, row.q, row.weighted, row.penalty):
                if w:
                    pen_rows += [len(b_idx)] * len(pen)
                    pen_ids += pen
                    b_idx.append(b)
                    z_pos.append(q - 1)
                    s_pos.append(j - 1)
        n = len(b_idx)
        targets = base_top = torch.zeros(n, dtype=torch.long)
        if n:
            z_ids, z_mask = _pad([rows[i].z_ids for i in batch], pad_id)
            s_ids, s_mask = _pad([rows[i].s_ids for i in batch], pad_id)
            hidden_b = hidden_states(baseline, z_ids, z_mask)  # (B, Tz, H)
            hidden_r = hidden_states(reinforced, s_ids, s_mask)  # (B, Ts, H)
            idx_b = torch.tensor(b_idx)
            h_b = hidden_b[idx_b.to(hidden_b.device), torch.tensor(z_pos, device=hidden_b.device)]  # (N, H)
            h_r = hidden_r[idx_b.to(hidden_r.device), torch.tensor(s_pos, device=hidden_r.device)]  # (N, H)
            plan = plan_head(n, vocab, head_device(baseline), 2, head_path)
            cap = (
                chunk_size if repeat_penalty == 0 else max(1, min(chunk_size, PENALTY_MASK_ELEMENTS // plan.vocab_tile))
            )
            plan = dataclasses.replace(plan, rows=min(plan.rows, cap))
            penalties = (torch.tensor(pen_rows, dtype=torch.long), torch.tensor(pen_ids, dtype=torch.long))
            targets, base_top = _labels(
                baseline, reinforced, h_b, h_r, alpha, repeat_penalty, penalties, transforms, plan
            )
        counts_per_row = torch.bincount(torch.tensor(b_idx, dtype=torch.long), minlength=len(batch)).tolist()
        for i, t, top in zip(batch, targets.split(counts_per_row), base_top.split(counts_per_row)):
            results.append((i, t.tolist(), top.tolist()))

    gathered = gather_object(results) if accelerator.num_processes > 1 else results
    by_row = {i: (t, top) for i, t, top in gathered}

    names = ("completion_ids", "target_ids", "token_weights", "prompt_ids", "n_anchor_matches")
    columns: dict[str, list[Any]] = {name: [] for name in names}
    totals = {"positions": 0, "weighted": 0, "changed": 0, "flipped": 0, "term_first": 0, "leak": 0}
    for i, row in enumerate(rows):
        completion = [row.s_ids[j] for j in row.positions]
        labels_iter = iter(zip(*by_row[i]))
        target_ids, weights = [], []
        for x, w, first in zip(completion, row.weighted, row.term_first):
            if not w:
                target_ids.append(x)
                weights.append(0.0)
                continue
            t, top = next(labels_iter)
            target_ids.append(t)
            weights.append(1.0)
            totals["weighted"] += 1
            totals["changed"] += t != x
            totals["flipped"] += t != top
            if first:
                totals["term_first"] += 1
                totals["leak"] += t == x
        totals["positions"] += len(completion)
        columns["completion_ids"].append(completion)
        columns["target_ids"].append(target_ids)
        columns["token_weights"].append(weights)
        columns["prompt_ids"].append(row.context)
        columns["n_anchor_matches"].append(row.n_matches)

    weighted = totals["weighted"]
    stats = {
        "rows": len(rows),
        "positions": totals["positions"],
        "weighted": weighted,
        "changed": totals["changed"] / weighted if weighted else 0.0,
        "flipped": totals["flipped"] / weighted if weighted else 0.0,
        "term_first": totals["term_first"],
        "leak": totals["leak"] / totals["term_first"] if totals["term_first"] else 0.0,
        "anchor_matches": sum(r.n_matches for r in rows),
        "alpha": alpha,
        "repeat_penalty": repeat_penalty,
    }
    accelerator.print("whp_labels stats: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
    return columns, stats


# ---------------------------------------------------------------------------------------------------------- inspect


def label_token_rows(
    dataset, tokenizer, anchors: AnchorTerms | None = None, rows: list[int] | None = None, chat_template=None
) -> list[list[dict[str, Any]]]:
    """What `tokentrain inspect` shows of a whp_labels dataset (spec section 4): per row of `rows` (default all) and
    per completion token x_j, one dict

        position   j, the token's index in the row's input ids
        id, token  x_j and its text (`tokenizer.decode([id])`)
        target_id, target   the generic label and its text (= x_j where the weight is 0)
        weight     token_weights[j] (0.0 / 1.0)
        changed    target_id != id
        where      "first" (x_j starts a term's first match in the row), "in" (inside a first match), "repeat"
                   (inside a later match of a term already seen: rule (a), weight 0), "after" (the token right after
                   a match: its prefix ends at the match's end, the position mapped to the end of the translation),
                   or "" (no dictionary, or elsewhere)
        term       the dictionary key of the match x_j lies in (or, for "after", the one it follows), else None

    `anchors` is the dictionary the labels were scored with (signal_meta.json's `anchor_terms`). The row is
    re-tokenised; ids that differ from the stored `completion_ids` are an error naming the row (another tokenizer).
    """
    for column in ("completion_ids", "target_ids", "token_weights"):
        if column not in dataset.column_names:
            raise KeyError(f"not a whp_labels dataset: no column {column!r} (has {dataset.column_names})")
    out = []
    for i in range(len(dataset)) if rows is None else rows:
        example = dataset[i]
        tokens = tokenize_row(example, tokenizer, chat_template)
        ids, positions = tokens["input_ids"], target_positions(tokens["labels"])
        stored = list(example["completion_ids"])
        if [ids[j] for j in positions] != stored:
            raise ValueError(
                f"row {i}: the tokenizer does not give the stored completion_ids (labels scored with another tokenizer?)"
            )
        where, term = [""] * len(ids), [None] * len(ids)
        if anchors is not None:
            s, add_special = row_text(example, tokenizer, chat_template)
            s_ids, offsets = tokenize_with_offsets(tokenizer, s, add_special)
            matches = anchors.find(s)
            z_ids, z_offsets = tokenize_with_offsets(tokenizer, anchors.translate(s, matches), add_special)
            align = align_row(offsets, z_offsets, z_ids, matches, anchors.terms)
            ends = {m.end: m.term for m in matches}
            for j, (a, b) in enumerate(offsets):
                hit = next((m for m in matches if a < m.end and b > m.start), None)
                if align.term_first[j]:
                    where[j] = "first"
                elif align.repeat[j]:
                    where[j] = "repeat"
                elif align.in_match[j]:
                    where[j] = "in"
                elif j >= 1 and offsets[j - 1][1] in ends:
                    where[j], hit = "after", None
                    term[j] = ends[offsets[j - 1][1]]
                if hit is not None:
                    term[j] = hit.term
        row = []
        for k, j in enumerate(positions):
            x, t = ids[j], int(example["target_ids"][k])
            row.append(
                {
                    "position": j,
                    "id": x,
                    "token": tokenizer.decode([x]),
                    "target_id": t,
                    "target": tokenizer.decode([t]),
                    "weight": float(example["token_weights"][k]),
                    "changed": t != x,
                    "where": where[j],
                    "term": term[j],
                }
            )
        out.append(row)
    return out
