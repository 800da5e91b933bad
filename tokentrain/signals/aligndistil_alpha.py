"""Scoring pass `aligndistil_alpha`: AlignDistil's per-token distance D_t and α_t on prompt + chosen (inspection only).

Spec: specs/aligndistil.md section 2 ("Inspection-only scoring pass"). Training never reads these columns: the
trainer computes its teacher online. This pass shows where the DPO and the other model disagree, e.g. in the
`inspect` heat map (`--column aligndistil_alpha --ids-column completion_ids`).

For each row, split as TRL 1.16's `DPOTrainer` splits it (`data.split_preference_row`), the frozen DPO model and the
other model (reverse DPO for `teacher: contrastive`, the reference for `dpo_ref`) read prompt_ids ⊕ chosen_ids, and
entry t of each column comes from the two distributions that predict `completion_ids[t]` (the context ends at
position P−1+t for a prompt of P tokens), through the loss's own function (`losses.aligndistil.teacher_log_probs`):

    aligndistil_distance[t] = D_t    (tvd: 1/2 Σ_v |p^d − p^o|; l1: Σ_v |p^d − p^o|)
    aligndistil_alpha[t]    = α_t    (r·D_t + ε, or the constant ratio)

Memory: backbones only, then the N response positions projected `chunk_tokens` at a time (no [B, T, V] logits);
logits in float32. Sequences sorted by length (longest first), strided over processes with accelerate, returned in
input row order on every process. Modelled on `signals/contrastive.py`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import check_alignment, check_pair_prompt, split_preference_row
from ..losses.aligndistil import TeacherSettings, project_logits, teacher_log_probs
from ..models import causal_lm, check_auxiliary_models, model_name, warn_if_same

logger = logging.getLogger(__name__)

COLUMNS = ("completion_ids", "aligndistil_distance", "aligndistil_alpha")


def _project(model, hidden: torch.Tensor) -> torch.Tensor:
    """(n, H) hidden states -> (n, V) float32 logits through the model's LM head (the loss's projection)."""
    head = causal_lm(model).get_output_embeddings()
    return project_logits(hidden.to(head.weight.device), head.weight, head.bias)


def _hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    """(B, T, H) last hidden states of the backbone alone: no LM head, so no (B, T, V) logits."""
    lm = causal_lm(model)
    device = next(lm.parameters()).device
    out = lm.base_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    return out.last_hidden_state  # (B, T, H)


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
) -> dict[str, list[Any]]:
    """D_t and α_t of every response token of `dataset` (rows with `prompt` and `chosen`; `rejected` joins TRL's
    split when present, as it does in TRL), in input order, the same on every process.

    Returns columns of one entry per row: `completion_ids` (list[int], TRL's `chosen_ids`), `aligndistil_distance`
    and `aligndistil_alpha` (list[float], float32 values, one per completion id).

    Errors (naming the row, position or model): stored `completion_ids` that differ from this tokenisation (row and
    first differing position); an empty prompt (no position predicts the first response token); a row longer than the
    models' `max_position_embeddings`; models with a logit transform or LM heads of different widths; a non-finite
    logit. The DPO and other model being the same weights is a warning (α_t = ε everywhere).
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
            h = _hidden_states(m, input_ids, attention_mask)[:, :-1]  # (B, T-1, H)
            hidden.append(h[predicts.to(h.device)])  # (N, H)
        n_pos = hidden[0].shape[0]
        distance, alpha = torch.zeros(n_pos), torch.zeros(n_pos)  # (N,) each
        for start in range(0, n_pos, chunk_tokens):
            sl = slice(start, min(start + chunk_tokens, n_pos))
            z_d = _project(dpo_model, hidden[0][sl])  # (n, V) float32
            z_o = _project(other_model, hidden[1][sl]).to(z_d.device)
            for z, name in ((z_d, names[0]), (z_o, names[1])):
                bad = ~torch.isfinite(z).all(-1)
                if bad.any():
                    b, p = predicts.nonzero()[start + int(bad.nonzero()[0])].tolist()
                    raise ValueError(
                        f"non-finite logits from {name}: row {batch[b]}, position {p} (the context predicting "
                        f"response token {p - len(rows[batch[b]][0]) + 1})"
                    )
            _, a, d = teacher_log_probs(z_d, z_o, settings)
            alpha[sl], distance[sl] = a.cpu(), d.cpu()
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
            h = _hidden_states(m, input_ids, attention_mask)[:, :-1]  # (B, T-1, H)
            hidden.append(h[predicts.to(h.device)])  # (N, H)
        kl = torch.zeros(hidden[0].shape[0])  # (N,)
        for s in range(0, kl.numel(), chunk_tokens):
            sl = slice(s, min(s + chunk_tokens, kl.numel()))
            z = _project(model, hidden[0][sl])  # (n, V) float32
            logp_ref = torch.log_softmax(_project(reference, hidden[1][sl]).to(z.device), dim=-1)
            kl[sl] = reverse_kl(z, logp_ref).cpu()
        for j, row in zip(batch, kl.split(predicts.sum(dim=1).tolist())):
            out[j] = float(row.sum())
    return out
