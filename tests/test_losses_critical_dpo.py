"""Tests for tokentrain/losses/critical_dpo.py: spec vectors (section 6), naive loops, TRL parity, gradients."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tokentrain.losses.critical_dpo import contrastive_scores, token_weighted_dpo_loss

ATOL = 1e-6
LOG2 = math.log(2.0)  # 0.6931472: the loss of a u = 0 column in position_mean


@pytest.fixture(autouse=True)
def float64():
    """Every tensor these tests make is float64; restored afterwards so other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), atol=atol, rtol=0)


def from_deltas(delta, mask, weights, ref_value=-0.7):
    """(policy_logps, ref_logps, mask, weights) with policy − ref = delta; the reference is a nonzero constant."""
    delta, mask, weights = torch.tensor(delta), torch.tensor(mask), torch.tensor(weights)
    ref = torch.full_like(delta, ref_value) * mask
    return (ref + delta).requires_grad_(), ref, mask, weights


def naive_sigmoid_loss(x):
    return -math.log(1.0 / (1.0 + math.exp(-x)))


# ---------------------------------------------------------------- A: contrastive estimation score


def test_vector_a_contrastive_score():
    z_pos = torch.tensor([[2.0, 0.5, -1.0]])  # (1, V=3)
    z_neg = torch.tensor([[0.0, 1.5, -1.0]])
    y, m = torch.tensor([1]), torch.tensor([True])
    # b = 1: c = 2·z⁺ − z⁻ = [4.0, −0.5, −1.0], softmax [0.982466, 0.010914, 0.006620] -> s = 0.0109142
    s = contrastive_scores(z_pos, z_neg, y, m, ce_beta=1.0)
    close(s, [0.0109142])
    close(1 - s, [0.9890858])  # the stored rejected weight
    # log-softmax inputs: the per-position constants cancel, same s
    close(contrastive_scores(z_pos.log_softmax(-1), z_neg.log_softmax(-1), y, m), [0.0109142])
    # b = 0 is the positive model's probability; larger b sharpens the contrast
    for b, expected in [(0.0, 0.1752904), (0.5, 0.0466126), (2.0, 0.0005523)]:
        close(contrastive_scores(z_pos, z_neg, y, m, ce_beta=b), [expected])


def test_contrastive_score_naive_loop_mask_and_garbage():
    g = torch.Generator().manual_seed(0)
    B, T, V, b = 3, 5, 7, 1.3
    z_pos, z_neg = torch.randn(B, T, V, generator=g) * 3, torch.randn(B, T, V, generator=g) * 3
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    # padding: garbage logits and ignore-index targets must not matter
    z_pos[~mask], z_neg[~mask], y[~mask] = float("nan"), float("inf"), -100
    s = contrastive_scores(z_pos, z_neg, y, mask, ce_beta=b)  # (B, T)
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                assert s[i, t] == 0.0
                continue
            c = [(1 + b) * z_pos[i, t, v].item() - b * z_neg[i, t, v].item() for v in range(V)]
            expected = math.exp(c[y[i, t]]) / sum(math.exp(x) for x in c)
            close(s[i, t], expected)


def test_contrastive_score_upcasts_low_precision():
    g = torch.Generator().manual_seed(1)
    z_pos, z_neg = torch.randn(4, 11, generator=g), torch.randn(4, 11, generator=g)
    y, m = torch.randint(0, 11, (4,), generator=g), torch.ones(4, dtype=torch.bool)
    s16 = contrastive_scores(z_pos.bfloat16(), z_neg.bfloat16(), y, m)
    assert s16.dtype == torch.float32  # combined in float32, as the official code
    s64 = contrastive_scores(z_pos.bfloat16().double(), z_neg.bfloat16().double(), y, m)
    close(s16.double(), s64, atol=1e-6)


# ---------------------------------------------------------------- B: one pair, two completion tokens

# Δ^w = [0.1, −0.2], Δ^l = [0.3, 0.1], s^l = [0.9, 0.05] -> rejected weights b = [0.1, 0.95]
B_DELTA = [[0.1, -0.2], [0.3, 0.1]]
B_MASK = [[1.0, 1.0], [1.0, 1.0]]
B_REJECTED = [[1.0, 1.0], [0.1, 0.95]]  # weighting: rejected (a = 1)
B_NONE = [[1.0, 1.0], [1.0, 1.0]]  # weighting: none
B_BOTH = [[0.5, 0.25], [0.1, 0.95]]  # weighting: both, a = [0.5, 0.25]


