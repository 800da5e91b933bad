"""AlignDistil: a token-adaptive extrapolated teacher, distilled by β_t-weighted reverse KL (pure torch).

Paper: Zhang et al., "AlignDistil: Token-Level Language Model Alignment as Adaptive Policy Distillation", ACL 2025,
https://arxiv.org/abs/2503.02832. Official code: https://github.com/songmzhang/AlignDistil
(`OpenRLHF/openrlhf/trainer/aligndistil_offpolicy_trainer.py`, `--reward_boost_type aligndistil`).
Spec: specs/aligndistil.md sections 2, 3 and 6.

Per response position t (all three models read the same prefix; z are full-vocabulary logits, fp32, no gradient for
the two frozen models):

    p^d = softmax(z^d),  p^o = softmax(z^o)                      DPO model, "other" model (reverse DPO or reference)
    D_t = 1/2 Σ_v |p^d − p^o|   (distance "tvd", paper Eq.16)   or   Σ_v |p^d − p^o|   ("l1", official code)
    α_t = r·D_t + ε              (alpha "adaptive")              or   ratio             ("constant")
    z*  = z^d + α_t (z^d − z^o)  (teacher "contrastive", Eq.15/17)
    z*  = z^o + α_t (z^d − z^o)  (teacher "dpo_ref", Theorem 1: α z^d + (1 − α) z^o)
    β_t = β0 / α_t,   KL_t = Σ_v p^θ (log p^θ − log softmax(z*))     analytic reverse KL(student ‖ teacher)
    L   = (1/S) Σ_i (1/|M_i|) Σ_{t∈M_i} β_t KL_t                      length-normalised, mean over S sequences

Shift invariance: a constant added to z^d or z^o changes neither D_t nor π*, so raw logits and log-softmax outputs
are interchangeable (the code below combines log-softmax outputs). Gradient: ∂(β_t KL_t)/∂z^θ = β_t p ⊙ (log p −
log π* − KL_t); the teacher, α_t and β_t are constants.

Memory. `aligndistil_loss` takes hidden states (N, H) at the N response positions and each model's LM head, and
projects `chunk_tokens` positions at a time, so the largest tensors are one chunk's (chunk_tokens, V) buffers; no
(N, V) or (B, T, V) tensor exists in the forward or the backward. `_ChunkedAlignDistil` is the autograd function: its
forward keeps only (N,) per-token results, its backward re-projects one chunk at a time (what non-reentrant
activation checkpointing per chunk would do). ZeRO-3 heads: `aligndistil_loss` runs the check of the vocabularies and
the forward inside the caller's `gather` context (a partition is empty outside it; the student's head is then seen at
its full shape by autograd, as TRL's fused LM head calls its kernel), and the backward enters it again before it
allocates or reads anything shaped like a head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

TEACHERS = ("contrastive", "dpo_ref")
ALPHAS = ("adaptive", "constant")
DISTANCES = ("tvd", "l1")


class NonFiniteLogitsError(ValueError):
    """A frozen model produced a non-finite logit. `model` is "dpo" or "other", `index` the flat response position
    (row-major over the micro-batch); the trainer turns these into a step, a row and a position."""

    def __init__(self, model: str, index: int):
        self.model, self.index = model, index
        super().__init__(f"non-finite {model} logits at response position {index} (flat, row-major)")


@dataclass(frozen=True)
class TeacherSettings:
    """The teacher's settings (spec section 2). Validated here; the config names the keys the user set."""

    teacher: str = "contrastive"
    alpha: str = "adaptive"
    r: float = 20.0
    eps: float = 1e-3
    ratio: float = 1.0
    distance: str = "tvd"
    beta0: float = 0.1

    def __post_init__(self):
        problems = []
        for key, valid in (("teacher", TEACHERS), ("alpha", ALPHAS), ("distance", DISTANCES)):
            if getattr(self, key) not in valid:
                problems.append(f"{key} must be one of {list(valid)}, got {getattr(self, key)!r}")
        for key in ("r", "eps", "ratio", "beta0"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                problems.append(f"{key} must be finite and > 0, got {value!r}")
        if self.teacher == "dpo_ref" and self.alpha == "adaptive":
            problems.append("teacher 'dpo_ref' takes alpha 'constant' only (the Theorem-1 teacher with a fixed ratio)")
        if problems:
            raise ValueError("invalid aligndistil teacher settings:\n- " + "\n- ".join(problems))

    def describe(self) -> str:
        """One line for logs, e.g. "teacher contrastive, alpha adaptive (r 20, eps 0.001), distance tvd, beta0 0.1"."""
        alpha = f"r {self.r:g}, eps {self.eps:g}" if self.alpha == "adaptive" else f"ratio {self.ratio:g}"
        return f"teacher {self.teacher}, alpha {self.alpha} ({alpha}), distance {self.distance}, beta0 {self.beta0:g}"

    def same_models_note(self) -> str:
        """What a run amounts to when the DPO and the other model are the same (the warning of spec section 9)."""
        weight = self.beta0 / (self.eps if self.alpha == "adaptive" else self.ratio)
        return (
            f"the contrast is zero, α_t = {'ε' if self.alpha == 'adaptive' else 'ratio'} everywhere and the run is "
            f"plain KD to π_dpo with weight β0/α = {weight:g}"
        )


# ------------------------------------------------------------------------------------------------ the teacher


def distribution_distance(logp_d: Tensor, logp_o: Tensor, distance: str = "tvd") -> Tensor:
    """D_t between the two frozen models' next-token distributions, from their log-probs.

        tvd: D_t = 1/2 Σ_v |p^d(v) − p^o(v)| ∈ [0, 1]      l1: D_t = Σ_v |p^d(v) − p^o(v)| ∈ [0, 2]

    Args:
        logp_d, logp_o: log-softmax of each model's logits.  (n, V) float
        distance: "tvd" (paper) or "l1" (official code; l1 with r equals tvd with 2r).

    Returns:
        D.  (n,)
    """
    l1 = logp_d.exp().sub_(logp_o.exp()).abs_().sum(dim=-1)  # (n,) two (n, V) temporaries
    return 0.5 * l1 if distance == "tvd" else l1


def token_alpha(distance_t: Tensor, settings: TeacherSettings) -> Tensor:
    """α_t = r·D_t + ε (adaptive; no clipping) or the constant `ratio`.  (n,) -> (n,)"""
    if settings.alpha == "adaptive":
        return settings.r * distance_t + settings.eps
    return torch.full_like(distance_t, settings.ratio)


def combine_teacher(logp_d: Tensor, logp_o: Tensor, alpha_t: Tensor, teacher: str) -> Tensor:
    """log π* = log_softmax of the extrapolated logits z*; α_t broadcasts over the vocabulary.  (n, V) -> (n, V)

    contrastive: z* = z^d + α (z^d − z^o)      dpo_ref: z* = z^o + α (z^d − z^o)

    z* is built in place in one (n, V) buffer, then log-softmaxed; the inputs are not modified.
    """
    z = torch.sub(logp_d, logp_o).mul_(alpha_t.unsqueeze(-1)).add_(logp_d if teacher == "contrastive" else logp_o)
    return torch.log_softmax(z, dim=-1)


@torch.no_grad()
def teacher_log_probs(z_d: Tensor, z_o: Tensor, settings: TeacherSettings) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher of one chunk of positions: (log π*, α_t, D_t), all float32, no gradient.

    Args:
        z_d, z_o: the DPO and other model's logits (raw or log-softmax: shift invariant).  (n, V)
        settings: teacher, alpha, r, eps, ratio, distance.

    Returns:
        log π* (n, V), α (n,), D (n,), float32.
    """
    dtype = _compute_dtype(z_d)  # float32 (float64 stays float64)
    logp_d = torch.log_softmax(z_d.to(dtype), dim=-1)  # (n, V)
    logp_o = torch.log_softmax(z_o.to(dtype), dim=-1)  # (n, V)
    d = distribution_distance(logp_d, logp_o, settings.distance)  # (n,)
    alpha_t = token_alpha(d, settings)  # (n,)
    return combine_teacher(logp_d, logp_o, alpha_t, settings.teacher), alpha_t, d


def reverse_kl(student_logits: Tensor, teacher_logp: Tensor) -> Tensor:
    """Analytic KL(p^θ ‖ π*) = Σ_v p (log p − log π*) over the full vocabulary, with gradient to the student.

    Args:
        student_logits: z^θ.  (..., V)
        teacher_logp: log π*, treated as a constant.  (..., V)

    Returns:
        KL_t.  (...)
    """
    logp = torch.log_softmax(student_logits, dim=-1)
    return (logp.exp() * (logp - teacher_logp.detach())).sum(dim=-1)


def sequence_mean_loss(per_token: Tensor, seq_index: Tensor, num_sequences: Tensor | float) -> Tensor:
    """Length-normalise each sequence, then average over sequences (official `--reward_len_norm`, Theorem 1's β/|y|).

        L = (1/S) Σ_i (1/|M_i|) Σ_{t∈M_i} v_t

    E.g. v = [0.2, 0.4 | 1.0] (two sequences), S = 2: (0.3 + 1.0) / 2 = 0.65 (a token mean would give 0.5333).

    Args:
        per_token: v_t, e.g. β_t·KL_t.  (N,)
        seq_index: sequence of each position, integers in [0, B); a sequence's positions need not be contiguous.  (N,)
        num_sequences: S, the step's global sequence count (all accumulation micro-batches and processes).

    Returns:
        L, a scalar with gradient w.r.t. `per_token`.
    """
    if per_token.numel() == 0:
        return per_token.sum() / num_sequences
    lengths = torch.bincount(seq_index, minlength=int(seq_index.max()) + 1).to(per_token.dtype)  # (B,)
    return (per_token / lengths[seq_index]).sum() / num_sequences


# ---------------------------------------------------------------------------------------- the chunked loss


def project_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(n, H) hidden states -> (n, V) logits through one LM head, in float32 (float64 for float64 inputs, as the
    tests' gradcheck uses), without rounding the product to bf16 first."""
    if hidden.device.type == "cuda" and weight.dtype in (torch.float16, torch.bfloat16):
        logits = torch.mm(hidden.to(weight.dtype), weight.t(), out_dtype=torch.float32)  # fp32 output, torch >= 2.8
    else:
        dtype = _compute_dtype(hidden)
        logits = torch.mm(hidden.to(dtype), weight.to(dtype).t())
    if bias is not None:
        logits.add_(bias.to(logits.dtype))
    return logits  # (n, V)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a[n, v]·b[n, v] per row, as a batched matmul: no (n, V) product is materialised.  -> (n,)"""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _log_probs(hidden: Tensor, weight: Tensor, bias: Tensor | None, bad: Tensor | None = None) -> Tensor:
    """log_softmax of one model's logits for a chunk, the logits freed at once; `bad` (n,) marks non-finite rows."""
    z = project_logits(hidden, weight, bias)  # (n, V)
    if bad is not None:  # a row sum is non-finite iff the row holds an inf or a nan (one cheap pass, no (n, V) mask)
        bad.copy_(~torch.isfinite(z.sum(-1)))
    return torch.log_softmax(z, dim=-1)


class _ChunkedAlignDistil(torch.autograd.Function):
    """Per-token KL(p^θ ‖ π*) (differentiable w.r.t. the student's hidden states, head weight and bias) and the
    no-gradient statistics [α, D, KL(p^θ‖p^d), KL(p^θ‖p^o), β0 Σ_v p^θ (log p^d − log p^o)], chunk by chunk.

    Working set per chunk: forward at most 6 (n, V) buffers (log p^θ, p^θ, log p^d, log p^o and two temporaries),
    backward at most 4; the row sums are batched matmuls, the gradient is built in place in log π*'s buffer."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_d, w_d, b_d, h_o, w_o, b_o, settings, chunk_tokens, gather):
        n_pos = h_s.shape[0]
        device, dtype = h_s.device, _compute_dtype(h_s)
        kl = torch.zeros(n_pos, dtype=dtype, device=device)  # (N,)
        stats = torch.zeros(n_pos, 5, dtype=dtype, device=device)  # (N, 5)
        bad = torch.zeros(2, n_pos, dtype=torch.bool, device=device)  # (2, N) non-finite dpo / other logits
        with torch.autocast(device.type, enabled=False):  # the heads are gathered by the caller (aligndistil_loss)
            for start in range(0, n_pos, chunk_tokens):
                sl = slice(start, min(start + chunk_tokens, n_pos))
                logp_s = _log_probs(h_s[sl], w_s, b_s)  # (n, V) student
                p_s = logp_s.exp()
                neg_entropy = _rowdot(p_s, logp_s)  # (n,) Σ p log p
                logp_d = _log_probs(h_d[sl], w_d, b_d, bad[0, sl])  # (n, V) DPO model
                logp_o = _log_probs(h_o[sl], w_o, b_o, bad[1, sl])  # (n, V) other model
                cross_d, cross_o = _rowdot(p_s, logp_d), _rowdot(p_s, logp_o)  # (n,) Σ p log p^d, Σ p log p^o
                d = distribution_distance(logp_d, logp_o, settings.distance)  # (n,)
                alpha_t = token_alpha(d, settings)  # (n,)
                logp_t = combine_teacher(logp_d, logp_o, alpha_t, settings.teacher)  # (n, V) log π*
                del logp_d, logp_o
                kl[sl] = neg_entropy - _rowdot(p_s, logp_t)
                stats[sl, 0] = alpha_t
                stats[sl, 1] = d
                stats[sl, 2] = neg_entropy - cross_d
                stats[sl, 3] = neg_entropy - cross_o
                stats[sl, 4] = settings.beta0 * (cross_d - cross_o)
                del logp_s, p_s, logp_t
        if bad.any():
            which, index = divmod(int(bad.flatten().nonzero()[0]), n_pos)
            raise NonFiniteLogitsError(("dpo", "other")[which], index)
        # Saved: the inputs (hidden states, heads) and (N,) vectors; never a vocabulary-sized activation.
        ctx.save_for_backward(h_s, w_s, b_s, h_d, w_d, b_d, h_o, w_o, b_o, kl, stats[:, 0].contiguous())
        ctx.settings, ctx.chunk_tokens, ctx.gather = settings, chunk_tokens, gather
        ctx.mark_non_differentiable(stats)
        return kl, stats

    @staticmethod
    def backward(ctx, grad_kl, _grad_stats):
        h_s, w_s, b_s, h_d, w_d, b_d, h_o, w_o, b_o, kl, alpha = ctx.saved_tensors
        settings, chunk_tokens = ctx.settings, ctx.chunk_tokens
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = kl.dtype  # float32 (float64 for float64 inputs): gradients accumulate in it
        with torch.autocast(h_s.device.type, enabled=False), ctx.gather():  # ZeRO-3: w_s, b_s full-sized from here
            grad_h = torch.zeros(h_s.shape, dtype=dtype, device=h_s.device) if need_h else None
            grad_w = torch.zeros(w_s.shape, dtype=dtype, device=w_s.device) if need_w else None
            grad_b = torch.zeros(b_s.shape, dtype=dtype, device=b_s.device) if need_b else None
            if grad_kl is not None:
                grad_kl = grad_kl.to(dtype)
                for start in range(0, h_s.shape[0], chunk_tokens):
                    sl = slice(start, min(start + chunk_tokens, h_s.shape[0]))
                    logp_d = _log_probs(h_d[sl], w_d, b_d)
                    logp_o = _log_probs(h_o[sl], w_o, b_o)
                    g = combine_teacher(logp_d, logp_o, alpha[sl], settings.teacher)  # (n, V) log π*, the saved α
                    del logp_d, logp_o
                    logp_s = _log_probs(h_s[sl], w_s, b_s)
                    # dKL_t/dz = p ⊙ (log p − log π* − KL_t), times the incoming gradient of KL_t; built in g in place
                    g.neg_().add_(logp_s).sub_(kl[sl].unsqueeze(-1)).mul_(logp_s.exp_())
                    g.mul_(grad_kl[sl].unsqueeze(-1))
                    del logp_s
                    if need_h:  # a low-precision head multiplies in its dtype, as autograd of a bf16 linear does
                        low = w_s.dtype in (torch.float16, torch.bfloat16)
                        grad_h[sl] = g.to(w_s.dtype) @ w_s if low else g @ w_s.to(dtype)
                    if need_w:
                        grad_w.addmm_(g.t(), h_s[sl].to(dtype))
                    if need_b:
                        grad_b += g.sum(0)
        grad_h = grad_h.to(h_s.dtype) if need_h else None
        grad_w = grad_w.to(w_s.dtype) if need_w else None
        grad_b = grad_b.to(b_s.dtype) if need_b else None
        return grad_h, grad_w, grad_b, *([None] * 9)


class AlignDistilOutput(NamedTuple):
    """`loss` (scalar, with gradient) and the step tensors, each (N,) float32 without gradient, row-major over the
    micro-batch's response positions: `kl` (unweighted KL_t), `alpha`, `distance`, `beta_t`, `kl_dpo`
    (KL(p^θ‖p^d)), `kl_other` (KL(p^θ‖p^o)) and `reward` (β0 Σ_v p^θ (log p^d − log p^o), summed per sequence for the
    `expected_reward` metric).

    A named tuple, not a dataclass: the trainer returns it from the student's forward, and DeepSpeed ZeRO-3 hooks a
    module's outputs only inside tuples, lists and dicts. Through the `loss` tensor its backward pre-hook gathers an
    untied LM head (read in the forward) again, so the head's full-sized gradient is accumulated while the head is
    whole; in a dataclass the loss is invisible to it and AccumulateGrad meets the empty partition ("The size of
    tensor a (0) must match the size of tensor b (H)")."""

    loss: Tensor
    kl: Tensor
    alpha: Tensor
    distance: Tensor
    beta_t: Tensor
    kl_dpo: Tensor
    kl_other: Tensor
    reward: Tensor


class _no_gather:
    """The `gather` of unsharded heads: nothing to gather (a context manager that does nothing)."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def aligndistil_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    dpo_hidden: Tensor,
    dpo_weight: Tensor,
    dpo_bias: Tensor | None,
    other_hidden: Tensor,
    other_weight: Tensor,
    other_bias: Tensor | None,
    seq_index: Tensor,
    num_sequences: Tensor | float,
    settings: TeacherSettings,
    chunk_tokens: int = 256,
    gather: Callable[[], object] | None = None,
) -> AlignDistilOutput:
    """AlignDistil's loss from hidden states and LM heads, `chunk_tokens` positions at a time (spec section 3).

        L = (1/S) Σ_i (1/|M_i|) Σ_{t∈M_i} β_t KL(p^θ_t ‖ π*_t)

    Gradient reaches the student's hidden states, head weight and bias only; the frozen models' inputs are constants
    (their logits are computed in float32 without gradient). Peak memory is one chunk's (chunk_tokens, V) buffers in
    both the forward and the backward, independent of N. A non-finite DPO or other-model logit raises
    `NonFiniteLogitsError` naming the model and the flat position.

    Args:
        student_hidden: the student's last hidden state at each response position (the one predicting the token).
            (N, H_s)
        student_weight, student_bias: the student's LM head.  (V, H_s), (V,) or None
        dpo_hidden, dpo_weight, dpo_bias: the DPO model's, same positions.  (N, H_d), (V, H_d), (V,) or None
        other_hidden, other_weight, other_bias: the reverse-DPO (contrastive) or reference (dpo_ref) model's.
        seq_index: sequence of each position within the micro-batch.  (N,) long
        num_sequences: S, the step's global number of sequences.
        settings: the teacher (`TeacherSettings`).
        chunk_tokens: positions projected at once.
        gather: context-manager factory (default: none needed) entered around every head access: once around the vocabulary check and the
            forward, once in the backward (ZeRO-3: `lambda: trl.trainer.utils.maybe_gather_lm_head_ctx(*heads)`).

    Returns:
        `AlignDistilOutput`.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    gather = gather or _no_gather
    with gather():  # ZeRO-3: the heads' shapes, and the forward's projections, are only full inside it
        v = student_weight.shape[0]
        if dpo_weight.shape[0] != v or other_weight.shape[0] != v:
            raise ValueError(
                f"LM heads of different vocabularies: student {v}, dpo {dpo_weight.shape[0]}, "
                f"other {other_weight.shape[0]}"
            )
        kl, stats = _ChunkedAlignDistil.apply(
            student_hidden,
            student_weight,
            student_bias,
            dpo_hidden.detach(),
            dpo_weight.detach(),
            None if dpo_bias is None else dpo_bias.detach(),
            other_hidden.detach(),
            other_weight.detach(),
            None if other_bias is None else other_bias.detach(),
            settings,
            chunk_tokens,
            gather,
        )
    alpha = stats[:, 0]
    beta_t = settings.beta0 / alpha  # (N,)
    loss = sequence_mean_loss(beta_t * kl, seq_index, num_sequences)
    return AlignDistilOutput(
        loss=loss,
        kl=kl.detach(),
        alpha=alpha,
        distance=stats[:, 1],
        beta_t=beta_t,
        kl_dpo=stats[:, 2],
        kl_other=stats[:, 3],
        reward=stats[:, 4],
    )


def naive_aligndistil_loss(
    student_logits: Tensor,
    dpo_logits: Tensor,
    other_logits: Tensor,
    mask: Tensor,
    num_sequences: Tensor | float,
    settings: TeacherSettings,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reference implementation with full `[B, T, V]` logits, for tests and benchmarks only (any float dtype).

    Args:
        student_logits, dpo_logits, other_logits: logits at every position, in the frame where position t predicts a
            response token iff mask[b, t].  (B, T, V)
        mask: response positions.  (B, T) bool
        num_sequences: S.
        settings: the teacher.

    Returns:
        (loss, {"kl", "alpha", "distance", "beta_t"}: (N,) at the masked positions, row-major).
    """
    with torch.no_grad():
        logp_d = torch.log_softmax(dpo_logits, dim=-1)
        logp_o = torch.log_softmax(other_logits, dim=-1)
        d = distribution_distance(logp_d, logp_o, settings.distance)  # (B, T)
        alpha_t = token_alpha(d, settings)
        logp_t = combine_teacher(logp_d, logp_o, alpha_t, settings.teacher)  # (B, T, V)
    kl = reverse_kl(student_logits, logp_t)  # (B, T)
    beta_t = settings.beta0 / alpha_t
    per_seq = (beta_t * kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    loss = per_seq.sum() / num_sequences
    return loss, {"kl": kl[mask], "alpha": alpha_t[mask], "distance": d[mask], "beta_t": beta_t[mask]}
