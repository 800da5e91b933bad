"""Scoring pass `aligndistil_alpha`: AlignDistil's per-token distance D_t and α_t on prompt + chosen (inspection only).

Spec: specs/aligndistil.md section 2 ("Inspection-only scoring pass"). Training never reads these columns: the
trainer computes its teacher online. This pass shows where the DPO and the other model disagree, e.g. in the
`inspect` heat map (`--column aligndistil_alpha --ids-column completion_ids`).

For each row, split as TRL 1.16's `DPOTrainer` splits it (`data.split_preference_row`), the frozen DPO model and the
other model (reverse DPO for `teacher: contrastive`, the reference for `dpo_ref`) read prompt_ids ⊕ chosen_ids, and
entry t of each column comes from the two distributions that predict `completion_ids[t]` (the context ends at
position P−1+t for a prompt of P tokens), through the loss's own functions (`losses.aligndistil.distribution_distance`, `token_alpha`):

    aligndistil_distance[t] = D_t    (tvd: 1/2 Σ_v |p^d − p^o|; l1: Σ_v |p^d − p^o|)
    aligndistil_alpha[t]    = α_t    (r·D_t + ε, or the constant ratio)

Memory: backbones only, then the N response positions through both heads by the path `signals.head.plan_head` picks
from N, V and the device (direct: at most `chunk_tokens` positions of full (n, V) logits; fused: (n, vocab tile)
tiles, two passes: the normalisers, then Σ_v |p^d − p^o|), never [B, T, V] logits; logits in float32. The teacher
log π* is not built: only D_t and α_t are stored. Sequences sorted by length (longest first), strided over processes with accelerate, returned in
input row order on every process. Modelled on `signals/contrastive.py`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import check_alignment, check_pair_prompt, split_preference_row
from ..losses.aligndistil import TeacherSettings, distribution_distance, token_alpha
from ..models import causal_lm, check_auxiliary_models, model_name, warn_if_same
from .head import OnlineLogSumExp, head_device, hidden_states, logit_transform, logit_width, plan_head, project

logger = logging.getLogger(__name__)

COLUMNS = ("completion_ids", "aligndistil_distance", "aligndistil_alpha")


def _non_finite(z: torch.Tensor) -> torch.Tensor:
    """(n,) rows of z (n, v) holding an inf or a nan: a row sum is non-finite then (one cheap pass, no (n, v) mask),
    confirmed element-wise on those rows only (a sum of huge finite logits can overflow)."""
    bad = ~torch.isfinite(z.sum(dim=-1))
    if bad.any():
        bad[bad.clone()] = ~torch.isfinite(z[bad]).all(dim=-1)
    return bad


def _distance_alpha(dpo_model, other_model, h_d, h_o, settings: TeacherSettings, plan) -> tuple[torch.Tensor, ...]:
    """(D_t, α_t, first non-finite position or -1, which model) of N positions from their hidden states (N, H) under
    each model, by `plan`'s path. Only D and α: the teacher log π* the loss needs is never built here."""
    device, vocab = head_device(dpo_model), logit_width(dpo_model)
    transforms = (logit_transform(dpo_model), logit_transform(other_model))
    n_pos = h_d.shape[0]
    distance, alpha = torch.zeros(n_pos), torch.zeros(n_pos)  # (N,) each
    for sl in plan.chunks(n_pos):
        if plan.path == "direct":
            z_d = project(dpo_model, h_d[sl], transforms[0])  # (n, V) float32
            z_o = project(other_model, h_o[sl], transforms[1]).to(device)
            for which, z in enumerate((z_d, z_o)):
                bad = _non_finite(z)
                if bad.any():
                    return distance, alpha, sl.start + int(bad.nonzero()[0]), which
            d = distribution_distance(torch.log_softmax(z_d, dim=-1), torch.log_softmax(z_o, dim=-1), settings.distance)
        else:  # fused: pass 1 both normalisers over vocabulary tiles, pass 2 Σ_v |p^d - p^o| tile by tile
            k = sl.stop - sl.start
            lse = (OnlineLogSumExp(k, device), OnlineLogSumExp(k, device))
            for start, end in plan.tiles(vocab):
                for which, (model, h) in enumerate(((dpo_model, h_d), (other_model, h_o))):
                    z = project(model, h[sl], transforms[which], start, end).to(device)  # (n, v)
                    bad = _non_finite(z)
                    if bad.any():
                        return distance, alpha, sl.start + int(bad.nonzero()[0]), which
                    lse[which].add(z, start)
            log_z = (lse[0].value().unsqueeze(1), lse[1].value().unsqueeze(1))  # (n, 1) each
            d = torch.zeros(k, device=device)
            for start, end in plan.tiles(vocab):
                p_d = project(dpo_model, h_d[sl], transforms[0], start, end).sub_(log_z[0]).exp_()  # (n, v)
                p_o = project(other_model, h_o[sl], transforms[1], start, end).to(device).sub_(log_z[1]).exp_()
                d += p_d.sub_(p_o).abs_().sum(dim=-1)
            d = 0.5 * d if settings.distance == "tvd" else d
        distance[sl], alpha[sl] = d.cpu(), token_alpha(d, settings).cpu()
    return distance, alpha, -1, -1