@pytest.mark.parametrize(
    "weights, reduction, beta, expected",
    [
        # h = (0.1 − 0.2) − (0.1·0.3 + 0.95·0.1) = −0.1 − 0.125 = −0.225; −log σ(−0.225) = 0.8119620
        (B_REJECTED, "sequence", 1.0, 0.8119620),
        (B_REJECTED, "sequence", 0.1, 0.7044605),  # −log σ(−0.0225)
        # h = −0.1 − 0.4 = −0.5: plain DPO
        (B_NONE, "sequence", 1.0, 0.9740770),
        (B_NONE, "sequence", 0.1, 0.7184596),
        # u = [0.1 − 0.03, −0.2 − 0.095] = [0.07, −0.295]; losses [0.6896533, 0.7080060], mean 0.6988296
        (B_REJECTED, "position_mean", 0.1, 0.6988296),
        (B_REJECTED, "position_mean", 1.0, 0.7551228),
        # a = [0.5, 0.25]: h = (0.05 − 0.05) − 0.125 = −0.125
        (B_BOTH, "sequence", 0.1, 0.6994167),
        (B_BOTH, "sequence", 1.0, 0.7575990),
        # u = [0.05 − 0.03, −0.05 − 0.095] = [0.02, −0.145]
        (B_BOTH, "position_mean", 0.1, 0.6962856),
    ],
)
def test_vector_b(weights, reduction, beta, expected):
    out = token_weighted_dpo_loss(*from_deltas(B_DELTA, B_MASK, weights), beta=beta, reduction=reduction)
    close(out.loss, expected)
    close(out.loss_sum / out.num_units, expected)
    assert out.num_units == (1 if reduction == "sequence" else 2)


def test_vector_b_position_mean_terms_and_padding():
    out = token_weighted_dpo_loss(*from_deltas(B_DELTA, B_MASK, B_REJECTED), beta=0.1, reduction="position_mean")
    close(out.loss_sum, 0.6896533 + 0.7080060)  # the two position losses
    # padded to P = 4: two more u = 0 columns at log 2 each -> (0.6896533 + 0.7080060 + 2·log 2) / 4 = 0.6959884
    pad = lambda rows: [r + [0.0, 0.0] for r in rows]  # noqa: E731
    out = token_weighted_dpo_loss(
        *from_deltas(pad(B_DELTA), pad(B_MASK), pad(B_REJECTED)), beta=0.1, reduction="position_mean"
    )
    close(out.loss, 0.6959884)
    assert out.num_units == 4


# ---------------------------------------------------------------- C: collated batch, B = 2, P = 4

# rows: chosen 1, chosen 2, rejected 1, rejected 2 (2-token and 1-token prompts)
C_MASK = [[0, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]]
C_DELTA = [[0, 0.2, -0.1, 0], [0.05, 0.3, -0.2, 0], [0, 0.4, -0.3, 0.2], [0.6, 0, 0, 0]]
C_REJECTED = [[0, 1, 1, 0], [1, 1, 1, 0], [0, 0.9, 0.5, 0.1], [0.75, 0, 0, 0]]
C_NONE = C_MASK


def c_batch(weights=C_REJECTED, pad_to=4):
    pad = lambda rows: [[float(x) for x in r] + [0.0] * (pad_to - 4) for r in rows]  # noqa: E731
    return from_deltas(pad(C_DELTA), pad(C_MASK), pad(weights))


@pytest.mark.parametrize(
    "weights, reduction, beta, expected",
    [
        # h = [0.1 − (0.36 − 0.15 + 0.02), 0.15 − 0.45] = [−0.13, −0.30]; per pair [0.6996683, 0.7082597]
        (C_REJECTED, "sequence", 0.1, 0.7039640),
        (C_REJECTED, "sequence", 1.0, 0.8073067),
        # h = [0.1 − 0.3, 0.15 − 0.6] = [−0.20, −0.45]
        (C_NONE, "sequence", 0.1, 0.7095487),
        (C_NONE, "sequence", 1.0, 0.8706939),
        # u = [[0, −0.16, 0.05, −0.02], [−0.40, 0.30, −0.20, 0]]; mean of 8 cells, each u = 0 cell adds log 2
        (C_REJECTED, "position_mean", 0.1, 0.6958844),
        (C_REJECTED, "position_mean", 1.0, 0.7249755),
        (C_NONE, "position_mean", 0.1, 0.6972960),
    ],
)
def test_vector_c(weights, reduction, beta, expected):
    out = token_weighted_dpo_loss(*c_batch(weights), beta=beta, reduction=reduction)
    close(out.loss, expected)


