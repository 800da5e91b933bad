"""Concept-aware fine-tuning (CAFT): shifted head targets, the combined head loss and its schedule (pure torch).

Paper: Chen, Zhang, Huang, Tao, "Improving large language models with concept-aware fine-tuning",
https://arxiv.org/abs/2506.07833 (official code: michaelchen-lab/caft-llm, `caft/core.py` `add_caft_loss`).
Multi-token heads: Gloeckle et al., https://arxiv.org/abs/2404.19737; Medusa, https://arxiv.org/abs/2401.10774.
Spec: `specs/concept_heads.md` sections 2 (targets), 3 (loss) and 6 (vectors).

Three functions, no model calls:

- `head_targets`: the target of every head at every position, from ordinary causal-LM labels. Head i (0 = the
  model's own next-token head) at position t predicts labels[t + 1 + i].
- `concept_heads_loss`: L = [CE_0] + w * sum_i alpha^i CE_i from per-head NLL sums and global target counts.
- `schedule_weight`: gamma(tau) of the head term in phase `finetune`.

Frames: everything here is in the *unshifted* position frame (B, T): entry t is the prediction made from the hidden
state at t. (The fused LM head's (B, T-1) frame is targets_0[:, :-1].)
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
SCHEDULES = ("sine_decay", "constant")


def head_targets(
    labels: torch.Tensor,
    num_aux_heads: int,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Targets of the next-token head and of H auxiliary heads, -100 where a head has nothing to predict.

        target_i[b, t] = labels[b, t + 1 + i]   for t <= T - 2 - i
        target_i[b, t] = -100                   otherwise, and where
                         (a) attention_mask[b, t] == 0 (left padding: the position reads no real token), or
                         (b) t and t + 1 + i lie in different documents (document = running count of
                             position_ids == 0, so a packed row never predicts across a document boundary).

    A position counts when its *target* is valid, whatever its own label: the last prompt positions train head i to
    predict the first 1 + i answer tokens (official code and Medusa). Worked example (spec 6.2): labels
    [-100, -100, 5, 6, 7, 8, -100], H = 4 -> target_1 = [5, 6, 7, 8, -100, -100, -100], counts 4, 4, 3, 2, 1.

    Args:
        labels: unshifted causal-LM labels, -100 where there is no target.  (B, T) int
        num_aux_heads: H >= 0; H = 0 gives the next-token targets alone.
        position_ids: positions restarting at 0 at each packed document, or None (one document per row).
            (B, T) or (1, T) int
        attention_mask: 1 on real tokens, 0 on padding, or None.  (B, T)

    Returns:
        targets, int64.  (H + 1, B, T)
    """
    if isinstance(num_aux_heads, bool) or not isinstance(num_aux_heads, int) or num_aux_heads < 0:
        raise ValueError(f"num_aux_heads must be an integer >= 0, got {num_aux_heads!r}")
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, T), got shape {tuple(labels.shape)}")
    B, T = labels.shape
    labels = labels.long()
    source_ok = torch.ones_like(labels, dtype=torch.bool)  # (B, T) positions allowed to predict
    if attention_mask is not None:
        source_ok = attention_mask.to(labels.device).bool().expand(B, T)
    doc = None
    if position_ids is not None:
        doc = (position_ids.to(labels.device) == 0).long().cumsum(dim=-1).expand(B, T)  # (B, T) document ids
    out = labels.new_full((num_aux_heads + 1, B, T), IGNORE_INDEX)
    for i in range(num_aux_heads + 1):
        shift = 1 + i
        if shift >= T:
            break  # every later head has no position either
        target = labels[:, shift:]  # (B, T - shift)
        ok = (target != IGNORE_INDEX) & source_ok[:, : T - shift]
        if doc is not None:
            ok &= doc[:, : T - shift] == doc[:, shift:]
        out[i, :, : T - shift] = target.masked_fill(~ok, IGNORE_INDEX)
    return out


def head_weights(num_aux_heads: int, alpha: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """(alpha^1, ..., alpha^H): the fixed decay of head i's loss (official code `caft_decay_coefficient ** i`)."""
    return torch.tensor([alpha**i for i in range(1, num_aux_heads + 1)], dtype=torch.float64).to(
        dtype=dtype, device=device
    )


def concept_heads_loss(
    nll_sums: torch.Tensor,
    counts: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    include_ntp: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CAFT loss of one micro-batch from per-head NLL sums and the step's global target counts.

        CE_i = S_i / N_i        (0, exactly, when N_i = 0: a head with no target contributes nothing)
        phase finetune (include_ntp):   L = CE_0 + beta * gamma * sum_{i=1..H} alpha^i CE_i
        phase heads (not include_ntp):  L =                      sum_{i=1..H} alpha^i CE_i   (beta, gamma unused)

    S_i sums -log p_i over this micro-batch's valid targets of head i; N_i counts head i's valid targets over every
    micro-batch of the optimiser step and every process (the base's global normaliser, one count per head), so the
    micro-batch losses of one step add up to the global CE. Spec 6.1: CE = [2, 3, 3.5, 4, 4.5], alpha 0.8 ->
    sum alpha^i CE_i = 8.5312; with beta 0.01 and gamma 1, L = 2.085312. With beta = 0 or gamma = 0 the result is
    CE_0 exactly (the next-token baseline, bit for bit).

    Args:
        nll_sums: S_0..S_H, float, with gradient.  (H + 1,)
        counts: N_0..N_H, >= 0 (int or float).  (H + 1,)
        alpha: decay in (0, 1].
        beta: head-loss weight >= 0 (phase finetune).
        gamma: schedule value gamma(tau) in [0, 1] (phase finetune).
        include_ntp: True in phase finetune, False in phase heads (S_0 is then ignored).

    Returns:
        (loss scalar, ce (H + 1,)): ce is the unweighted CE_i, with gradient.
    """
    if nll_sums.dim() != 1 or nll_sums.shape != counts.shape:
        raise ValueError(
            f"nll_sums and counts must both be (H + 1,), got {tuple(nll_sums.shape)} and {tuple(counts.shape)}"
        )
    counts = counts.to(device=nll_sums.device, dtype=nll_sums.dtype)
    has_targets = counts > 0
    ce = torch.where(has_targets, nll_sums / counts.clamp(min=1), torch.zeros_like(nll_sums))  # (H + 1,)
    num_aux_heads = nll_sums.shape[0] - 1
    head_term = (head_weights(num_aux_heads, alpha, ce.dtype, ce.device) * ce[1:]).sum()
    if not include_ntp:
        return head_term, ce
    weight = beta * gamma
    if weight == 0:
        return ce[0], ce  # exactly the next-token loss (no `+ 0 * ...` in the graph)
    return ce[0] + weight * head_term, ce


def schedule_weight(tau: float, schedule: str) -> float:
    """gamma(tau), the schedule of the head term in phase finetune; tau = global_step / max_steps in [0, 1].

        sine_decay: gamma = sin((1 - tau) * pi / 2)    1 at the start, 0 at the end (official code `rsine`)
        constant:   gamma = 1

    Spec 6.1: sine_decay at tau = 0, .25, .5, .75, 1 gives 1, 0.9238795, 0.7071068, 0.3826834, 0.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if not (math.isfinite(tau) and 0.0 <= tau <= 1.0):
        raise ValueError(f"tau must be in [0, 1], got {tau!r}")
    if schedule == "constant":
        return 1.0
    return math.sin((1.0 - tau) * math.pi / 2)
