"""Tests for tokentrain/losses/concept_heads.py (pure torch): spec `specs/concept_heads.md` sections 2, 3 and 6.

Vectors 6.1-6.7 are recomputed here in float64 by hand (the numbers in the comments) and from naive full-logit code.
"""

from __future__ import annotations

import math

import pytest
import torch

from tokentrain.losses.concept_heads import concept_heads_loss, head_targets, head_weights, schedule_weight

X = -100
ALPHA, BETA = 0.8, 0.01


def t(rows):
    return torch.tensor(rows, dtype=torch.long)


def counts_of(targets):
    return (targets != X).sum(dim=(1, 2)).tolist()


# ------------------------------------------------------------------------------------------- 6.2-6.5: targets


def test_shift_worked_example():
    """6.2: labels [-100, -100, 5, 6, 7, 8, -100], H = 4."""
    targets = head_targets(t([[X, X, 5, 6, 7, 8, X]]), 4)
    assert targets.shape == (5, 1, 7) and targets.dtype == torch.long
    assert targets[0, 0].tolist() == [X, 5, 6, 7, 8, X, X]
    assert targets[1, 0].tolist() == [5, 6, 7, 8, X, X, X]  # the last prompt position predicts the first answer token
    assert targets[2, 0].tolist() == [6, 7, 8, X, X, X, X]
    assert targets[3, 0].tolist() == [7, 8, X, X, X, X, X]
    assert targets[4, 0].tolist() == [8, X, X, X, X, X, X]
    assert counts_of(targets) == [4, 4, 3, 2, 1]


