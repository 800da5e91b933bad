"""Unlearning: WHP generic labels and their NLL, gradient ascent, NPO and SimNPO (pure torch).

Spec: specs/unlearning.md, sections 2.5 and 3. Every per-token tensor is in the fused head's frame, (B, T-1), written
(B, T) below: position t holds the log-prob of the label at t + 1. The trainer builds the inputs (log-probs with
gradient, the target mask, shifted signals, the step's global normaliser); this file only does the math. Stored
signals (generic labels, weights, reference log-probs) are data and carry no gradient.

- `whp`    (Eldan & Russinovich, arXiv 2310.02238): `generic_logits` / `generic_labels` (the scoring pass), `whp_loss`.
- `ga`     (open-unlearning `GradAscent`):          `ga_loss`.
- `npo`    (Zhang et al., arXiv 2404.05868):         `npo_loss` on per-sequence log-ratio sums.
- `simnpo` (Fan et al., arXiv 2410.07163):           `simnpo_loss` on per-sequence mean NLLs, reference-free.
- retain term of the baselines:                      `mean_nll`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ------------------------------------------------------------------------------------------------ generic labels


@torch.no_grad()
def generic_logits(
    v_b: Tensor,
    v_r: Tensor,
    alpha: float,
    penalty_mask: Tensor | None = None,
    penalty: float = 0.0,
    inplace: bool = False,
) -> Tensor:
    """WHP generic logits: the baseline's logits with whatever reinforcement raised pushed down.

    Paper: Eldan & Russinovich, https://arxiv.org/abs/2310.02238 (the ReLU form; MUSE's `WHPModelForCausalLM` agrees).

        v_g = v_b - alpha * ReLU(v_r - v_b) - penalty * 1[v in P]

    On raw logits, never log-probs: adding a constant to v_r changes the result (spec 6, property "raw logits").
    Computed in float32 whatever the inputs' dtype. With penalty 0, v_g <= v_b everywhere.

    Args:
        v_b: baseline logits predicting the position (on the translated text).  (N, V)
        v_r: reinforced logits predicting the same position (on the original text).  (N, V)
        alpha: >= 0; 0 gives v_b.
        penalty_mask: P, tokens penalised at each position (rule (b)), or None.  (N, V) bool
        penalty: rho >= 0, subtracted where `penalty_mask` is True.
        inplace: write the result into `v_r` (float32, not needed afterwards: the scoring pass's projections) instead
            of two new (N, V) buffers; the same values bit for bit, about 3x faster on CPU (no page faults).

    Returns:
        v_g, float32.  (N, V)
    """
    v_b = v_b.float()
    if inplace and v_r.dtype == torch.float32:
        push = v_r.sub_(v_b).clamp_(min=0.0)  # (N, V) ReLU(v_r - v_b), in v_r's buffer
    else:
        push = torch.sub(v_r.float(), v_b).clamp_(min=0.0)  # (N, V) ReLU(v_r - v_b), one buffer
    v_g = torch.sub(v_b, push, alpha=alpha, out=push)  # (N, V) v_b - alpha * ReLU(v_r - v_b), the same buffer
    if penalty_mask is not None and penalty != 0.0:
        v_g.sub_(penalty * penalty_mask.to(v_g.dtype))
    return v_g


@torch.no_grad()
def generic_labels(
    v_b: Tensor,
    v_r: Tensor,
    alpha: float,
    penalty_mask: Tensor | None = None,
    penalty: float = 0.0,
    inplace: bool = False,
) -> Tensor:
    """WHP generic label of each position: argmax of `generic_logits` (ties: the lowest id, as `torch.argmax`).

    Returns:
        labels, long.  (N,)
    """
    return generic_logits(v_b, v_r, alpha, penalty_mask, penalty, inplace).argmax(dim=-1)


# ---------------------------------------------------------------------------------------------- per-token losses


def whp_loss(logps: Tensor, weights: Tensor, mask: Tensor, num_items: Tensor | float) -> Tensor:
    """WHP fine-tuning loss: NLL of the generic labels on the original text, weighted, one global normaliser.

    Paper: https://arxiv.org/abs/2310.02238 (plain cross-entropy on the generic labels); reduction tokentrain's.

        L = sum_t m_t * w_t * (-logp_t) / N_w,     logp_t = log pi(target_t | x_<=t)

    N_w (`num_items`) is the number of positions with w > 0 over the whole step (all micro-batches and processes).
    With target = input token and w = 1 this is exactly TRL's SFT loss. Masked positions contribute 0 even when
    their log-prob or weight is not finite.

    Args:
        logps: log-prob of each generic label under the policy, with gradient.  (B, T)
        weights: token_weights (0.0 / 1.0 from the scoring pass); detached here.  (B, T)
        mask: valid targets.  (B, T) bool
        num_items: N_w.  scalar tensor or float

    Returns:
        loss, a scalar: dL/dlogp_t = -m_t * w_t / N_w.
    """
    nll = -logps.masked_fill(~mask, 0.0)  # (B, T)
    w = weights.detach().masked_fill(~mask, 0.0)  # (B, T)
    return (w * nll).sum() / num_items


def ga_loss(logps: Tensor, mask: Tensor, num_items: Tensor | float) -> Tensor:
    """Gradient ascent: minus the mean NLL of the forget tokens (open-unlearning `GradAscent` = -(HF mean NLL)).

        L = -sum_t m_t * (-logp_t) / N = sum_t m_t * logp_t / N

    N (`num_items`) is the step's global count of valid targets; open-unlearning divides per micro-batch (equal
    without accumulation). Minimising L lowers every log-prob: dL/dlogp_t = m_t / N.

    Args:
        logps: log-prob of each forget token, with gradient.  (B, T)
        mask: valid targets.  (B, T) bool
        num_items: N.  scalar tensor or float

    Returns:
        loss, a scalar.
    """
    return logps.masked_fill(~mask, 0.0).sum() / num_items


def mean_nll(logps: Tensor, mask: Tensor, num_items: Tensor | float) -> Tensor:
    """Token-mean NLL with a global normaliser: the retain term of GA / NPO (and plain SFT).

    L = sum_t m_t * (-logp_t) / N
    """
    return -logps.masked_fill(~mask, 0.0).sum() / num_items


# ------------------------------------------------------------------------------------------ per-sequence losses


def _sequence_groups(mask: Tensor, segment_ids: Tensor) -> tuple[Tensor, int]:
    """Flat group index of every position, one group per (row, segment); and the number of groups."""
    B = mask.shape[0]
    seg = segment_ids - segment_ids.min() if segment_ids.numel() else segment_ids  # (B, T)
    n_seg = int(seg.max()) + 1 if seg.numel() else 1
    rows = torch.arange(B, device=mask.device).unsqueeze(1)  # (B, 1)
    return (rows * n_seg + seg).flatten(), B * n_seg  # (B*T,), G


def sequence_sums(values: Tensor, mask: Tensor, segment_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence sums of `values` over valid positions, and the valid count of each sequence.

    A sequence is every position with the same (row, segment id): a whole row when padded (segment ids 0), a segment
    between `position_ids` resets when padding-free or packed. Vectorised, differentiable in `values`.

    Args:
        values: per-token values.  (B, T)
        mask: valid targets.  (B, T) bool
        segment_ids: sequence id of each position within its row.  (B, T) long

    Returns:
        (sums, counts) over the sequences that have at least one valid position, in (row, segment) order.  (S,) each
    """
    group, n_groups = _sequence_groups(mask, segment_ids)
    v = values.masked_fill(~mask, 0.0).flatten()  # (B*T,)
    sums = v.new_zeros(n_groups).index_add(0, group, v)  # (G,)
    counts = torch.zeros(n_groups, dtype=torch.long, device=mask.device).index_add_(0, group, mask.flatten().long())
    present = counts > 0
    return sums[present], counts[present]