def test_vector_c_pieces():
    out = token_weighted_dpo_loss(*c_batch(), beta=0.1, reduction="sequence")
    close(out.losses, [0.6996683, 0.7082597])
    close(out.margins, [-0.013, -0.030])  # β·h
    close(out.chosen_rewards, [0.01, 0.015])  # β·Σ Δ^w = 0.1·[0.1, 0.15]
    close(out.rejected_rewards, [0.023, 0.045])  # β·Σ b·Δ^l = 0.1·[0.23, 0.45]
    out = token_weighted_dpo_loss(*c_batch(), beta=0.1, reduction="position_mean")
    close(out.margins, [-0.013, -0.030])  # same β·h: Σ_p u = h
    assert out.num_units == 8


def test_vector_c_padding():
    # padded to P = 6: 4 more log 2 cells -> (8·0.6958844 + 4·log 2) / 12 = 0.6949720; sequence unchanged
    padded = token_weighted_dpo_loss(*c_batch(pad_to=6), beta=0.1, reduction="position_mean")
    close(padded.loss, 0.6949720)
    close(padded.loss, (8 * 0.6958844 + 4 * LOG2) / 12)
    assert padded.num_units == 12
    close(token_weighted_dpo_loss(*c_batch(pad_to=6), beta=0.1, reduction="sequence").loss, 0.7039640)


@pytest.mark.parametrize("reduction, expected", [("sequence", 1.5039640), ("position_mean", 1.4958844)])
def test_vector_c_rpo_alpha(reduction, expected):
    policy, ref, mask, weights = c_batch()
    # chosen policy log-probs [−0.5, −1.0] (columns 1, 2) and [−0.2, −0.7, −1.6] (columns 0, 1, 2)
    policy = torch.tensor([[0, -0.5, -1.0, 0], [-0.2, -0.7, -1.6, 0]] + policy[2:].tolist())
    ref = torch.cat([policy[:2] - torch.tensor(C_DELTA[:2]), ref[2:]])  # keep Δ^w of vector C
    out = token_weighted_dpo_loss(policy, ref, mask, weights, beta=0.1, reduction=reduction, rpo_alpha=1.0)
    close(out.nll_sum / out.num_nll_tokens, 0.8)  # (0.5 + 1.0 + 0.2 + 0.7 + 1.6) / 5
    close(out.loss, expected)  # DPO term (0.7039640 or 0.6958844) + 1·0.8


def test_vector_c_gradients():
    # sequence, β = 1, mean over pairs: ∂L/∂Δ^w = −σ(−β h_i)/B, ∂L/∂Δ^l = +σ(−β h_i)·b/B
    policy, ref, mask, weights = c_batch()
    token_weighted_dpo_loss(policy, ref, mask, weights, beta=1.0, reduction="sequence").loss.backward()
    g1, g2 = 0.2662272, 0.2872213  # σ(0.13)/2, σ(0.30)/2
    expected = [
        [0, -g1, -g1, 0],
        [-g2, -g2, -g2, 0],
        [0, 0.2396044, 0.1331136, 0.0266227],  # g1·[0.9, 0.5, 0.1]
        [0.2154159, 0, 0, 0],  # g2·0.75
    ]
    close(policy.grad, expected)
    # position_mean, β = 0.1: pair 1 column 1 chosen: −β·σ(−β·u)/(B·P) = −0.1·σ(0.016)/8 = −0.0063000
    policy, ref, mask, weights = c_batch()
    token_weighted_dpo_loss(policy, ref, mask, weights, beta=0.1, reduction="position_mean").loss.backward()
    close(policy.grad[0, 1], -0.0063000)
    assert policy.grad[0, 0] == 0 and policy.grad[0, 3] == 0  # prompt and padding columns: u = 0, no gradient


# ---------------------------------------------------------------- naive reference at odd shapes


def random_batch(B=3, P=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2 * B, P, generator=g) > 0.35  # (2B, P) random, not just prefix/suffix padding
    policy = -torch.rand(2 * B, P, generator=g) * 3
    ref = -torch.rand(2 * B, P, generator=g) * 3
    weights = torch.rand(2 * B, P, generator=g)
    weights[:B] = torch.where(torch.rand(B, P, generator=g) > 0.5, weights[:B], torch.ones(B, P))  # a mixes 1 and <1
    return policy * mask, ref * mask, mask, weights * mask  # zero where masked, as the fused head returns them