@torch.no_grad()
def score_aligndistil_alpha(
    dataset,
    dpo_model,
    other_model,
    tokenizer,
    settings: TeacherSettings,
    batch_size: int = 8,
    chunk_tokens: int = 256,
    accelerator=None,
    names: tuple[str, str] = ("dpo_model", "other_model"),
    head_path: str = "auto",
) -> dict[str, list[Any]]:
    """D_t and α_t of every response token of `dataset` (rows with `prompt` and `chosen`; `rejected` joins TRL's
    split when present, as it does in TRL), in input order, the same on every process.

    Returns columns of one entry per row: `completion_ids` (list[int], TRL's `chosen_ids`), `aligndistil_distance`
    and `aligndistil_alpha` (list[float], float32 values, one per completion id).

    Errors (naming the row, position or model): stored `completion_ids` that differ from this tokenisation (row and
    first differing position); an empty prompt (no position predicts the first response token); a row longer than the
    models' `max_position_embeddings`; models with a logit transform or LM heads of different widths; a non-finite
    logit. The DPO and other model being the same weights is a warning (α_t = ε everywhere). `head_path` forces the
    head computation ("direct" or "fused", `signals.head.plan_head`); `chunk_tokens` caps its positions per chunk.
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    if batch_size < 1 or chunk_tokens < 1:
        raise ValueError(f"batch_size and chunk_tokens must be >= 1, got {batch_size} and {chunk_tokens}")
    named = [
        (m, f"{name} ({model_name(m, 'in-memory model')})")
        for m, name in ((dpo_model, names[0]), (other_model, names[1]))
    ]
    check_auxiliary_models(tokenizer, named)
    warn_if_same(dpo_model, other_model, names, settings.same_models_note())
    accelerator = accelerator or Accelerator()
    missing = [c for c in ("prompt", "chosen") if c not in dataset.column_names]
    if missing:
        raise KeyError(f"dataset lacks column(s) {missing} (has {dataset.column_names}); rows need prompt + chosen")
    stored = dataset["completion_ids"] if "completion_ids" in dataset.column_names else None

    # ---- tokenise, every process the same
    rows = []
    for i, example in enumerate(tqdm(dataset, desc="Tokenising rows", disable=not accelerator.is_main_process)):
        example = {**example, "rejected": example.get("rejected") or example["chosen"]}
        check_pair_prompt(example, i)
        split = split_preference_row(example, tokenizer)
        if not split["prompt_ids"]:
            raise ValueError(
                f"row {i}: the prompt has no tokens, so no position predicts the first response token; give every "
                "row a prompt (e.g. starting with BOS)"
            )
        if stored is not None:
            check_alignment(stored[i], split["chosen_ids"], i, "completion_ids", tokenizer)
        rows.append((split["prompt_ids"], split["chosen_ids"]))

    max_positions = min(
        getattr(causal_lm(m).config.get_text_config(), "max_position_embeddings", None) or 1 << 62
        for m in (dpo_model, other_model)
    )
    for i, (prompt, response) in enumerate(rows):
        if len(prompt) + len(response) > max_positions:
            raise ValueError(
                f"row {i} has {len(prompt) + len(response)} tokens but the models read at most {max_positions}: "
                "filter the row (scores are never truncated)"
            )
    accelerator.print(
        f"score aligndistil_alpha: {len(rows)} rows, {sum(len(r) for _, r in rows)} response tokens; teacher "
        f"{settings.teacher}, alpha {settings.alpha}, distance {settings.distance}; batch {batch_size}, chunk "
        f"{chunk_tokens} positions"
    )

    order = sorted(range(len(rows)), key=lambda j: -sum(map(len, rows[j])))
    mine = order[accelerator.process_index :: accelerator.num_processes]
    batches = [mine[j : j + batch_size] for j in range(0, len(mine), batch_size)]
    dpo_model.eval()
    other_model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    for batch in tqdm(batches, desc="Scoring (aligndistil_alpha)", disable=not accelerator.is_main_process):
        width = max(sum(map(len, rows[j])) for j in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T) right-padded
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        predicts = torch.zeros((len(batch), width - 1), dtype=torch.bool)  # (B, T-1): position p predicts a response id
        for b, j in enumerate(batch):
            prompt, response = rows[j]
            ids = prompt + response
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
            predicts[b, len(prompt) - 1 : len(ids) - 1] = True
        hidden = []
        for m in (dpo_model, other_model):
            h = hidden_states(m, input_ids, attention_mask)[:, :-1]  # (B, T-1, H)
            hidden.append(h[predicts.to(h.device)])  # (N, H)
        plan = plan_head(hidden[0].shape[0], logit_width(dpo_model), head_device(dpo_model), 2, head_path)
        plan = dataclasses.replace(plan, rows=min(plan.rows, chunk_tokens))
        distance, alpha, first_bad, which = _distance_alpha(
            dpo_model, other_model, hidden[0], hidden[1], settings, plan
        )
        if first_bad >= 0:
            b, p = predicts.nonzero()[first_bad].tolist()
            raise ValueError(
                f"non-finite logits from {names[which]}: row {batch[b]}, position {p} (the context predicting "
                f"response token {p - len(rows[batch[b]][0]) + 1})"
            )
        counts = predicts.sum(dim=1).tolist()
        for j, d, a in zip(batch, distance.split(counts), alpha.split(counts)):
            results.append((j, d.tolist(), a.tolist()))

    gathered = gather_object(results) if accelerator.num_processes > 1 else results
    by_row = {j: (d, a) for j, d, a in gathered}
    return {
        "completion_ids": [response for _, response in rows],
        "aligndistil_distance": [by_row[j][0] for j in range(len(rows))],
        "aligndistil_alpha": [by_row[j][1] for j in range(len(rows))],
    }


@torch.no_grad()
def sequence_kl(
    model,
    reference,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    batch_size: int = 16,
    chunk_tokens: int = 256,
) -> list[float]:
    """Σ_t KL(π_model(·|x, y_<t) ‖ π_reference(·|x, y_<t)) over each response's tokens: the sequence KL of a model to
    a reference (e.g. π_θ to π_dpo) on the model's own samples, over the full vocabulary, in float32.

    Backbones only, then `chunk_tokens` positions projected through each head at a time (no (B, T, V) logits);
    rows sorted by length. Returns one float per row, in input order. A response of no token has KL 0."""
    from ..losses.aligndistil import reverse_kl

    empty = [j for j, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"rows {empty[:10]} have an empty prompt: no position predicts their first response token")
    order = sorted(range(len(prompts)), key=lambda j: -(len(prompts[j]) + len(responses[j])))
    out = [0.0] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = [j for j in order[start : start + batch_size] if responses[j]]
        if not batch:
            continue
        width = max(len(prompts[j]) + len(responses[j]) for j in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T) right-padded
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        predicts = torch.zeros((len(batch), width - 1), dtype=torch.bool)  # (B, T-1)
        for b, j in enumerate(batch):
            ids = prompts[j] + responses[j]
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
            predicts[b, len(prompts[j]) - 1 : len(ids) - 1] = True
        hidden = []
        for m in (model, reference):
            h = hidden_states(m, input_ids, attention_mask)[:, :-1]  # (B, T-1, H)
            hidden.append(h[predicts.to(h.device)])  # (N, H)
        kl = torch.zeros(hidden[0].shape[0])  # (N,)
        for s in range(0, kl.numel(), chunk_tokens):
            sl = slice(s, min(s + chunk_tokens, kl.numel()))
            z = project(model, hidden[0][sl], logit_transform(model))  # (n, V) float32
            logp_ref = torch.log_softmax(project(reference, hidden[1][sl], logit_transform(reference)).to(z.device), -1)
            kl[sl] = reverse_kl(z, logp_ref).cpu()
        for j, row in zip(batch, kl.split(predicts.sum(dim=1).tolist())):
            out[j] = float(row.sum())
    return out