def count_sequences(mask: Tensor, segment_ids: Tensor) -> Tensor:
    """Number of sequences with at least one valid target: the micro-batch's share of NPO / SimNPO's row count S."""
    return (sequence_sums(mask.float(), mask, segment_ids)[1] > 0).sum()


def npo_loss(
    logps: Tensor, ref_logps: Tensor, mask: Tensor, segment_ids: Tensor, beta: float, num_rows: Tensor | float
) -> Tensor:
    """Negative preference optimisation on the forget sequences, reference log-probs precomputed.

    Paper: Zhang, Lin, Bai, Mei, https://arxiv.org/abs/2404.05868; open-unlearning `NPO` (`compute_dpo_loss` with
    no winner), sign conventions as there.

        Delta_i = sum_{t in i} (logp_t - ref_logp_t)
        L = -(2 / beta) * (1 / S) * sum_i log sigmoid(-beta * Delta_i)

    S (`num_rows`) is the number of sequences over the whole step (all micro-batches and processes).
    dL/dlogp_t = 2 sigmoid(beta Delta_i) / S: gradient ascent on sequence sums (scaled 1/S) at Delta = 0, fading as
    Delta -> -inf. As beta -> 0, L - 2 ln 2 / beta -> mean Delta.

    Args:
        logps: policy log-prob of each forget token, with gradient.  (B, T)
        ref_logps: frozen reference log-probs of the same tokens (stored `ref_logps`).  (B, T)
        mask: valid targets.  (B, T) bool
        segment_ids: sequence id within each row (padding-free / packed layouts).  (B, T) long
        beta: > 0.
        num_rows: S.  scalar tensor or float

    Returns:
        loss, a scalar.
    """
    log_ratio = logps - ref_logps.detach().to(logps.dtype)  # (B, T)
    delta, _ = sequence_sums(log_ratio, mask, segment_ids)  # (S_local,)
    return -(2.0 / beta) * F.logsigmoid(-beta * delta).sum() / num_rows