def naive_loss(policy, ref, mask, weights, beta, reduction, rpo_alpha):
    B, P = policy.shape[0] // 2, policy.shape[1]
    d = lambda r, p: (policy[r, p].item() - ref[r, p].item()) * weights[r, p].item() if mask[r, p] else 0.0  # noqa: E731
    terms, chosen_r, rejected_r = [], [], []
    for i in range(B):
        us = [d(i, p) - d(B + i, p) for p in range(P)]
        chosen_r.append(beta * sum(d(i, p) for p in range(P)))
        rejected_r.append(beta * sum(d(B + i, p) for p in range(P)))
        if reduction == "sequence":
            terms.append(naive_sigmoid_loss(beta * sum(us)))
        else:
            terms.extend(naive_sigmoid_loss(beta * u) for u in us)
    loss = sum(terms) / len(terms)
    if rpo_alpha is not None:
        nll = [-policy[i, p].item() for i in range(B) for p in range(P) if mask[i, p]]
        loss += rpo_alpha * sum(nll) / len(nll)
    return loss, chosen_r, rejected_r


@pytest.mark.parametrize("reduction", ["sequence", "position_mean"])
@pytest.mark.parametrize("rpo_alpha", [None, 0.7])
@pytest.mark.parametrize("B, P, beta", [(3, 7, 0.1), (5, 3, 1.3), (1, 11, 2.0)])
def test_naive_reference(reduction, rpo_alpha, B, P, beta):
    batch = random_batch(B, P, seed=B * P)
    out = token_weighted_dpo_loss(*batch, beta=beta, reduction=reduction, rpo_alpha=rpo_alpha)
    loss, chosen_r, rejected_r = naive_loss(*batch, beta, reduction, rpo_alpha)
    close(out.loss, loss)
    close(out.chosen_rewards, chosen_r)
    close(out.rejected_rewards, rejected_r)
    close(out.margins, [c - r for c, r in zip(chosen_r, rejected_r)])
    close(out.losses.mean(), out.loss_sum / out.num_units)


def test_precomputed_weighted_ref_sums_equal_per_token_ref():
    policy, ref, mask, weights = random_batch(seed=3)
    per_token = token_weighted_dpo_loss(policy, ref, mask, weights, beta=0.5, reduction="sequence")
    sums = token_weighted_dpo_loss(policy, (weights * ref).sum(1), mask, weights, beta=0.5, reduction="sequence")
    close(sums.loss, per_token.loss, atol=1e-12)
    with pytest.raises(ValueError, match="position_mean needs per-token"):
        token_weighted_dpo_loss(policy, (weights * ref).sum(1), mask, weights, beta=0.5, reduction="position_mean")
    with pytest.raises(ValueError, match="reduction must be one of"):
        token_weighted_dpo_loss(policy, ref, mask, weights, beta=0.5, reduction="mean")


# ---------------------------------------------------------------- limit case: TRL 1.16 DPOTrainer's own loss


class _StubModel(torch.nn.Module):
    """Stands in for a model patched with TRL's fused LM head: returns fixed per-token log-probs (2B, T − 1)."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs):
        super().__init__()
        self.log_probs = log_probs

    def forward(self, labels, fused_lm_head, **kwargs):
        assert fused_lm_head is True
        # as TRL's `add_fused_lm_head`: positions whose next-token label is -100 are a constant 0 (no gradient)
        log_probs = self.log_probs.masked_fill(labels[:, 1:] == -100, 0.0)  # (2B, T - 1)
        z = torch.zeros_like(log_probs.detach())
        return SimpleNamespace(log_probs=log_probs, entropy=z, mean_logits=z, is_top1=z.bool())


def trl_dpo_loss(policy, ref, mask, beta, loss_types=("sigmoid",), loss_weights=(1.0,)):
    """Run TRL 1.16 `DPOTrainer._compute_loss` itself on fixed log-probs (no model, one process, GA 1)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    two_b, P = policy.shape
    completion_mask = torch.cat([torch.zeros(two_b, 1, dtype=torch.long), mask.long()], dim=1)  # (2B, T)
    trainer = SimpleNamespace(
        model=_StubModel(policy),
        ref_model=_StubModel(ref),
        accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        loss_types=list(loss_types),
        loss_weights=list(loss_weights),
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(two_b, P + 1, dtype=torch.long),
        "attention_mask": torch.ones(two_b, P + 1, dtype=torch.long),
        "completion_mask": completion_mask,
    }
    loss = DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("ones", ["on_completion", "everywhere"])
