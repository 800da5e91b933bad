"""Critical-token DPO: contrastive-estimation scores and the token-weighted DPO loss (pure torch).

Paper: Lin et al., "Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning
Capability", https://arxiv.org/abs/2411.19943 (official code: chenzhiling9954/Critical-Tokens-Matter).
Spec: `specs/critical_dpo.md` sections 2 (scores) and 3 (loss).

Two functions, no model calls:

- `contrastive_scores`: s_t from the positive and negative models' logits at the positions that predict the rejected
  tokens. The scoring pass writes `rejected_weights = 1 - s_t` (and `chosen_weights = s_t` with `score_chosen`).
- `token_weighted_dpo_loss`: DPO whose per-token log-ratios are multiplied by per-token weights, in the paper's
  reduction (`sequence`: one sigmoid per pair) or the official code's (`position_mean`: one sigmoid per position).

Layout follows TRL 1.16's `DPOTrainer`: one forward over 2B rows, rows [0, B) the chosen sequences and rows [B, 2B)
the rejected ones, per-token log-probs in the fused head's shifted frame (2B, P), P = T - 1, zero where masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["sequence", "position_mean"]
REDUCTIONS = ("sequence", "position_mean")


def contrastive_scores(
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    ce_beta: float = 1.0,
) -> torch.Tensor:
    """Contrastive estimation s_t of each target token (arXiv 2411.19943, Eq. 1).

    With b = `ce_beta`, z⁺ and z⁻ the positive and negative models' logits at the position predicting y_t:

        c_t(v) = (1 + b)·z⁺_t(v) − b·z⁻_t(v)
        s_t    = exp(c_t(y_t)) / Σ_v exp(c_t(v))          (a softmax over the full logit width V)

    A low s_t marks a likely critical token; the scoring pass stores 1 − s_t as the rejected token's weight.
    Log-probs may be passed instead of logits: per-position constants cancel in the softmax, so s_t is the same.
    b = 0 gives s_t = P⁺(y_t). Inputs below float32 are upcast before combining (the official code's precision).

    Args:
        pos_logits: (..., V) positive model's logits (or log-probs).
        neg_logits: (..., V) negative model's logits (or log-probs), same width V.
        targets: (...) token ids y_t; any value where `mask` is false (e.g. -100).
        mask: (...) true where a score is wanted; elsewhere the result is 0 and the inputs are ignored.
        ce_beta: b ≥ 0, the contrast strength (paper and code: 1.0).

    Returns:
        s: (...) scores in [0, 1], dtype at least float32, 0 where `mask` is false. No gradient is needed: the
        callers run the frozen models under `torch.no_grad()`.
    """
    dtype = torch.promote_types(pos_logits.dtype, torch.float32)
    mask = mask.bool()
    c = (1.0 + ce_beta) * pos_logits.to(dtype) - ce_beta * neg_logits.to(dtype)  # (..., V)
    targets = torch.where(mask, targets, torch.zeros_like(targets))  # (...) pad ids -> a valid index
    c_target = c.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (...)
    s = torch.exp(c_target - torch.logsumexp(c, dim=-1))  # (...) softmax(c)[y] without a second (..., V) tensor
    return torch.where(mask, s, torch.zeros_like(s))  # (...) garbage rows (inf, nan) never leak


@dataclass(frozen=True)
class TokenWeightedDPOOutput:
    """What `token_weighted_dpo_loss` returns. B = pairs in the micro-batch, P = columns (T − 1).

    The trainer's global normaliser uses the sums and counts: loss = Σ loss_sum / Σ num_units
    (+ rpo_alpha · Σ nll_sum / Σ num_nll_tokens), each summed over accumulation steps and processes.
    `loss` is that formula for this micro-batch alone (one process, no accumulation).
    """

    loss: torch.Tensor  # () loss_sum / num_units (+ rpo_alpha · nll_sum / num_nll_tokens); with gradient
    loss_sum: torch.Tensor  # () DPO loss summed over units; with gradient
    num_units: int  # units in the micro-batch: B (sequence) or B·P (position_mean)
    losses: torch.Tensor  # (B,) each pair's DPO loss, the mean over its units (losses.mean() = loss_sum / num_units)
    chosen_rewards: torch.Tensor  # (B,) β·Σ_p a·Δ on the chosen row, detached; weights 1: TRL's rewards/chosen
    rejected_rewards: torch.Tensor  # (B,) β·Σ_p b·Δ on the rejected row, detached; weights 1: TRL's rewards/rejected
    margins: torch.Tensor  # (B,) β·h_i = chosen_rewards − rejected_rewards, detached
    nll_sum: torch.Tensor | None  # () Σ −ℓ^θ over chosen completion tokens, unweighted; None without rpo_alpha
    num_nll_tokens: torch.Tensor | None  # () number of chosen completion tokens; None without rpo_alpha


def token_weighted_dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    beta: float,
    reduction: Reduction,
    rpo_alpha: float | None = None,
) -> TokenWeightedDPOOutput:
    """Token-weighted DPO loss of critical-token DPO (arXiv 2411.19943, §3.2; spec section 3).

    Rows [0, B) are the chosen sequences, rows [B, 2B) the rejected ones, pair i = rows (i, B + i); both rows of a
    pair start with the same prompt, so column p is the same completion index in both. With m the mask,
    Δ = (ℓ^θ − ℓ^ref)·m, a the chosen rows' weights and b the rejected rows' weights:

        u_{i,p} = a_{i,p}·Δ_{i,p} − b_{i,p}·Δ_{B+i,p}

        sequence      (paper):    loss_i = −log σ(β·h_i),  h_i = Σ_p u_{i,p}            unit = pair
        position_mean (code):     −log σ(β·u_{i,p}) at every column p in [0, P)         unit = position
                                  (prompt and padding columns have u = 0 and add exactly log 2, no gradient)

        rpo_alpha α (optional):   + α·Σ_{chosen completion tokens}(−ℓ^θ) / N_chosen    (unweighted NLL)

    All weights 1, `sequence`: exactly TRL 1.16 `DPOTrainer`'s sigmoid loss (label_smoothing 0), summing the
    masked per-token log-probs per row in the same order; with α, TRL's `loss_type=["sigmoid", "sft"]`,
    `loss_weights=[1, α]`. The reference log-probs and the weights are detached: gradient reaches only ℓ^θ.
    Positions where the mask is 0 may hold any value (inf, nan included): they are replaced by 0 first.

    Args:
        policy_logps: (2B, P) policy log-probs of the target tokens.
        ref_logps: (2B, P) reference log-probs, or (2B,) precomputed weighted sums Σ_p w·m·ℓ^ref per row
            (`sequence` only; `position_mean` needs them per token).
        mask: (2B, P) 1 on completion tokens (completion_mask[:, 1:]), 0 on prompt and padding.
        weights: (2B, P) a on the chosen rows, b on the rejected rows (1 = a plain DPO token).
        beta: β > 0, the DPO temperature (code 0.1, paper γ = 1.0).
        reduction: "sequence" or "position_mean".
        rpo_alpha: α ≥ 0 for the NLL term on the chosen completions, or None (off).

    Returns:
        `TokenWeightedDPOOutput`.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if policy_logps.dim() != 2 or policy_logps.size(0) % 2:
        raise ValueError(
            f"policy_logps must be (2B, P) with chosen rows then rejected, got {tuple(policy_logps.shape)}"
        )
    for name, t in (("mask", mask), ("weights", weights)):
        if t.shape != policy_logps.shape:
            raise ValueError(f"{name} must have policy_logps' shape {tuple(policy_logps.shape)}, got {tuple(t.shape)}")
    num_pairs, num_cols = policy_logps.size(0) // 2, policy_logps.size(1)
    if ref_logps.shape not in (policy_logps.shape, policy_logps.shape[:1]):
        raise ValueError(f"ref_logps must be (2B, P) or (2B,), got {tuple(ref_logps.shape)}")
    if ref_logps.dim() == 1 and reduction != "sequence":
        raise ValueError("position_mean needs per-token ref_logps (2B, P); (2B,) sums only work with sequence")

    mask = mask.bool()
    zero = policy_logps.new_zeros(())
    # where, not multiply: padding may hold inf/nan, and 0·nan would leak into the loss and its gradient
    logps = torch.where(mask, policy_logps, zero)  # (2B, P)
    weights = torch.where(mask, weights.detach().to(logps.dtype), zero)  # (2B, P)

    if reduction == "sequence":
        # Sum each row first, then subtract the reference: TRL's order of operations, so weights 1 match it bitwise.
        if ref_logps.dim() == 1:
            ref_sums = ref_logps.detach().to(logps.dtype)  # (2B,) already weighted by the scoring pass
        else:
            ref_sums = (weights * torch.where(mask, ref_logps.detach(), zero)).sum(dim=1)  # (2B,)
        logratios = (weights * logps).sum(dim=1) - ref_sums  # (2B,)
        chosen_logratios, rejected_logratios = logratios.chunk(2)  # (B,), (B,)
        losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))  # (B,)
        loss_sum, num_units = losses.sum(), num_pairs
    else:
        weighted_delta = weights * (logps - torch.where(mask, ref_logps.detach(), zero))  # (2B, P)
        chosen_delta, rejected_delta = weighted_delta.chunk(2)  # (B, P), (B, P)
        per_position_loss = -F.logsigmoid(beta * (chosen_delta - rejected_delta))  # (B, P)
        losses = per_position_loss.mean(dim=1)  # (B,)
        loss_sum, num_units = per_position_loss.sum(), num_pairs * num_cols
        chosen_logratios, rejected_logratios = chosen_delta.sum(dim=1), rejected_delta.sum(dim=1)  # (B,), (B,)

    chosen_rewards = beta * chosen_logratios.detach()  # (B,)
    rejected_rewards = beta * rejected_logratios.detach()  # (B,)
    loss = loss_sum / num_units
    nll_sum = num_nll_tokens = None
    if rpo_alpha is not None:
        nll_sum = -logps[:num_pairs].sum()  # () unweighted: the RPO term of TRL's "sft" loss
        num_nll_tokens = mask[:num_pairs].sum()  # ()
        loss = loss + rpo_alpha * nll_sum / num_nll_tokens.clamp(min=1)
    return TokenWeightedDPOOutput(
        loss=loss,
        loss_sum=loss_sum,
        num_units=num_units,
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=chosen_rewards - rejected_rewards,
        nll_sum=nll_sum,
        num_nll_tokens=num_nll_tokens,
    )