def test_count_property_without_packing_or_padding():
    """6.2 property: count_i = count(labels[:, 1+i:] != -100) on random labels at odd shapes."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[torch.rand(3, 11, generator=g) < 0.4] = X
    targets = head_targets(labels, 5)
    for i in range(6):
        assert counts_of(targets)[i] == int((labels[:, 1 + i :] != X).sum())
        # every valid target is the label 1 + i positions later
        b, p = (targets[i] != X).nonzero(as_tuple=True)
        assert torch.equal(targets[i][b, p], labels[b, p + 1 + i])


def test_packed_row_never_predicts_across_documents():
    """6.3: position_ids [0,1,2,3,0,1,2], labels [-100,5,6,7,-100,8,9], H = 3."""
    labels = t([[X, 5, 6, 7, X, 8, 9]])
    positions = t([[0, 1, 2, 3, 0, 1, 2]])
    targets = head_targets(labels, 3, position_ids=positions)
    assert targets[0, 0].tolist() == [5, 6, 7, X, 8, 9, X]
    assert targets[1, 0].tolist() == [6, 7, X, X, 9, X, X]
    assert targets[2, 0].tolist() == [7, X, X, X, X, X, X]
    assert targets[3, 0].tolist() == [X] * 7
    assert counts_of(targets) == [5, 3, 1, 0]
    # without document masking the targets would leak into the next document
    assert counts_of(head_targets(labels, 3)) == [5, 4, 3, 2]


def test_left_padding_positions_predict_nothing():
    """6.4: attention_mask [0,0,1,1,1,1], labels [-100,-100,-100,4,5,6], H = 2."""
    targets = head_targets(t([[X, X, X, 4, 5, 6]]), 2, attention_mask=t([[0, 0, 1, 1, 1, 1]]))
    assert targets[0, 0].tolist() == [X, X, 4, 5, 6, X]
    assert targets[1, 0].tolist() == [X, X, 5, 6, X, X]
    assert targets[2, 0].tolist() == [X, X, 6, X, X, X]


def test_padding_free_broadcast_positions_and_several_rows():
    """position_ids (1, T) broadcast over rows; documents are counted per row."""
    labels = t([[X, 1, 2, X, 3, 4], [X, 5, 6, 7, 8, 9]])
    targets = head_targets(labels, 1, position_ids=t([[0, 1, 2, 0, 1, 2]]))
    assert targets[1].tolist() == [[2, X, X, 4, X, X], [6, X, X, 9, X, X]]


def test_short_sequence_is_masked_and_counted():
    """6.5: labels [-100, 5, 6], H = 4: counts 2, 1, 0, 0, 0; the loss is finite and heads 2..4 add exactly 0."""
    targets = head_targets(t([[X, 5, 6]]), 4)
    counts = torch.tensor(counts_of(targets))
    assert counts.tolist() == [2, 1, 0, 0, 0]
    sums = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    loss, ce = concept_heads_loss(sums, counts, ALPHA, BETA, 1.0, include_ntp=True)
    assert torch.isfinite(loss) and ce.tolist() == [0.5, 2.0, 0.0, 0.0, 0.0]
    assert loss.item() == pytest.approx(0.5 + 0.01 * 0.8 * 2.0, abs=1e-12)
    # a sequence shorter than any head's shift: every target -100, nothing crashes
    assert counts_of(head_targets(t([[7]]), 3)) == [0, 0, 0, 0]


def test_bad_num_aux_heads():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_aux_heads"):
            head_targets(t([[1, 2]]), bad)


# --------------------------------------------------------------------------------------- 6.1: combination


CE = torch.tensor([2.0, 3.0, 3.5, 4.0, 4.5], dtype=torch.float64)
ONES = torch.ones(5, dtype=torch.float64)


def test_head_weights():
    # effective head weights at tau = 0 with beta 0.01: 0.008, 0.0064, 0.00512, 0.004096
    w = head_weights(4, ALPHA, torch.float64) * BETA
    torch.testing.assert_close(w, torch.tensor([0.008, 0.0064, 0.00512, 0.004096], dtype=torch.float64))


def test_combination_phase_heads():
    # 0.8 * 3 + 0.64 * 3.5 + 0.512 * 4 + 0.4096 * 4.5 = 2.4 + 2.24 + 2.048 + 1.8432 = 8.5312
    loss, ce = concept_heads_loss(CE, ONES, ALPHA, BETA, 0.3, include_ntp=False)  # beta, gamma unused
    assert loss.item() == pytest.approx(8.5312, abs=1e-9)
    assert torch.equal(ce, CE)


@pytest.mark.parametrize(
    "tau, gamma, expected",
    [(0.0, 1.0, 2.085312), (0.25, 0.9238795, 2.078818), (0.5, 0.7071068, 2.060325), (0.75, 0.3826834, 2.032647)],
)
def test_combination_finetune_sine_decay(tau, gamma, expected):
    g = schedule_weight(tau, "sine_decay")
    assert g == pytest.approx(gamma, abs=1e-7)
    loss, _ = concept_heads_loss(CE, ONES, ALPHA, BETA, g, include_ntp=True)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_sine_decay_ends_exactly_at_ntp():
    assert schedule_weight(1.0, "sine_decay") == 0.0
    loss, _ = concept_heads_loss(CE, ONES, ALPHA, BETA, schedule_weight(1.0, "sine_decay"), include_ntp=True)
    assert loss.item() == 2.0  # exactly CE_0


@pytest.mark.parametrize("tau", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_constant_schedule(tau):
    assert schedule_weight(tau, "constant") == 1.0
    loss, _ = concept_heads_loss(CE, ONES, ALPHA, BETA, schedule_weight(tau, "constant"), include_ntp=True)
    assert loss.item() == pytest.approx(2.085312, abs=1e-9)


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"schedule must be one of \['sine_decay', 'constant'\]"):
        schedule_weight(0.1, "rsine")
    with pytest.raises(ValueError, match="tau"):
        schedule_weight(1.5, "sine_decay")


def test_beta_zero_is_exactly_ntp_with_gradient():
    """beta = 0: the loss and its gradient are CE_0's, bit for bit, whatever the head sums."""
    sums = torch.tensor([3.0, 7.0, 9.0], requires_grad=True)
    counts = torch.tensor([4, 3, 2])
    loss, _ = concept_heads_loss(sums, counts, ALPHA, 0.0, 1.0, include_ntp=True)
    loss.backward()
    assert loss.item() == 3.0 / 4
    assert sums.grad.tolist() == [0.25, 0.0, 0.0]


def test_empty_head_contributes_zero_not_nan():
    sums = torch.tensor([1.0, 0.0, 0.0], requires_grad=True)
    loss, ce = concept_heads_loss(sums, torch.tensor([2, 0, 0]), ALPHA, 1.0, 1.0, include_ntp=True)
    loss.backward()
    assert ce.tolist() == [0.5, 0.0, 0.0] and torch.isfinite(sums.grad).all()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="H \\+ 1"):
        concept_heads_loss(torch.zeros(3), torch.ones(2), ALPHA, BETA, 1.0, True)


# ------------------------------------------------------------------------------ 6.6: from logits, naive path


def naive_nll_sums(logits, targets):
    """Reference: full (H+1, B, T, V) log-softmax in float64; per-head sums of -log p over valid targets."""
    logps = torch.log_softmax(logits.double(), dim=-1)  # (H+1, B, T, V)
    valid = targets != X
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (H+1, B, T)
    return -(picked * valid).sum(dim=(1, 2)), valid.sum(dim=(1, 2))