@pytest.mark.parametrize("rpo_alpha", [None, 0.5])
def test_weights_one_equal_trl_dpo_trainer(ones, rpo_alpha):
    policy, ref, mask, _ = random_batch(B=3, P=7, seed=11)
    weights = mask.double() if ones == "on_completion" else torch.ones_like(policy)  # collator pads 0; either works
    ours_policy = policy.clone().requires_grad_()
    trl_policy = policy.clone().requires_grad_()
    out = token_weighted_dpo_loss(ours_policy, ref, mask, weights, beta=0.1, reduction="sequence", rpo_alpha=rpo_alpha)
    types, loss_weights = (("sigmoid",), (1.0,)) if rpo_alpha is None else (("sigmoid", "sft"), (1.0, rpo_alpha))
    trl_loss, metrics = trl_dpo_loss(trl_policy, ref, mask, 0.1, types, loss_weights)
    close(out.loss, trl_loss, atol=1e-12)
    close(out.chosen_rewards.mean(), metrics["rewards/chosen"], atol=1e-12)
    close(out.rejected_rewards.mean(), metrics["rewards/rejected"], atol=1e-12)
    close(out.margins.mean(), metrics["rewards/margins"], atol=1e-12)
    out.loss.backward()
    trl_loss.backward()
    close(ours_policy.grad, trl_policy.grad, atol=1e-12)


# ---------------------------------------------------------------- gradients, detached weights, padding


@pytest.mark.parametrize("reduction", ["sequence", "position_mean"])
@pytest.mark.parametrize("rpo_alpha", [None, 0.7])
def test_gradcheck_policy_logps(reduction, rpo_alpha):
    policy, ref, mask, weights = random_batch(B=2, P=5, seed=5)
    policy.requires_grad_()
    fn = lambda p: token_weighted_dpo_loss(p, ref, mask, weights, 0.8, reduction, rpo_alpha).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (policy,))


@pytest.mark.parametrize("reduction", ["sequence", "position_mean"])
def test_weights_and_reference_carry_no_gradient(reduction):
    policy, ref, mask, weights = random_batch(seed=7)
    policy, ref, weights = policy.requires_grad_(), ref.requires_grad_(), weights.requires_grad_()
    out = token_weighted_dpo_loss(policy, ref, mask, weights, beta=0.3, reduction=reduction, rpo_alpha=1.0)
    out.loss.backward()
    assert weights.grad is None and ref.grad is None and policy.grad is not None
    assert not out.margins.requires_grad and not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("reduction", ["sequence", "position_mean"])
def test_zero_weight_rejected_tokens_get_zero_gradient(reduction):
    policy, ref, mask, weights = random_batch(seed=9)
    weights[3:, ::2] = 0.0  # rejected rows (B = 3), every other column
    policy.requires_grad_()
    token_weighted_dpo_loss(policy, ref, mask, weights, beta=0.3, reduction=reduction).loss.backward()
    assert (policy.grad[3:, ::2] == 0).all()
    assert (policy.grad[3:, 1::2][mask[3:, 1::2]] != 0).all()  # weighted rejected tokens still learn


@pytest.mark.parametrize("reduction", ["sequence", "position_mean"])
def test_padding_garbage_changes_nothing(reduction):
    policy, ref, mask, weights = random_batch(seed=13)
    clean_policy = policy.clone().requires_grad_()
    clean = token_weighted_dpo_loss(clean_policy, ref, mask, weights, 0.4, reduction, rpo_alpha=0.3)
    pad = ~mask
    g = torch.Generator().manual_seed(99)
    dirty_policy = torch.where(pad, torch.randn(policy.shape, generator=g) * 1e3, policy)
    dirty_policy[0][pad[0]] = float("nan")  # nan and inf too: where(), not multiplication, drops them
    dirty_ref = torch.where(pad, torch.randn(ref.shape, generator=g) * 1e3, ref)
    dirty_ref[-1][pad[-1]] = float("-inf")
    dirty_weights = torch.where(pad, torch.randn(weights.shape, generator=g) * 1e3, weights)
    dirty_weights[1][pad[1]] = float("inf")
    dirty_policy.requires_grad_()
    dirty = token_weighted_dpo_loss(dirty_policy, dirty_ref, mask, dirty_weights, 0.4, reduction, rpo_alpha=0.3)
    for name in ("loss", "loss_sum", "losses", "chosen_rewards", "rejected_rewards", "margins", "nll_sum"):
        close(getattr(dirty, name), getattr(clean, name), atol=1e-12)
    assert dirty.num_units == clean.num_units and dirty.num_nll_tokens == clean.num_nll_tokens
    clean.loss.backward()
    dirty.loss.backward()
    close(dirty_policy.grad, clean_policy.grad, atol=1e-12)
    assert (dirty_policy.grad[pad] == 0).all()
