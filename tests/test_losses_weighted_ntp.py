"""Tests of losses/weighted_ntp.py: spec vectors V1-V9 (specs/weighted_ntp.md, section 6), a naive reference at odd
shapes, limit cases, gradients and detachment. float64, atol 1e-6."""

from __future__ import annotations

import math

import pytest
import torch

from tokentrain.losses.weighted_ntp import prior_weights, rho1_loss, rho1_num_selected, rho1_select, weighted_nll

DT = torch.float64
ATOL = 1e-6


def t(values, dtype=DT):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=DT), torch.as_tensor(expected, dtype=DT), atol=ATOL, rtol=0
    )


# V1: P_ref = [0.75, 0.5, 0.25, 0.5], nll = [2.0, 1.0, 0.4, 0.6]
V1_P = [0.75, 0.5, 0.25, 0.5]
V1_NLL = [2.0, 1.0, 0.4, 0.6]
# V5: L_theta = [2.0, 1.0, 3.0, 0.5, 1.5], L_ref = [1.0, 1.5, 1.0, 0.5, 0.2]
V5_NLL = [2.0, 1.0, 3.0, 0.5, 1.5]
V5_REF_NLL = [1.0, 1.5, 1.0, 0.5, 0.2]


def excess_of(logps, ref_logps):
    # e = L_theta - L_ref = sg(-logp) + r, as the trainer builds it
    return -logps.detach() + ref_logps