def test_from_logits_vector():
    """6.6: V 3, T 6, labels [-100,0,1,1,0,2], H 2; every head scores 2 on token (t mod 3) and 0 elsewhere.

    log p = -0.2395448 on a hit, -2.2395448 on a miss (ln(e^2 + 2) = 2.2395448).
    head 0: targets [0,1,1,0,2] at t = 0..4, predictions 0,1,2,0,1: 3 hits of 5 -> CE_0 = 1.039545
    head 1: targets [1,1,0,2] at t = 0..3, predictions 0,1,2,0: 1 hit of 4 -> CE_1 = 1.739545
    head 2: targets [1,0,2] at t = 0..2, predictions 0,1,2: 1 hit of 3 -> CE_2 = 1.572878
    """
    T, V, H = 6, 3, 2
    logits = torch.zeros(H + 1, 1, T, V, dtype=torch.float64)
    for p in range(T):
        logits[:, 0, p, p % 3] = 2.0
    targets = head_targets(t([[X, 0, 1, 1, 0, 2]]), H)
    sums, counts = naive_nll_sums(logits, targets)
    assert counts.tolist() == [5, 4, 3]
    hit, miss = -2 + math.log(math.exp(2) + 2), math.log(math.exp(2) + 2)
    assert hit == pytest.approx(0.2395448, abs=1e-7) and miss == pytest.approx(2.2395448, abs=1e-7)
    _, ce = concept_heads_loss(sums, counts, ALPHA, BETA, 1.0, include_ntp=True)
    torch.testing.assert_close(ce, torch.tensor([1.039545, 1.739545, 1.572878], dtype=torch.float64), atol=1e-6, rtol=0)
    for tau, expected in ((0.0, 1.063528), (0.5, 1.056503), (1.0, 1.039545)):
        loss, _ = concept_heads_loss(sums, counts, ALPHA, BETA, schedule_weight(tau, "sine_decay"), include_ntp=True)
        assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss, _ = concept_heads_loss(sums, counts, ALPHA, BETA, 1.0, include_ntp=False)
    assert loss.item() == pytest.approx(2.398278, abs=1e-6)


def test_from_logits_vector_through_trl_chunked_kernel():
    """6.6 again through the kernel the heads use: hidden 2 * onehot(t mod 3), unembedding I (logits as above)."""
    from trl.kernels import ChunkedLogProbFunction

    hidden = 2.0 * torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0, 1]]  # positions t = 0..4
    targets = torch.tensor([0, 1, 1, 0, 2])  # head 0's targets
    logps, _, _, _, top1 = ChunkedLogProbFunction.apply(
        hidden, torch.eye(3, dtype=torch.float64), None, targets, 1.0, 3, None, 1.0, ("is_top1",)
    )
    assert (-logps.sum() / 5).item() == pytest.approx(1.039545, abs=1e-6)
    assert top1.tolist() == [True, True, False, True, False]


# ------------------------------------------------------------------------ 6.7: global normalisation, gradcheck


def test_global_normalisation_across_micro_batches():
    """6.7: head 1 has NLL 6.0 over 3 targets in micro-batch A and 1.0 over 1 in B (GA 2): CE_1 = 7/4 = 1.75, not
    the official mean of means (6/3 + 1/1) / 2 = 1.5."""
    counts = torch.tensor([4, 4])  # global: 3 + 1 targets of head 1 (head 0 unused here)
    a, _ = concept_heads_loss(torch.tensor([0.0, 6.0]), counts, 1.0, 1.0, 1.0, include_ntp=False)
    b, _ = concept_heads_loss(torch.tensor([0.0, 1.0]), counts, 1.0, 1.0, 1.0, include_ntp=False)
    assert (a + b).item() == 1.75


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    sums = (torch.rand(5, generator=g, dtype=torch.float64) * 10).requires_grad_()
    counts = torch.tensor([7, 5, 0, 3, 1])
    for include_ntp in (True, False):
        assert torch.autograd.gradcheck(
            lambda s, inc=include_ntp: concept_heads_loss(s, counts, 0.7, 0.3, 0.9, inc)[0], (sums,)
        )
        assert torch.autograd.gradcheck(
            lambda s, inc=include_ntp: concept_heads_loss(s, counts, 0.7, 0.3, 0.9, inc)[1], (sums,)
        )
