"""Tests for tokentrain/losses/unlearning.py (spec specs/unlearning.md sections 2.5, 3 and 6, vectors 1, 2, 4, 5, 6 and
the loss properties). Hand-computed numbers in comments; naive float64 references at odd shapes; gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from tokentrain.losses.unlearning import (
    count_sequences,
    ga_loss,
    generic_labels,
    generic_logits,
    mean_nll,
    npo_loss,
    sequence_sums,
    simnpo_loss,
    whp_loss,
)

# ------------------------------------------------------------------------------------------ generic logits (1, 2)


def test_vector1_generic_logits_and_labels():
    v_b = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    v_r = torch.tensor([[3.0, 0.5, 0.0, 1.0]])
    # ReLU(v_r - v_b) = [1, 0, 0, 2]; alpha 5: [2-5, 1, 0, -1-10]
    torch.testing.assert_close(generic_logits(v_b, v_r, 5.0), torch.tensor([[-3.0, 1.0, 0.0, -11.0]]))
    assert generic_labels(v_b, v_r, 5.0).tolist() == [1]
    # alpha 1: [1, 1, 0, -3], a tie between ids 0 and 1: the lowest id wins, as torch.argmax
    torch.testing.assert_close(generic_logits(v_b, v_r, 1.0), torch.tensor([[1.0, 1.0, 0.0, -3.0]]))
    assert generic_labels(v_b, v_r, 1.0).tolist() == [0]
    torch.testing.assert_close(generic_logits(v_b, v_r, 0.0), v_b)
    assert generic_labels(v_b, v_r, 0.0).tolist() == [0]


def test_vector2_repeat_penalty():
    v = torch.tensor([[2.0, 1.5, 0.0, -1.0]])
    mask = torch.tensor([[True, False, False, False]])  # token 0 in P_j
    torch.testing.assert_close(generic_logits(v, v, 5.0, mask, 1.0), torch.tensor([[1.0, 1.5, 0.0, -1.0]]))
    assert generic_labels(v, v, 5.0, mask, 1.0).tolist() == [1]
    assert generic_labels(v, v, 5.0, mask, 0.0).tolist() == [0]


def test_generic_logits_act_on_raw_logits_not_log_probs():
    """v_r + 10 with alpha 1: ReLU(v_r - v_b) = [11, 9.5, 10, 12] -> [-9, -8.5, -10, -13], label 1 (not 0).
    A softmax-normalising implementation would be unchanged by the shift and give label 0."""
    v_b = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    v_r = torch.tensor([[3.0, 0.5, 0.0, 1.0]]) + 10
    torch.testing.assert_close(generic_logits(v_b, v_r, 1.0), torch.tensor([[-9.0, -8.5, -10.0, -13.0]]))
    assert generic_labels(v_b, v_r, 1.0).tolist() == [1]


def test_generic_logits_properties_random():
    g = torch.Generator().manual_seed(0)
    v_b, v_r = torch.randn(37, 53, generator=g), torch.randn(37, 53, generator=g)
    for alpha in (0.0, 0.7, 5.0):
        assert (generic_logits(v_b, v_r, alpha) <= v_b).all()  # ReLU never raises a logit
        # reinforced = baseline: nothing to push down, target = argmax v_b
        assert torch.equal(generic_labels(v_b, v_b, alpha), v_b.argmax(-1))
    # float32 whatever the input dtype; the naive float64 formula agrees
    out = generic_logits(v_b.bfloat16(), v_r.bfloat16(), 2.0)
    assert out.dtype == torch.float32
    ref = v_b.bfloat16().double() - 2.0 * (v_r.bfloat16().double() - v_b.bfloat16().double()).clamp(min=0)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- WHP (4)


def test_vector4_whp_loss_and_global_normaliser():
    logps = torch.tensor([[-0.5, -2.0, -1.0, -0.1]], requires_grad=True)
    w = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # (0.5 + 1.0 + 0.1) / 3 = 0.533333 (N_w = 3 positions with w > 0)
    loss = whp_loss(logps, w, mask, num_items=3)
    assert loss.item() == pytest.approx(0.533333, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1 / 3, 0.0, -1 / 3, -1 / 3]]))
    # micro-batches [-0.5, -2.0] and [-1.0], one global N = 3: (2.5 + 1.0) / 3 = 1.166667
    a = whp_loss(torch.tensor([[-0.5, -2.0]]), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), 3)
    b = whp_loss(torch.tensor([[-1.0]]), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), 3)
    assert (a + b).item() == pytest.approx(1.166667, abs=1e-6)
    assert (a + b).item() != pytest.approx((1.25 + 1.0) / 2, abs=1e-3)  # 1.125: the mean of means, which must not be


def test_whp_loss_masked_positions_are_inert():
    logps = torch.tensor([[-0.5, float("-inf"), -1.0]], requires_grad=True)
    w = torch.tensor([[1.0, float("nan"), 2.0]])
    mask = torch.tensor([[True, False, True]])
    loss = whp_loss(logps, w, mask, 2)
    assert loss.item() == pytest.approx((0.5 + 2.0) / 2)
    loss.backward()
    assert torch.isfinite(logps.grad).all() and logps.grad[0, 1] == 0


# ------------------------------------------------------------------------------------------------------ GA (5)


def test_vector5_ga():
    logps = torch.tensor([[-0.5, -2.0, -1.0]], requires_grad=True)
    loss = ga_loss(logps, torch.ones(1, 3, dtype=torch.bool), 3)
    assert loss.item() == pytest.approx(-1.166667, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.full((1, 3), 1 / 3))  # descent on L lowers every log-prob


def test_mean_nll_is_sft():
    logps = torch.tensor([[-0.5, -2.0], [-1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert mean_nll(logps, mask, 3).item() == pytest.approx(3.5 / 3)


# ----------------------------------------------------------------------------------------------------- NPO (6)


def _npo_rows():
    # row 1: policy [-1, -2], ref sum -2.5 -> Delta -0.5; row 2: policy [-0.5], ref -1.5 -> Delta 1.0
    logps = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.25, -1.25], [-1.5, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    return logps, ref, mask, torch.zeros(2, 2, dtype=torch.long)


def test_vector6_npo_values_and_gradient():
    logps, ref, mask, seg = _npo_rows()
    beta = 0.1
    per_row = [-20 * torch.nn.functional.logsigmoid(torch.tensor(-beta * d)).item() for d in (-0.5, 1.0)]
    assert per_row == pytest.approx([13.369193, 14.887934], abs=2e-6)  # float32; float64 gives 14.8879332
    loss = npo_loss(logps, ref, mask, seg, beta, num_rows=2)
    assert loss.item() == pytest.approx(14.128563, abs=2e-6)
    loss.backward()
    # dL/dlogp = 2 sigmoid(beta Delta_i) / S = sigmoid(beta Delta_i) with S = 2
    expected = torch.tensor([[0.487503, 0.487503], [0.524979, 0.0]])
    torch.testing.assert_close(logps.grad, expected, atol=1e-6, rtol=0)


def test_npo_at_delta_zero_and_beta_limit():
    logps = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    seg = torch.zeros(1, 2, dtype=torch.long)
    assert npo_loss(logps, logps.clone(), mask, seg, 0.1, 1).item() == pytest.approx(2 * math.log(2) / 0.1, abs=1e-4)
    assert npo_loss(logps, logps.clone(), mask, seg, 0.1, 1).item() == pytest.approx(13.862944, abs=1e-5)
    # beta -> 0 (float64): L - 2 ln 2 / beta -> mean Delta = (-0.5 + 1.0) / 2 = 0.25
    logps, ref, mask, seg = _npo_rows()
    beta = 1e-6
    loss = npo_loss(logps.detach().double(), ref.double(), mask, seg, beta, 2).item()
    assert loss - 2 * math.log(2) / beta == pytest.approx(0.25, abs=1e-5)


def test_npo_gradient_at_delta_zero_equals_ga_on_sequence_sums():
    """At Delta = 0, dL/dlogp = 2 sigmoid(0) / S = 1/S: GA on sequence sums (ga_loss with N = S)."""
    g = torch.Generator().manual_seed(1)
    logps = -torch.rand(3, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 7, generator=g) < 0.8
    mask[:, 0] = True
    seg = torch.zeros(3, 7, dtype=torch.long)
    a = logps.clone().requires_grad_(True)
    npo_loss(a, logps.clone(), mask, seg, 0.3, 3).backward()
    b = logps.clone().requires_grad_(True)
    ga_loss(b, mask, 3).backward()
    torch.testing.assert_close(a.grad, b.grad)


# -------------------------------------------------------------------------------------------------------- SimNPO


def test_simnpo_hand_vector():
    """Row 1 NLLs [1, 2] -> lbar 1.5; row 2 [0.5] -> lbar 0.5; beta 2.5, gamma 0.5, S 2:
    L = -(2/2.5)/2 * (log sigmoid(2.5 * 1.0) + log sigmoid(2.5 * 0.0))
      = -0.4 * (log 0.924142 + log 0.5) = -0.4 * (-0.078889 - 0.693147) = 0.308815"""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    seg = torch.zeros(2, 2, dtype=torch.long)
    loss = simnpo_loss(logps, mask, seg, beta=2.5, gamma=0.5, num_rows=2)
    assert loss.item() == pytest.approx(0.308815, abs=1e-6)
    loss.backward()
    # dL/dlbar_i = -(2/S) sigmoid(-beta (lbar_i - gamma)) and dlbar_i/dlogp_t = -1/k_i, so with S = 2:
    # row 1: sigmoid(-2.5) / 2 = 0.075858 / 2 per token; row 2: sigmoid(0) / 1 = 0.5
    s1, s2 = 1 / (1 + math.exp(2.5)), 0.5
    expected = torch.tensor([[s1 / 2, s1 / 2], [s2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logps.grad, expected)


def test_simnpo_gradient_limit():
    """gamma = 0 at lbar = 0: dL/dlbar_i = -1/S, so dL/dlogp_t = 1/(S k_i)."""
    logps = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    simnpo_loss(logps, mask, torch.zeros(2, 3, dtype=torch.long), beta=4.5, gamma=0.0, num_rows=2).backward()
    expected = torch.tensor([[1 / 6, 1 / 6, 1 / 6], [1 / 2, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(logps.grad, expected)


# ------------------------------------------------------------------------------ naive references at odd shapes


def _naive_sequences(logps, mask, seg):
    """Python loop over rows and segments, float64: {(row, seg): [values of valid positions]}."""
    groups: dict[tuple[int, int], list] = {}
    for b in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            if mask[b, t]:
                groups.setdefault((b, int(seg[b, t])), []).append((b, t))
    return groups


def _random_layout(seed, B=3, T=11):
    g = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    ref = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.7
    seg = torch.sort(torch.randint(0, 3, (B, T), generator=g), dim=1).values  # padding-free: increasing segments
    mask[-1] = False  # a row with no valid target contributes nothing
    return logps, ref, mask, seg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_npo_and_simnpo_match_naive_reference_with_segments(seed):
    logps, ref, mask, seg = _random_layout(seed)
    groups = _naive_sequences(logps, mask, seg)
    S = len(groups)
    assert count_sequences(mask, seg).item() == S
    beta, gamma = 0.7, 0.3
    npo_ref, sim_ref = 0.0, 0.0
    for positions in groups.values():
        delta = sum(logps[b, t].item() - ref[b, t].item() for b, t in positions)
        lbar = -sum(logps[b, t].item() for b, t in positions) / len(positions)
        npo_ref += -(2 / beta) * math.log(1 / (1 + math.exp(beta * delta))) / S
        sim_ref += -(2 / beta) * math.log(1 / (1 + math.exp(-beta * (lbar - gamma)))) / S
    assert npo_loss(logps, ref, mask, seg, beta, S).item() == pytest.approx(npo_ref, abs=1e-10)
    assert simnpo_loss(logps, mask, seg, beta, gamma, S).item() == pytest.approx(sim_ref, abs=1e-10)
    sums, counts = sequence_sums(logps, mask, seg)
    assert sorted(counts.tolist()) == sorted(len(p) for p in groups.values())
    assert sums.sum().item() == pytest.approx(logps[mask].sum().item())


def test_gradcheck_float64():
    logps, ref, mask, seg = _random_layout(4, B=3, T=5)
    mask[0, 1] = True
    x = logps.clone().requires_grad_(True)
    w = torch.rand(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: npo_loss(v, ref, mask, seg, 0.5, 3), (x,))
    assert torch.autograd.gradcheck(lambda v: simnpo_loss(v, mask, seg, 2.5, 0.1, 3), (x,))
    assert torch.autograd.gradcheck(lambda v: whp_loss(v, w, mask, 4), (x,))
    assert torch.autograd.gradcheck(lambda v: ga_loss(v, mask, 4), (x,))


@pytest.mark.parametrize("loss_name", ["whp", "ga", "npo", "simnpo"])
def test_padding_and_micro_batch_split_change_nothing(loss_name):
    """Extra padded columns change nothing, and two micro-batches with the global normaliser sum to the whole."""
    logps, ref, mask, _ = _random_layout(5, B=4, T=6)
    mask[:, 0] = True
    seg = torch.zeros_like(mask, dtype=torch.long)
    w = (torch.rand(4, 6, dtype=torch.float64) > 0.3).double()
    n = {"whp": (w * mask).sum(), "ga": mask.sum(), "npo": 4, "simnpo": 4}[loss_name]

    def loss(lp, r, m, s, ww):
        return {
            "whp": lambda: whp_loss(lp, ww, m, n),
            "ga": lambda: ga_loss(lp, m, n),
            "npo": lambda: npo_loss(lp, r, m, s, 0.2, n),
            "simnpo": lambda: simnpo_loss(lp, m, s, 2.5, 0.0, n),
        }[loss_name]()

    whole = loss(logps, ref, mask, seg, w)

    def pad(x, value):
        return torch.cat([x, torch.full((x.shape[0], 3), value, dtype=x.dtype)], dim=1)

    padded = loss(pad(logps, -7.0), pad(ref, -1.0), pad(mask, False), pad(seg, 0), pad(w, 1.0))
    assert padded.item() == pytest.approx(whole.item(), abs=1e-12)
    split = loss(logps[:1], ref[:1], mask[:1], seg[:1], w[:1]) + loss(logps[1:], ref[1:], mask[1:], seg[1:], w[1:])
    assert split.item() == pytest.approx(whole.item(), abs=1e-12)


def test_generic_logits_inplace_is_bitwise_equal_and_reuses_v_r():
    """The scoring pass's in-place form: the same float32 values bit for bit, written into v_r's buffer."""
    g = torch.Generator().manual_seed(3)
    v_b = 3 * torch.randn(37, 301, generator=g)
    v_r = v_b + torch.randn(37, 301, generator=g)
    expected = generic_logits(v_b, v_r, 5.0)
    buffer = v_r.clone()
    out = generic_logits(v_b, buffer, 5.0, inplace=True)
    assert torch.equal(out, expected) and out.data_ptr() == buffer.data_ptr()
    assert torch.equal(generic_labels(v_b, v_r.clone(), 5.0, inplace=True), expected.argmax(-1))
    # spec vector 1 through the in-place path
    v1 = generic_logits(torch.tensor([[2.0, 1, 0, -1]]), torch.tensor([[3.0, 0.5, 0, 1]]), 5.0, inplace=True)
    assert v1.tolist() == [[-3.0, 1.0, 0.0, -11.0]]
