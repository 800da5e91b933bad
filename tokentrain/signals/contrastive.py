"""Scoring pass: contrastive estimation of critical tokens (spec `specs/critical_dpo.md` section 2).

For each preference row split as TRL 1.16's `DPOTrainer` splits it (`data.split_preference_row`), the frozen positive
and negative models read prompt_ids ⊕ rejected_ids, and every rejected token y_t gets

    c_t(v) = (1 + b)·z⁺_t(v) − b·z⁻_t(v),   s_t = softmax(c_t)[y_t],   rejected_weights[t] = 1 − s_t

(`losses.critical_dpo.contrastive_scores`; b = `ce_beta`). With `score_chosen`, the chosen completion is scored the
same way and stored as `chosen_weights[t]` = s_t. Only completion positions are scored.

Memory: the backbones run once per batch, giving hidden states (B, T, H); only the completion positions are kept,
flattened to (N, H), and projected through each LM head by the path `signals.head.plan_head` picks from N, V and
the device (direct: at most `chunk_size` positions of full (n, V) logits; fused: (n, vocab tile) tiles folded into
a running logsumexp of c), never (B, T, V). Logits are float32 before they are combined.

EOS rule [official code]: plain-text rows get EOS appended by TRL; that final EOS entry is 1.0 in both weight
columns (the code scored the text without EOS and set s = 0 there). Chat-template end tokens are scored like any
token. Rows whose prompt has `max_prompt_length` tokens or more, or whose prompt + chosen or prompt + rejected has
`max_length` tokens or more, are dropped before scoring (the code's filter); the count is printed.

Sequences are sorted by length (longest first, so no batch pads much), strided over processes with accelerate, and
returned in input row order on every process.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from trl.data_utils import is_conversational

from ..data import check_pair_prompt, split_preference_row
from ..losses.critical_dpo import contrastive_scores
from ..models import causal_lm
from ..runtime import progress
from .head import OnlineLogSumExp, head_device, hidden_states, logit_transform, logit_width, plan_head, project

logger = logging.getLogger(__name__)


def _check_models(pos_model, neg_model, tokenizer) -> None:
    if pos_model is neg_model or causal_lm(pos_model) is causal_lm(neg_model):
        raise ValueError(
            "pos_model and neg_model are the same model: the contrastive estimate needs the positive and the negative "
            "fine-tunes (two checkpoints, or two adapters loaded separately)"
        )
    pos_width, neg_width = logit_width(pos_model), logit_width(neg_model)
    if pos_width != neg_width:
        raise ValueError(
            f"pos_model has {pos_width} logits per position but neg_model has {neg_width}: both must be fine-tunes "
            "of the same base (same vocabulary and logit width)"
        )
    if len(tokenizer) > pos_width:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the models produce only {pos_width} logits per position: "
            "the policy tokenizer does not belong to these models"
        )


def _scores(pos_model, neg_model, h_pos, h_neg, targets, ce_beta, transforms, plan) -> torch.Tensor:
    """s_t of N positions (N,) float32 from their hidden states (N, H) under each model, by `plan`'s path."""
    device = head_device(pos_model)
    out = torch.zeros(targets.numel())  # (N,)
    for sl in plan.chunks(targets.numel()):
        y = targets[sl].to(device)  # (n,)
        if plan.path == "direct":
            z_pos = project(pos_model, h_pos[sl], transforms[0])  # (n, V) float32
            z_neg = project(neg_model, h_neg[sl], transforms[1]).to(device)  # (n, V) float32
            out[sl] = contrastive_scores(z_pos, z_neg, y, torch.ones_like(y, dtype=torch.bool), ce_beta).cpu()
            continue
        # fused: c = (1 + b) z+ - b z- one vocabulary tile at a time, s = exp(c_y - logsumexp c)
        lse = OnlineLogSumExp(y.numel(), device, y)
        for start, end in plan.tiles(logit_width(pos_model)):
            c = project(pos_model, h_pos[sl], transforms[0], start, end).mul_(1.0 + ce_beta)  # (n, v)
            c.sub_(project(neg_model, h_neg[sl], transforms[1], start, end).to(device), alpha=ce_beta)
            lse.add(c, start)
        out[sl] = torch.exp(lse.target - lse.value()).cpu()
    return out