def simnpo_loss(
    logps: Tensor, mask: Tensor, segment_ids: Tensor, beta: float, gamma: float, num_rows: Tensor | float
) -> Tensor:
    """SimNPO: reference-free NPO on length-normalised sequence NLLs.

    Paper: Fan et al., "Simplicity Prevails", https://arxiv.org/abs/2410.07163. Code: OPTML-Group/Unlearn-Simple
    @f1a355d, TOFU/dataloader.py (`simnpo`): `get_batch_loss / loss_mask.sum(-1) - gamma`, then
    `-logsigmoid(beta * .).mean() * 2 / beta`; open-unlearning's simnpo.py agrees.

        lbar_i = sum_{t in i} (-logp_t) / k_i          k_i = the sequence's shifted targets (the code counts the
                                                       unshifted labels, one more when the first label is unmasked)
        L = -(2 / beta) * (1 / S) * sum_i log sigmoid(beta * (lbar_i - gamma))

    S (`num_rows`) is the step's global sequence count. Minimising L raises every lbar_i; at gamma = 0 and
    lbar = 0, dL/dlbar_i = -1/S.

    Args:
        logps: policy log-prob of each forget token, with gradient.  (B, T)
        mask: valid targets.  (B, T) bool
        segment_ids: sequence id within each row.  (B, T) long
        beta: > 0.
        gamma: the margin, inside beta as the code writes it.
        num_rows: S.  scalar tensor or float

    Returns:
        loss, a scalar.
    """
    nll_sum, counts = sequence_sums(-logps, mask, segment_ids)  # (S_local,) each
    lbar = nll_sum / counts.to(nll_sum.dtype)  # (S_local,)
    return -(2.0 / beta) * F.logsigmoid(beta * (lbar - gamma)).sum() / num_rows
