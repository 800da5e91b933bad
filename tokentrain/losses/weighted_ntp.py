"""Importance-weighted next-token prediction: PRIOR weights, Rho-1 selection, user weights (pure torch).

Spec: specs/weighted_ntp.md, section 3. Every tensor is in the fused head's frame, (B, T-1), written (B, T) below.
The trainer builds the inputs (log-probs with gradient, the target mask, shifted signals) and the global normaliser;
this file only does the math. Weights and selections are data: built under `no_grad`, they carry no gradient, so
the gradient reaches the policy's log-probs only.

- `prior`  (arXiv 2505.08971): `prior_weights` + `weighted_nll`.
- `column` (user weights):     `weighted_nll`.
- `rho1`   (arXiv 2404.07965): `rho1_num_selected` + `rho1_select` + `rho1_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def prior_weights(ref_logps: Tensor, mask: Tensor, segment_ids: Tensor, alpha: float = 1.0) -> Tensor:
    """PRIOR token weights: 1 - P_ref, rescaled to mean 1 over each sequence's valid tokens.

    Paper: PRIOR, Chen, Peng, Zhang, Ji 2025, https://arxiv.org/abs/2505.08971 (loss figure in
    https://github.com/Yangyi-Chen/PRIOR, `images/prior.png`); alpha as reported for the paper body.

        u_t = max(0, 1 - exp(r_t)) ** alpha
        w_t = k_s * u_t / sum_{j in s} u_j     for t in sequence s with k_s valid tokens
        w_t = 1                                  on a sequence whose sum u = 0 (every P_ref is 1 in float)
        w_t = 0                                  where mask is False

    so that sum_t w_t = number of valid tokens and w = 1 is plain SFT. A sequence is all tokens with the same
    (row, segment id): a whole row when padded (segment ids all 0), a segment between `position_ids` resets when
    padding-free or packed. Tokens of one sequence need not be contiguous. Vectorised: no loop over sequences.

    Args:
        ref_logps: log P_ref of each target token, <= 0.  (B, T) float
        mask: valid targets.  (B, T) bool
        segment_ids: sequence id of each position within its row, any integers.  (B, T) long
        alpha: exponent on 1 - P_ref, > 0.

    Returns:
        weights, detached, dtype of `ref_logps`.  (B, T)
    """
    if ref_logps.numel() == 0:
        return torch.zeros_like(ref_logps)
    B, T = ref_logps.shape
    u = (1.0 - ref_logps.exp()).clamp(min=0.0).pow(alpha)  # (B, T)
    u = u.masked_fill(~mask, 0.0)  # padding and prompt never enter a sequence's sum

    # One group per (row, segment): shift ids to start at 0 and give every row its own block of ids.
    seg = segment_ids - segment_ids.min()  # (B, T)
    n_seg = int(seg.max()) + 1
    rows = torch.arange(B, device=seg.device).unsqueeze(1)  # (B, 1)
    group = (rows * n_seg + seg).flatten()  # (B*T,)

    u_sum = u.new_zeros(B * n_seg).index_add_(0, group, u.flatten())  # (G,)
    k = u.new_zeros(B * n_seg).index_add_(0, group, mask.flatten().to(u.dtype))  # (G,) valid tokens per sequence
    u_sum = u_sum[group].view(B, T)  # (B, T) each token's sequence sum
    k = k[group].view(B, T)  # (B, T)

    has_mass = u_sum > 0
    w = torch.where(has_mass, k * u / u_sum.where(has_mass, 1.0), 1.0)  # (B, T); fallback w = 1 when sum u = 0
    return w.masked_fill(~mask, 0.0)


def weighted_nll(logps: Tensor, weights: Tensor, mask: Tensor, num_items: Tensor | float) -> Tensor:
    """Weighted next-token NLL with a global normaliser (PRIOR weights or user weights).

    Papers: PRIOR https://arxiv.org/abs/2505.08971 (per-sequence sum of -w log p); the batch reduction is tokentrain's.

        L = sum_t m_t * sg(w_t) * (-logp_t) / N

    N (`num_items`) is the valid-target count over the whole step (all GA micro-batches and processes); with w = 1
    this is exactly TRL's SFT loss. Masked positions contribute 0 to the loss and the gradient even if their logps
    or weights are not finite.

    Args:
        logps: log-prob of each target token under the policy, with gradient.  (B, T)
        weights: per-token weights; detached here.  (B, T)
        mask: valid targets.  (B, T) bool
        num_items: N, the step's normaliser.  scalar tensor or float

    Returns:
        loss, a scalar with gradient w.r.t. `logps` only: dL/dlogp_t = -m_t * w_t / N.
    """
    nll = -logps.masked_fill(~mask, 0.0)  # (B, T)
    w = weights.detach().masked_fill(~mask, 0.0)  # (B, T)
    return (w * nll).sum() / num_items


def rho1_num_selected(ratio: float, n_valid: int) -> int:
    """Number of tokens Rho-1 keeps in a ranking scope: n = ceil(ratio * n_valid), exactly.

    Paper: Rho-1, Lin et al. 2024, https://arxiv.org/abs/2404.07965 (top k% of tokens by excess loss, eq. 4).

        n = ceil(ratio * n_valid)    on the rational number that `ratio` reads as in decimal

    The ratio's shortest decimal form (`repr`, "0.55") is read as an integer fraction, so 0.55 * 100 gives 55; the
    float product 55.00000000000001 would give 56. n = 0 iff n_valid = 0, since ratio > 0.

    Args:
        ratio: rho, the kept share, in (0, 1].
        n_valid: valid targets in the scope, >= 0.

    Returns:
        n, an int in [1, n_valid] (0 when n_valid = 0).
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"rho1 ratio must be in (0, 1], got {ratio!r}")
    if n_valid < 0:
        raise ValueError(f"n_valid must be >= 0, got {n_valid}")
    # repr(float) is the shortest decimal that round-trips: "0.55", "1e-05", "1.0". Read it as num / den.
    mantissa, _, exponent = repr(float(ratio)).lower().partition("e")
    whole, _, frac = mantissa.partition(".")
    num, den = int(whole + frac), 10 ** len(frac)
    shift = int(exponent or 0)
    if shift >= 0:
        num *= 10**shift
    else:
        den *= 10**-shift
    return -((-num * int(n_valid)) // den)  # ceil on integers


@torch.no_grad()
def rho1_select(excess: Tensor, mask: Tensor, n: int) -> Tensor:
    """Rho-1 token selection: the n valid tokens with the largest excess loss.

    Paper: Rho-1, Lin et al. 2024, https://arxiv.org/abs/2404.07965 (eq. 3: score = L_theta - L_ref, signed).

        selected = first n of the valid e_t under a stable descending sort of the flattened (row-major) tensor

    Ties go to the lower flat index, so the choice is deterministic and the same whether one process ranks a
    concatenation or the rows arrive in one tensor. Invalid entries are never selected, whatever their score;
    n larger than the valid count selects every valid token.

    Args:
        excess: e_t = -logp_t (detached) + ref_logp_t.  any shape, e.g. (B, T)
        mask: valid targets.  same shape, bool
        n: number to select, >= 0 (from `rho1_num_selected`).

    Returns:
        selected, bool, same shape as `excess`, no gradient.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    flat_valid = mask.flatten().nonzero().squeeze(1)  # (N,) flat indices of valid tokens, ascending
    scores = excess.detach().flatten()[flat_valid]  # (N,)
    order = torch.sort(scores, descending=True, stable=True).indices[:n]  # (n,) stable: ties keep index order
    selected = torch.zeros(excess.numel(), dtype=torch.bool, device=excess.device)
    selected[flat_valid[order]] = True
    return selected.view(excess.shape)


def rho1_loss(logps: Tensor, selected: Tensor, num_selected: Tensor | float) -> Tensor:
    """Rho-1 selective language-modelling loss with a global normaliser.

    Paper: Rho-1, Lin et al. 2024, https://arxiv.org/abs/2404.07965 (eq. 4, normalised by N * k%).

        L = sum_{t selected} (-logp_t) / D

    D (`num_selected`) is the number selected over the whole step (all GA micro-batches and processes). With ratio 1
    every valid token is selected, D = N, and this is plain SFT.

    Args:
        logps: log-prob of each target token under the policy, with gradient.  (B, T), any shape
        selected: tokens trained on (from `rho1_select`).  same shape, bool
        num_selected: D, the step's normaliser.  scalar tensor or float

    Returns:
        loss, a scalar: dL/dlogp_t = -1/D on selected tokens, 0 elsewhere.
    """
    return -logps.masked_fill(~selected, 0.0).sum() / num_selected