@torch.no_grad()
def score_contrastive(
    dataset,
    pos_model,
    neg_model,
    tokenizer,
    ce_beta: float = 1.0,
    score_chosen: bool = False,
    batch_size: int = 8,
    chunk_size: int = 1024,
    max_prompt_length: int | None = 512,
    max_length: int | None = 1024,
    accelerator=None,
    head_path: str = "auto",
) -> dict[str, list[Any]]:
    """Contrastive weights of every kept row of `dataset` (rows with `prompt`, `chosen`, `rejected`, plain or chat).

    Returns columns of equal length, one entry per kept row, in input order (the same on every process):
    `kept_rows` (index of the row in `dataset`), `prompt_ids`, `chosen_ids`, `rejected_ids` (TRL's split),
    `rejected_weights` (1 − s_t, one per rejected id) and, with `score_chosen`, `chosen_weights` (s_t). The score stage
    writes `dataset.select(kept_rows)` with the other columns added. Weights are float32 values. `head_path` forces
    the head computation ("direct" or "fused", `signals.head.plan_head`; `chunk_size` caps its positions per chunk).

    Errors: `pos_model` is `neg_model`; different logit widths, or a tokenizer larger than them; a row whose chosen
    and rejected are equal; a kept row longer than the models' `max_position_embeddings` (never truncated).
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    if ce_beta < 0:
        raise ValueError(f"ce_beta must be >= 0, got {ce_beta}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    _check_models(pos_model, neg_model, tokenizer)
    accelerator = accelerator or Accelerator()
    sides = ("rejected", "chosen") if score_chosen else ("rejected",)

    # ---- tokenise and filter, every process the same
    rows, kept, too_long = [], [], []
    for i, example in enumerate(dataset):
        if example["chosen"] == example["rejected"]:
            raise ValueError(f"row {i}: chosen and rejected are the same text; a pair must differ to be scored")
        check_pair_prompt(example, i)
        split = split_preference_row(example, tokenizer)
        n_prompt = len(split["prompt_ids"])
        n_full = n_prompt + max(len(split["chosen_ids"]), len(split["rejected_ids"]))
        if (max_prompt_length is not None and n_prompt >= max_prompt_length) or (
            max_length is not None and n_full >= max_length
        ):
            too_long.append(i)
            continue
        split["plain"] = not is_conversational(example)
        rows.append(split)
        kept.append(i)
    if too_long:
        logger.warning("dropped %d rows by length; first: %s", len(too_long), too_long[:10])
    accelerator.print(
        f"score contrastive: {len(kept)} of {len(kept) + len(too_long)} pairs kept, {len(too_long)} dropped "
        f"(prompt >= {max_prompt_length} or prompt+completion >= {max_length} tokens); scoring {len(sides)} "
        f"completion(s) per pair with ce_beta {ce_beta}, batch {batch_size}, chunk {chunk_size} positions"
    )

    # ---- one sequence per (row, side), prompt ⊕ completion
    seqs = [(r, side) for r in range(len(rows)) for side in sides]

    def ids_of(key):
        r, side = key
        return rows[r]["prompt_ids"] + rows[r][f"{side}_ids"]

    max_positions = min(
        getattr(causal_lm(m).config.get_text_config(), "max_position_embeddings", None) or 1 << 62
        for m in (pos_model, neg_model)
    )
    for key in seqs:
        if len(ids_of(key)) > max_positions:
            raise ValueError(
                f"row {kept[key[0]]} has {len(ids_of(key))} tokens (prompt + {key[1]}) but the models read at most "
                f"{max_positions}: lower max_length or filter the row (scores are never truncated)"
            )

    # Longest first, then strided over processes so each gets a similar mix of lengths.
    order = sorted(range(len(seqs)), key=lambda j: -len(ids_of(seqs[j])))
    mine = order[accelerator.process_index :: accelerator.num_processes]
    batches = [mine[j : j + batch_size] for j in range(0, len(mine), batch_size)]

    pos_model.eval()
    neg_model.eval()
    transforms = (logit_transform(pos_model), logit_transform(neg_model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    for batch in progress(batches, desc="Scoring (contrastive)", enabled=accelerator.is_main_process):
        width = max(len(ids_of(seqs[j])) for j in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T) right-padded
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        # predicts[b, p]: position p of sequence b predicts a completion token (the context ends at p)
        predicts = torch.zeros((len(batch), width - 1), dtype=torch.bool)  # (B, T-1)
        for b, j in enumerate(batch):
            ids, n_prompt = ids_of(seqs[j]), len(rows[seqs[j][0]]["prompt_ids"])
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
            predicts[b, max(n_prompt - 1, 0) : len(ids) - 1] = True
        targets = input_ids[:, 1:][predicts]  # (N,) the completion tokens, row by row

        # Backbones only, then just the N completion positions: no (B, T, V) logits.
        hidden = [hidden_states(m, input_ids, attention_mask)[:, :-1] for m in (pos_model, neg_model)]  # (B, T-1, H)
        mask_dev = predicts.to(hidden[0].device)
        pos_hidden, neg_hidden = hidden[0][mask_dev], hidden[1][mask_dev.to(hidden[1].device)]  # (N, H) each
        plan = plan_head(targets.numel(), logit_width(pos_model), head_device(pos_model), 2, head_path)
        plan = dataclasses.replace(plan, rows=min(plan.rows, chunk_size))
        scores = _scores(pos_model, neg_model, pos_hidden, neg_hidden, targets, ce_beta, transforms, plan)  # (N,)
        counts = predicts.sum(dim=1).tolist()
        for j, s in zip(batch, scores.split(counts)):
            results.append((j, s))

    results = [(j, s.tolist()) for j, s in results]
    gathered = gather_object(results) if accelerator.num_processes > 1 else results
    by_seq = dict(gathered)

    columns: dict[str, list[Any]] = {"kept_rows": kept, "prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for side in sides:
        columns[f"{side}_weights"] = []
    eos_id = tokenizer.eos_token_id
    for r, row in enumerate(rows):
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            columns[name].append(row[name])
        for k, side in enumerate(sides):
            ids = row[f"{side}_ids"]
            s = torch.tensor(by_seq[r * len(sides) + k], dtype=torch.float32)  # (K,) or (K-1,)
            weights = torch.ones(len(ids), dtype=torch.float32)  # (K,)
            # With an empty prompt no position predicts the first completion token: it keeps weight 1.0, which the
            # loss never reads (its first column is the second position).
            weights[len(ids) - s.numel() :] = 1.0 - s if side == "rejected" else s
            if row["plain"] and ids and ids[-1] == eos_id:
                weights[-1] = 1.0  # the EOS TRL appends: full weight on either side
            columns[f"{side}_weights"].append(weights.tolist())
    return columns