def zeros_seg(x):
    return torch.zeros(x.shape, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------- prior


def test_v1_prior_weights_loss_and_gradient():
    r = t([V1_P]).log()  # [-0.287682, -0.693147, -1.386294, -0.693147]
    close(r, [[-0.287682, -0.693147, -1.386294, -0.693147]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    w = prior_weights(r, mask, zeros_seg(r))
    # u = 1 - P = [0.25, 0.5, 0.75, 0.5], sum 2; w = 4 * u / 2 = [0.5, 1.0, 1.5, 1.0], sums to k = 4
    close(w, [[0.5, 1.0, 1.5, 1.0]])
    close(w.sum(), 4.0)

    logps = (-t([V1_NLL])).requires_grad_()
    loss = weighted_nll(logps, w, mask, 4)
    # (0.5*2.0 + 1.0*1.0 + 1.5*0.4 + 1.0*0.6) / 4 = (1.0 + 1.0 + 0.6 + 0.6) / 4 = 3.2 / 4 = 0.8   (NTP: 4.0 / 4 = 1.0)
    close(loss, 0.8)
    close(weighted_nll(logps, torch.ones_like(w), mask, 4), 1.0)
    loss.backward()
    # dL/dlogp = -w / N = [-0.125, -0.25, -0.375, -0.25]
    close(logps.grad, [[-0.125, -0.25, -0.375, -0.25]])


def test_v1b_prior_alpha_2():
    r = t([V1_P]).log()
    mask = torch.ones(1, 4, dtype=torch.bool)
    w = prior_weights(r, mask, zeros_seg(r), alpha=2.0)
    # u = [0.0625, 0.25, 0.5625, 0.25], sum 1.125; w = 4 u / 1.125 = [0.222222, 0.888889, 2.0, 0.888889]
    close(w, [[0.222222, 0.888889, 2.0, 0.888889]])
    # (0.444444 + 0.888889 + 0.8 + 0.533333) / 4 = 2.666667 / 4
    close(weighted_nll(-t([V1_NLL]), w, mask, 4), 0.666667)


def v2_batch():
    # row A = V1; row B: P_ref = [0.9, 0.6] + 2 pads. Pads carry nll 9.0 and a junk P_ref that must be ignored.
    p = t([V1_P, [0.9, 0.6, 0.1, 0.1]])
    nll = t([V1_NLL, [1.0, 0.5, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    return p.log(), -nll, mask


def test_v2_prior_padded():
    r, logps, mask = v2_batch()
    w = prior_weights(r, mask, zeros_seg(r))
    # row B: u = [0.1, 0.4], sum 0.5, w = 2 * u / 0.5 = [0.4, 1.6]; pads get 0
    close(w, [[0.5, 1.0, 1.5, 1.0], [0.4, 1.6, 0.0, 0.0]])
    loss = weighted_nll(logps, w, mask, mask.sum())
    # (3.2 + 0.4*1.0 + 1.6*0.5) / 6 = (3.2 + 1.2) / 6 = 0.733333   (NTP: (4.0 + 1.5) / 6 = 0.916667)
    close(loss, 0.733333)
    close(weighted_nll(logps, mask.to(DT), mask, mask.sum()), 0.916667)
    # the mean of sequence means, (3.2/4 + 1.2/2) / 2 = (0.8 + 0.6) / 2 = 0.7, up-weights the short row: not ours
    assert abs(loss.item() - 0.7) > 1e-3


def test_prior_segments_padding_free_equals_padded():
    # One padding-free row: [x | V1's 4 tokens | x | V2 row B's 2 tokens]; x = a segment's first position, whose label
    # TRL masks. Two segments (ids 1 and 2), junk P_ref on the masked positions.
    p = t([[0.3, *V1_P, 0.3, 0.9, 0.6]])
    nll = t([[7.0, *V1_NLL, 7.0, 1.0, 0.5]])
    mask = torch.tensor([[False, True, True, True, True, False, True, True]])
    seg = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2]])
    w = prior_weights(p.log(), mask, seg)
    # same weights as the padded layout: V1's [0.5, 1.0, 1.5, 1.0] and row B's [0.4, 1.6]
    close(w, [[0.0, 0.5, 1.0, 1.5, 1.0, 0.0, 0.4, 1.6]])
    r_pad, logps_pad, mask_pad = v2_batch()
    w_pad = prior_weights(r_pad, mask_pad, zeros_seg(r_pad))
    close(w[mask], w_pad[mask_pad])
    # and the same loss, 0.733333
    close(weighted_nll(-nll, w, mask, mask.sum()), 0.733333)
    # with one segment id for the whole row it would be one sequence: different weights
    assert not torch.allclose(prior_weights(p.log(), mask, zeros_seg(p)), w)


def test_v3_prior_fallback_and_constant():
    mask = torch.ones(1, 3, dtype=torch.bool)
    # r = 0: P_ref = 1, u = [0, 0, 0], sum 0 -> w = [1, 1, 1]
    r = torch.zeros(1, 3, dtype=DT)
    close(prior_weights(r, mask, zeros_seg(r)), [[1.0, 1.0, 1.0]])
    # constant P_ref = 0.3: u = [0.7, 0.7, 0.7] -> w = 3 * 0.7 / 2.1 = [1, 1, 1]
    r = torch.full((1, 3), 0.3, dtype=DT).log()
    close(prior_weights(r, mask, zeros_seg(r)), [[1.0, 1.0, 1.0]])
    # r slightly > 0 (float rounding): clamped to u = 0, fallback too
    r = torch.full((1, 3), 1e-7, dtype=DT)
    close(prior_weights(r, mask, zeros_seg(r)), [[1.0, 1.0, 1.0]])


def test_prior_dtype_detached_and_mean_one_per_sequence():
    g = torch.Generator().manual_seed(0)
    r = (-3 * torch.rand(2, 9, generator=g)).requires_grad_()  # float32 with grad
    mask = torch.rand(2, 9, generator=g) > 0.3
    seg = torch.tensor([[0] * 4 + [1] * 5, [3] * 9])
    w = prior_weights(r, mask, seg)
    assert w.dtype == torch.float32 and not w.requires_grad
    # P1: mean w = 1 over the valid tokens of every sequence
    for b, s in [(0, 0), (0, 1), (1, 3)]:
        in_seq = mask[b] & (seg[b] == s)
        if in_seq.any():
            torch.testing.assert_close(w[b][in_seq].mean(), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert (w[~mask] == 0).all()


# --------------------------------------------------------------------------------------------------------- column


def test_v4_column():
    w = t([[1.0, 0.0, 2.0, 0.5]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # 1*2.0 + 0*1.0 + 2*0.4 + 0.5*0.6 = 2.0 + 0.8 + 0.3 = 3.1; / 4 = 0.775
    close(weighted_nll(-t([V1_NLL]), w, mask, 4), 0.775)


# ----------------------------------------------------------------------------------------------------------- rho1


def test_v5_rho1():
    logps = (-t([V5_NLL])).requires_grad_()
    r = -t([V5_REF_NLL])
    mask = torch.ones(1, 5, dtype=torch.bool)
    e = excess_of(logps, r)
    # e = L_theta - L_ref = [1.0, -0.5, 2.0, 0.0, 1.3]
    close(e, [[1.0, -0.5, 2.0, 0.0, 1.3]])
    n = rho1_num_selected(0.6, 5)  # ceil(3.0) = 3
    assert n == 3
    sel = rho1_select(e, mask, n)
    # top 3: 2.0 (idx 2), 1.3 (idx 4), 1.0 (idx 0)
    assert sel.tolist() == [[True, False, True, False, True]]
    assert not sel.requires_grad
    loss = rho1_loss(logps, sel, n)
    # (2.0 + 3.0 + 1.5) / 3 = 6.5 / 3 = 2.166667   (NTP: 8.0 / 5 = 1.6)
    close(loss, 2.166667)
    loss.backward()
    # -1/3 on selected, 0 elsewhere
    close(logps.grad, [[-1 / 3, 0.0, -1 / 3, 0.0, -1 / 3]])
    # rho = 1: n = 5, everything selected, L = 8.0 / 5 = 1.6
    n1 = rho1_num_selected(1.0, 5)
    assert n1 == 5
    close(rho1_loss(logps, rho1_select(e, mask, n1), n1), 1.6)


@pytest.mark.parametrize(
    "ratio, n_valid, expected",
    [
        (0.6, 5, 3),  # 3.0 exactly
        (0.5, 5, 3),  # 2.5 -> 3
        (0.1, 3, 1),  # 0.3 -> 1
        (0.6, 1, 1),  # 0.6 -> 1
        (0.55, 100, 55),  # 55 exactly on the decimal; the float product is 55.00000000000001
        (0.55, 180, 99),  # 99 exactly; the float product is 99.00000000000001
        (0.6, 0, 0),  # n = 0 iff n_valid = 0
        (1.0, 7, 7),
        (1, 7, 7),  # an int ratio
        (1e-05, 3, 1),  # repr "1e-05": exponent form
        (0.07, 100, 7),  # float 0.07 * 100 = 7.000000000000001 would give 8
    ],
)
def test_v6_rounding(ratio, n_valid, expected):
    assert rho1_num_selected(ratio, n_valid) == expected


def test_v6_float_ceil_is_wrong():
    # why the decimal reading matters
    assert math.ceil(0.55 * 100) == 56
    assert rho1_num_selected(0.55, 100) == 55


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_rho1_num_selected_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        rho1_num_selected(ratio, 10)


def test_v7_tie_goes_to_lower_index():
    e = t([[0.5, 1.0, 1.0, 0.2]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    n = rho1_num_selected(0.25, 4)  # ceil(1.0) = 1
    assert n == 1
    # 1.0 at index 1 and 2: stable sort keeps index 1 first
    assert rho1_select(e, mask, n).tolist() == [[False, True, False, False]]


def test_v8_padded_micro_batch():
    # V5 as row 1 = tokens 0-2 (+1 pad), row 2 = tokens 3-4 (+2 pads); pads carry huge excess that must be ignored
    nll = t([[2.0, 1.0, 3.0, 0.0], [0.5, 1.5, 0.0, 0.0]])
    ref_nll = t([[1.0, 1.5, 1.0, -99.0], [0.5, 0.2, -99.0, -99.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    logps = -nll
    e = excess_of(logps, -ref_nll)  # [[1.0, -0.5, 2.0, 99], [0.0, 1.3, 99, 99]]
    n = rho1_num_selected(0.6, int(mask.sum()))  # N = 5, n = 3
    assert n == 3
    sel = rho1_select(e, mask, n)
    # ranking spans the micro-batch, not each row: [1, 0, 1] and [0, 1]
    assert sel.tolist() == [[True, False, True, False], [False, True, False, False]]
    # (2.0 + 3.0 + 1.5) / 3 = 2.166667
    close(rho1_loss(logps, sel, n), 2.166667)


def test_v9_two_processes_emulated():
    ranks = [  # (logps, ref_logps, mask) per process: rank 0 = V5 tokens 0-2, rank 1 = tokens 3-4
        (-t([V5_NLL[:3]]), -t([V5_REF_NLL[:3]]), torch.ones(1, 3, dtype=torch.bool)),
        (-t([V5_NLL[3:]]), -t([V5_REF_NLL[3:]]), torch.ones(1, 2, dtype=torch.bool)),
    ]
    excess = [excess_of(lp, r) for lp, r, _ in ranks]  # [1.0, -0.5, 2.0] and [0.0, 1.3]

    # micro_batch: each rank ranks its own tokens. rank 0: N = 3, n = ceil(1.8) = 2 -> {0, 2};
    # rank 1: N = 2, n = ceil(1.2) = 2 -> {3, 4}. D = 2 + 2 = 4.
    ns = [rho1_num_selected(0.6, int(m.sum())) for _, _, m in ranks]
    assert ns == [2, 2]
    sels = [rho1_select(e, m, n) for e, (_, _, m), n in zip(excess, ranks, ns)]
    assert sels[0].tolist() == [[True, False, True]] and sels[1].tolist() == [[True, True]]
    d = sum(ns)
    # per-rank numerators / global D: (2.0 + 3.0 + 0.5 + 1.5) / 4 = 7.0 / 4 = 1.75
    close(sum(rho1_loss(lp, s, d) for (lp, _, _), s in zip(ranks, sels)), 1.75)

    # global: rank the rank-major concatenation; N = 5, n = ceil(3.0) = 3 -> {0, 2} on rank 0, {4} on rank 1
    all_e = torch.cat([e.flatten() for e in excess])
    all_m = torch.cat([m.flatten() for _, _, m in ranks])
    d = rho1_num_selected(0.6, int(all_m.sum()))
    assert d == 3
    chosen = rho1_select(all_e, all_m, d)
    sels = [chosen[:3].view(1, 3), chosen[3:].view(1, 2)]  # each rank keeps its own part
    assert sels[0].tolist() == [[True, False, True]] and sels[1].tolist() == [[False, True]]
    # (2.0 + 3.0 + 1.5) / 3 = 2.166667, the single-process V5 value
    close(sum(rho1_loss(lp, s, d) for (lp, _, _), s in zip(ranks, sels)), 2.166667)


def test_p9_rho1_selection_shift_invariant():
    # Dyadic values keep every sum exact, so ties survive the shift; + 3.25 on every r shifts every e by 3.25.
    g = torch.Generator().manual_seed(1)
    logps = -torch.randint(0, 16, (3, 7), generator=g).to(DT) / 4
    r = -torch.randint(0, 16, (3, 7), generator=g).to(DT) / 4
    mask = torch.rand(3, 7, generator=g) > 0.25
    n = rho1_num_selected(0.6, int(mask.sum()))
    sel = rho1_select(excess_of(logps, r), mask, n)
    assert int(sel.sum()) == n and not (sel & ~mask).any()
    for c in (3.25, -10.0):
        assert torch.equal(rho1_select(excess_of(logps, r + c), mask, n), sel)


# ------------------------------------------------------------------------------------------------ naive references


def naive_prior_weights(ref_logps, mask, segment_ids, alpha):
    B, T = ref_logps.shape
    w = torch.zeros(B, T, dtype=ref_logps.dtype)
    for b in range(B):
        for s in set(segment_ids[b].tolist()):
            idx = [p for p in range(T) if segment_ids[b, p] == s and mask[b, p]]
            u = [max(0.0, 1.0 - math.exp(ref_logps[b, p].item())) ** alpha for p in idx]
            total = sum(u)
            for p, u_p in zip(idx, u):
                w[b, p] = len(idx) * u_p / total if total > 0 else 1.0
    return w


def naive_rho1_select(excess, mask, n):
    flat_e, flat_m = excess.flatten().tolist(), mask.flatten().tolist()
    valid = [(-e, i) for i, (e, m) in enumerate(zip(flat_e, flat_m)) if m]  # sort key: larger e, then lower index
    keep = {i for _, i in sorted(valid)[:n]}
    return torch.tensor([i in keep for i in range(len(flat_e))]).view(excess.shape)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_prior_weights_matches_naive(seed, alpha):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 7
    r = -3 * torch.rand(B, T, generator=g, dtype=DT)
    mask = torch.rand(B, T, generator=g) > 0.3
    # random padding-free segments: a new id at each random "position_ids reset"; one row padded-style (all 0)
    seg = (torch.rand(B, T, generator=g) < 0.35).long().cumsum(-1)
    seg[1] = 0
    # one whole segment with P_ref = 1 (fallback w = 1)
    r[0][seg[0] == seg[0, -1]] = 0.0
    torch.testing.assert_close(
        prior_weights(r, mask, seg, alpha), naive_prior_weights(r, mask, seg, alpha), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 5), (11,)])
def test_rho1_select_matches_naive(seed, shape):
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(-3, 4, shape, generator=g).to(DT) / 2  # few distinct values: many ties
    mask = torch.rand(shape, generator=g) > 0.3
    n_valid = int(mask.sum())
    for n in {0, 1, n_valid // 2, rho1_num_selected(0.6, n_valid), n_valid, n_valid + 3}:
        assert torch.equal(rho1_select(e, mask, n), naive_rho1_select(e, mask, n)), n


# ----------------------------------------------------------------------------------------------------- limit cases


def plain_mean_nll(logps, mask):
    return -logps[mask].mean()


def random_batch(seed, B=3, T=7):
    g = torch.Generator().manual_seed(seed)
    logps = (-4 * torch.rand(B, T, generator=g, dtype=DT)).requires_grad_()
    mask = torch.rand(B, T, generator=g) > 0.3
    return logps, mask


def test_p2_limit_cases_equal_plain_sft():
    logps, mask = random_batch(2)
    n = mask.sum()
    sft = plain_mean_nll(logps, mask)
    (sft_grad,) = torch.autograd.grad(sft, logps)

    # prior with constant P_ref (per row) gives w = 1
    r = torch.tensor([[0.2], [0.5], [0.9]], dtype=DT).log().expand(3, 7)
    w = prior_weights(r, mask, zeros_seg(r))
    close(w, mask.to(DT))
    # rho1 with ratio 1 selects every valid token, D = N
    d = rho1_num_selected(1.0, int(n))
    sel = rho1_select(torch.randn(3, 7, dtype=DT), mask, d)
    assert torch.equal(sel, mask)
    for loss in (
        weighted_nll(logps, w, mask, n),  # prior, constant P_ref
        weighted_nll(logps, torch.ones_like(w), mask, n),  # column, w = 1
        rho1_loss(logps, sel, d),  # rho1, ratio 1
    ):
        close(loss, sft)
        close(torch.autograd.grad(loss, logps)[0], sft_grad)


# -------------------------------------------------------------------------------------------- gradients, detachment


def test_gradcheck_weighted_nll():
    logps, mask = random_batch(3, B=2, T=5)
    w = torch.rand(2, 5, dtype=DT) * 2
    assert torch.autograd.gradcheck(lambda lp: weighted_nll(lp, w, mask, 7.0), (logps,))


def test_gradcheck_rho1_loss():
    logps, mask = random_batch(4, B=2, T=5)
    sel = rho1_select(torch.randn(2, 5, dtype=DT), mask, 3)
    assert torch.autograd.gradcheck(lambda lp: rho1_loss(lp, sel, torch.tensor(3.0, dtype=DT)), (logps,))


def test_weights_are_detached():
    logps, mask = random_batch(5)
    w = (torch.rand(3, 7, dtype=DT) + 0.5).requires_grad_()
    weighted_nll(logps, w, mask, mask.sum()).backward()
    assert w.grad is None
    assert logps.grad is not None
    # the gradient on logps is -w / N on valid tokens, 0 on masked ones
    close(logps.grad, -(w.detach() * mask) / mask.sum())


def test_masked_positions_are_inert():
    # non-finite logps or weights on masked positions change neither the loss nor the gradient
    logps, mask = random_batch(6)
    w = torch.rand(3, 7, dtype=DT)
    junk_logps = logps.detach().masked_fill(~mask, float("-inf")).requires_grad_()
    junk_w = w.masked_fill(~mask, float("nan"))
    loss = weighted_nll(junk_logps, junk_w, mask, mask.sum())
    loss.backward()
    close(loss, weighted_nll(logps, w, mask, mask.sum()))
    assert torch.isfinite(junk_logps.grad).all() and (junk_logps.grad[~mask] == 0).all()
    sel = rho1_select(torch.randn(3, 7, dtype=DT), mask, 4)
    junk_logps.grad = None
    rho1_loss(junk_logps, sel, 4).backward()
    assert torch.isfinite(junk_logps.grad).all()
