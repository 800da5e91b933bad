"""Tests of tokentrain/losses/aligndistil.py against specs/aligndistil.md section 6.

Vectors A-H are the spec's hand-computed numbers (V = 3, β0 = 0.1, ε = 1e-3), fed through the chunked loss with
identity heads (hidden state = logits) and through the naive full-logits reference. Properties: chunked = unchunked
(chunk 1, 7, N at odd N, H, V) in loss and gradients, gradcheck in float64, nothing vocabulary-sized saved for backward
beyond one chunk, D and α in range, and parity with a naive port of the official `aligndistil` branch (l1, r_code,
the official offset emulated by the mask).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tokentrain.losses.aligndistil import (
    NonFiniteLogitsError,
    TeacherSettings,
    aligndistil_loss,
    distribution_distance,
    naive_aligndistil_loss,
    reverse_kl,
    sequence_mean_loss,
    teacher_log_probs,
    token_alpha,
)

ATOL = 1e-6
pytestmark = pytest.mark.usefixtures("one_thread")

# Vector A's teacher: z^d = [2, 1, 0] (p^d = [0.665241, 0.244728, 0.090031]), z^o = [1, 1, 1] (uniform).
ZD_A, ZO_A = [2.0, 1.0, 0.0], [1.0, 1.0, 1.0]


def settings(**kw) -> TeacherSettings:
    return TeacherSettings(**{"r": 1.0, **kw})


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def chunked(zs, zd, zo, seq, num_sequences, s, chunk=256, dtype=torch.float32, student_grad=True):
    """aligndistil_loss with identity heads: the hidden states are the logits. Returns (output, student hidden)."""
    zs, zd, zo = t(zs, dtype), t(zd, dtype), t(zo, dtype)
    eye = torch.eye(zs.shape[1], dtype=dtype)
    hs = zs.clone().requires_grad_(student_grad)
    out = aligndistil_loss(hs, eye, None, zd, eye, None, zo, eye, None, torch.tensor(seq), num_sequences, s, chunk)
    return out, hs


# ------------------------------------------------------------------------------------------ vectors A-F (one token)


@pytest.mark.parametrize(
    "distance, expected",
    [
        # (D, α, π*, KL, β_t, β_t·KL)
        ("tvd", (0.331908, 0.332908, [0.750046, 0.197794, 0.052160], 0.521916, 0.300384, 0.156775)),
        ("l1", (0.663815, 0.664815, [0.816305, 0.154466, 0.029229], 0.769170, 0.150418, 0.115697)),
    ],
)
def test_vector_a_both_conventions(distance, expected):
    d, alpha, pi, kl, beta_t, loss = expected
    s = settings(distance=distance)
    out, _ = chunked([[0, 0, 0]], [ZD_A], [ZO_A], [0], 1, s)
    assert out.distance.item() == pytest.approx(d, abs=ATOL)
    assert out.alpha.item() == pytest.approx(alpha, abs=ATOL)
    assert out.kl.item() == pytest.approx(kl, abs=ATOL)
    assert out.beta_t.item() == pytest.approx(beta_t, abs=ATOL)
    assert out.loss.item() == pytest.approx(loss, abs=ATOL)
    logp, a, dd = teacher_log_probs(t([ZD_A]), t([ZO_A]), s)
    assert torch.allclose(logp.exp(), t([pi]), atol=ATOL)
    # z* = z^d + α (z^d − z^o) = [2 + α, 1, −α]: the extrapolated logits, up to a shift
    z_star = t([[2 + alpha, 1, -alpha]])
    assert torch.allclose(torch.log_softmax(z_star, -1), logp, atol=ATOL)


def test_vector_b_tvd_2r_equals_l1_r():
    tvd, _ = chunked([[0, 0, 0]], [ZD_A], [ZO_A], [0], 1, settings(r=2.0))
    l1, _ = chunked([[0, 0, 0]], [ZD_A], [ZO_A], [0], 1, settings(r=1.0, distance="l1"))
    for out in (tvd, l1):
        assert out.alpha.item() == pytest.approx(0.664815, abs=ATOL)
        assert out.loss.item() == pytest.approx(0.115697, abs=ATOL)


def test_vector_c_shift_invariance_and_log_softmax_inputs():
    s = settings()
    pi = t([[0.750046, 0.197794, 0.052160]])
    shifted = (t([ZD_A]) + 5.0, t([ZO_A]) - 3.0)
    as_logp = (torch.log_softmax(t([ZD_A]), -1), torch.log_softmax(t([ZO_A]), -1))
    for zd, zo in (shifted, as_logp):
        logp, _, d = teacher_log_probs(zd, zo, s)
        assert d.item() == pytest.approx(0.331908, abs=ATOL)
        assert torch.allclose(logp.exp(), pi, atol=ATOL)
        out, _ = chunked([[0, 0, 0]], zd.tolist(), zo.tolist(), [0], 1, s)
        assert out.loss.item() == pytest.approx(0.156775, abs=ATOL)


def test_vector_d_constant_contrastive_ratio_1():
    s = settings(alpha="constant", ratio=1.0, r=20.0)  # r is unused with "constant"
    logp, alpha, _ = teacher_log_probs(t([ZD_A]), t([ZO_A]), s)
    assert alpha.item() == 1.0
    assert torch.allclose(logp, torch.log_softmax(t([[3, 1, -1]]), -1), atol=ATOL)  # z* = [3, 1, −1]
    assert torch.allclose(logp.exp(), t([[0.866813, 0.117310, 0.015876]]), atol=ATOL)
    out, _ = chunked([[0, 0, 0]], [ZD_A], [ZO_A], [0], 1, s)
    assert out.kl.item() == pytest.approx(1.044319, abs=ATOL)
    assert out.loss.item() == pytest.approx(0.104432, abs=ATOL)  # β = β0/1 = 0.1


def test_vector_e_dpo_ref_ratio_2():
    s = settings(teacher="dpo_ref", alpha="constant", ratio=2.0)
    zo = [0.5, 0.5, 0.0]
    logp, _, _ = teacher_log_probs(t([ZD_A]), t([zo]), s)
    assert torch.allclose(logp, torch.log_softmax(t([[3.5, 1.5, 0]]), -1), atol=ATOL)  # z* = [3.5, 1.5, 0]
    assert torch.allclose(logp.exp(), t([[0.857977, 0.116115, 0.025909]]), atol=ATOL)
    out, _ = chunked([[0, 0, 0]], [ZD_A], [zo], [0], 1, s)
    assert out.kl.item() == pytest.approx(0.887899, abs=ATOL)
    assert out.beta_t.item() == pytest.approx(0.05, abs=ATOL)
    assert out.loss.item() == pytest.approx(0.044395, abs=ATOL)


def test_vector_f_identical_models():
    out, _ = chunked([[0, 0, 0]], [ZD_A], [ZD_A], [0], 1, settings())
    assert out.distance.item() == pytest.approx(0.0, abs=ATOL)
    assert out.alpha.item() == pytest.approx(0.001, abs=ATOL)
    assert out.beta_t.item() == pytest.approx(100.0, rel=1e-6)
    assert out.kl.item() == pytest.approx(0.308994, abs=ATOL)  # KL to π_dpo itself: z* = z^d
    assert out.loss.item() == pytest.approx(30.899368, abs=1e-4)


# ------------------------------------------------------------------------------------------------- vector G


def test_vector_g_gradient_closed_form_and_finite_differences():
    s = settings()
    out, hs = chunked([[0.3, -0.2, 0.1]], [ZD_A], [ZO_A], [0], 1, s, dtype=torch.float64)
    assert out.kl.item() == pytest.approx(0.442404, abs=ATOL)
    out.loss.backward()
    beta_t = out.beta_t.item()
    dkl = t([[-0.429117, -0.051972, 0.481089]], torch.float64)
    assert torch.allclose(hs.grad / beta_t, dkl, atol=ATOL)
    assert torch.allclose(hs.grad, t([[-0.128900, -0.015612, 0.144511]], torch.float64), atol=ATOL)
    # closed form: β_t p ⊙ (log p − log π* − KL)
    logp_t, _, _ = teacher_log_probs(t([ZD_A], torch.float64), t([ZO_A], torch.float64), s)
    logp = torch.log_softmax(t([[0.3, -0.2, 0.1]], torch.float64), -1)
    closed = beta_t * logp.exp() * (logp - logp_t - out.kl.item())
    assert torch.allclose(hs.grad, closed, atol=1e-12)
    # central finite differences of β_t·KL (the teacher and β_t are constants)
    fd = torch.zeros(3, dtype=torch.float64)
    for v in range(3):
        for sign in (1, -1):
            z = t([[0.3, -0.2, 0.1]], torch.float64)
            z[0, v] += sign * 1e-6
            fd[v] += sign * beta_t * reverse_kl(z, logp_t).item() / 2e-6
    assert torch.allclose(hs.grad[0], fd, atol=1e-7)


def test_student_equal_to_teacher_gives_zero_loss_and_gradient():
    s = settings()
    logp_t, _, _ = teacher_log_probs(t([ZD_A], torch.float64), t([ZO_A], torch.float64), s)
    out, hs = chunked((logp_t + 3.0).tolist(), [ZD_A], [ZO_A], [0], 1, s, dtype=torch.float64)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)
    assert hs.grad.abs().max().item() < 1e-12


# ------------------------------------------------------------------------------------------------- vector H


H_STUDENT = [[[0, 0, 0], [1, 0, -1]], [[0.5, 0.5, 0], [1e4, -1e4, 3e4]]]  # (B=2, T=2, V=3); [1][1] is masked
H_DPO = [[ZD_A, [0, 2, 1]], [[1.5, -0.5, 0], [-2e4, 1e4, 0]]]
H_OTHER = [[ZO_A, [1, 0, 1]], [[0, 0, 0], [5e3, 0, -7e3]]]
H_MASK = [[True, True], [True, False]]


def test_vector_h_batch_reduction_chunked():
    mask = torch.tensor(H_MASK)
    zs, zd, zo = (t(x)[mask].tolist() for x in (H_STUDENT, H_DPO, H_OTHER))  # the three response positions
    out, _ = chunked(zs, zd, zo, [0, 0, 1], 2, settings())
    assert torch.allclose(out.distance, t([0.331908, 0.509879, 0.402791]), atol=ATOL)
    assert torch.allclose(out.alpha, t([0.332908, 0.510879, 0.403791]), atol=ATOL)
    assert torch.allclose(out.kl, t([0.521916, 1.849520, 0.660055]), atol=ATOL)
    assert torch.allclose(out.beta_t, t([0.300384, 0.195741, 0.247653]), atol=ATOL)
    assert torch.allclose(out.beta_t * out.kl, t([0.156775, 0.362027, 0.163464]), atol=ATOL)
    assert out.loss.item() == pytest.approx(0.211433, abs=ATOL)  # sequence means 0.259401 and 0.163464
    assert (out.beta_t * out.kl).mean().item() == pytest.approx(0.227422, abs=ATOL)  # the wrong (token-mean) value
    l1, _ = chunked(zs, zd, zo, [0, 0, 1], 2, settings(distance="l1"))
    assert l1.loss.item() == pytest.approx(0.162974, abs=ATOL)
    const, _ = chunked(zs, zd, zo, [0, 0, 1], 2, settings(alpha="constant", ratio=1.0))
    assert const.loss.item() == pytest.approx(0.157791, abs=ATOL)


def test_vector_h_naive_reference_masked_slot_changes_nothing():
    mask = torch.tensor(H_MASK)
    zs = t(H_STUDENT).requires_grad_(True)
    loss, per_token = naive_aligndistil_loss(zs, t(H_DPO), t(H_OTHER), mask, 2, settings())
    loss.backward()
    assert loss.item() == pytest.approx(0.211433, abs=ATOL)
    assert torch.allclose(per_token["kl"], t([0.521916, 1.849520, 0.660055]), atol=ATOL)
    assert torch.isfinite(zs.grad).all() and zs.grad[1, 1].abs().max() == 0


def test_sequence_mean_minimal_check():
    v = t([0.2, 0.4, 1.0])
    assert sequence_mean_loss(v, torch.tensor([0, 0, 1]), 2).item() == pytest.approx(0.65, abs=1e-7)
    assert sequence_mean_loss(v, torch.tensor([1, 0, 1]), 2).item() == pytest.approx((0.4 + 0.6) / 2, abs=1e-7)


# ------------------------------------------------------------------------------------------ property tests


def random_case(n=13, h=5, v=11, seqs=(0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "h": [torch.randn(n, h, generator=g, dtype=dtype) for _ in range(3)],
        "w": [torch.randn(v, h, generator=g, dtype=dtype) for _ in range(3)],
        "b": [torch.randn(v, generator=g, dtype=dtype) for _ in range(3)],
        "seq": torch.tensor(seqs),
    }


def run_case(case, s, chunk, num_sequences=4):
    hs, ws, bs = (x.clone().requires_grad_(True) for x in (case["h"][0], case["w"][0], case["b"][0]))
    out = aligndistil_loss(
        hs, ws, bs, case["h"][1], case["w"][1], case["b"][1], case["h"][2], case["w"][2], case["b"][2],
        case["seq"], num_sequences, s, chunk,
    )  # fmt: skip
    out.loss.backward()
    return out, (hs.grad, ws.grad, bs.grad)


@pytest.mark.parametrize(
    "s",
    [
        settings(r=20.0),
        settings(r=10.0, distance="l1"),
        settings(alpha="constant", ratio=2.0),
        settings(teacher="dpo_ref", alpha="constant", ratio=0.7),
    ],
    ids=["tvd", "l1", "constant", "dpo_ref"],
)
def test_chunked_equals_unchunked_and_naive(s):
    case = random_case()
    n = case["seq"].numel()
    ref, ref_grads = run_case(case, s, chunk=n)
    for chunk in (1, 7):
        out, grads = run_case(case, s, chunk)
        assert abs(out.loss.item() - ref.loss.item()) < 1e-6
        for a, b in zip(grads, ref_grads):
            assert torch.allclose(a, b, atol=1e-6, rtol=0)
        assert torch.allclose(out.alpha, ref.alpha, atol=1e-6)
    # the naive full-logits reference in float64, as a (B=4, T=4) batch with the same positions
    z = [(hh.double() @ ww.double().t() + bb.double()) for hh, ww, bb in zip(case["h"], case["w"], case["b"])]
    mask = torch.zeros(4, 4, dtype=torch.bool)
    full = [torch.full((4, 4, 11), 1e3, dtype=torch.float64) for _ in range(3)]  # garbage off the mask
    col = [0, 0, 0, 0]
    for i, b in enumerate(case["seq"].tolist()):
        mask[b, col[b]] = True
        for k in range(3):
            full[k][b, col[b]] = z[k][i]
        col[b] += 1
    student = full[0].clone().requires_grad_(True)
    naive, per_token = naive_aligndistil_loss(student, full[1], full[2], mask, 4, s)
    assert abs(naive.item() - ref.loss.item()) < 1e-6
    assert torch.allclose(per_token["kl"].float(), ref.kl, atol=1e-6)
    naive.backward()
    # dL/dz chained through the head: dL/dh = dL/dz @ W, dL/dW = dL/dz^T h
    gz = student.grad[mask]  # (N, V) in the same row-major order
    assert torch.allclose((gz @ case["w"][0].double()).float(), ref_grads[0], atol=1e-6)
    assert torch.allclose((gz.t() @ case["h"][0].double()).float(), ref_grads[1], atol=1e-6)
    assert torch.allclose(gz.sum(0).float(), ref_grads[2], atol=1e-6)


def test_gradcheck_float64():
    case = random_case(n=5, h=3, v=7, seqs=(0, 1, 1, 2, 2), dtype=torch.float64)
    s = settings(r=3.0)

    def f(hs, ws, bs):
        out = aligndistil_loss(
            hs, ws, bs, case["h"][1], case["w"][1], case["b"][1], case["h"][2], case["w"][2], case["b"][2],
            case["seq"], 3, s, 2,
        )  # fmt: skip
        return out.loss

    inputs = tuple(x.clone().requires_grad_(True) for x in (case["h"][0], case["w"][0], case["b"][0]))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)


def test_nothing_vocabulary_sized_saved_or_created_beyond_one_chunk():
    """Property 2: no tensor saved for backward exceeds chunk_tokens × V elements, apart from the inputs themselves
    (hidden states and head weights, already resident); and no tensor created in the forward or backward has more
    than chunk × V elements unless it is (V, H)-shaped (the head weight's gradient)."""
    n, h, v, chunk = 61, 5, 257, 4
    case = random_case(n=n, h=h, v=v, seqs=tuple(i // 7 for i in range(n)))
    inputs = {x.data_ptr() for x in case["h"] + case["w"] + case["b"]}
    saved = []

    def pack(x):
        saved.append((x.numel(), tuple(x.shape), x.data_ptr()))
        return x

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.shapes.append(tuple(o.shape))
            return out

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), Sizes() as mode:
        hs, ws, bs = (x.clone().requires_grad_(True) for x in (case["h"][0], case["w"][0], case["b"][0]))
        inputs |= {hs.data_ptr(), ws.data_ptr(), bs.data_ptr()}
        out = aligndistil_loss(
            hs, ws, bs, case["h"][1], case["w"][1], case["b"][1], case["h"][2], case["w"][2], case["b"][2],
            case["seq"], 9, settings(), chunk,
        )  # fmt: skip
        out.loss.backward()
    assert saved, "the loss saved nothing for backward?"
    for numel, shape, ptr in saved:
        assert ptr in inputs or numel <= chunk * v, f"saved tensor {shape} exceeds one chunk ({chunk} x {v})"
    big = [s for s in mode.shapes if torch.Size(s).numel() > chunk * v and s not in ((v, h), (h, v))]
    assert not big, f"tensors larger than one chunk were created: {big[:5]}"
    assert (
        max(torch.Size(s).numel() for s in mode.shapes if s not in ((v, h), (h, v))) == chunk * v
    )  # chunks did run full width


def test_distance_and_alpha_ranges():
    g = torch.Generator().manual_seed(1)
    zd = torch.randn(200, 9, generator=g) * torch.tensor([0.1, 1.0, 30.0]).repeat_interleave(67)[:200, None]
    zo = torch.randn(200, 9, generator=g) * 10
    zd[0] = torch.tensor([50.0] + [-50.0] * 8)  # near one-hot, disjoint supports: D -> 1
    zo[0] = torch.tensor([-50.0] * 8 + [50.0])
    for r in (1.0, 20.0):
        s = settings(r=r)
        _, alpha, d = teacher_log_probs(zd, zo, s)
        assert d.min() >= 0 and d.max() <= 1 + 1e-6 and d[0] > 0.999999
        assert alpha.min() >= s.eps and alpha.max() <= r + s.eps + 1e-5
    logp_d, logp_o = torch.log_softmax(zd, -1), torch.log_softmax(zo, -1)
    assert torch.allclose(distribution_distance(logp_d, logp_o, "l1"), 2 * distribution_distance(logp_d, logp_o))
    assert torch.equal(token_alpha(torch.zeros(3), settings(alpha="constant", ratio=2.5)), torch.full((3,), 2.5))


def official_aligndistil(student_logits, teacher_logits, reference_logits, labels, beta, beta2):
    """A naive port of the official off-policy `--reward_boost_type aligndistil` branch (aligndistil_offpolicy_trainer.py,
    kd_coef 1, kd_temperature 1, reward_len_norm): the logits at the positions where `labels` is not -100."""
    mask = (labels != -100).int()
    stu_probs = torch.softmax(student_logits, dim=-1, dtype=torch.float32)
    stu_lprobs = torch.log_softmax(student_logits, dim=-1, dtype=torch.float32)
    tea_lprobs = torch.log_softmax(teacher_logits, dim=-1, dtype=torch.float32)
    ref_lprobs = torch.log_softmax(reference_logits, dim=-1, dtype=torch.float32)
    reward_distribution = beta * (tea_lprobs - ref_lprobs)
    expected_reward = ((stu_probs * reward_distribution).sum(-1) * mask).sum(-1).mean(0)
    tvd = (tea_lprobs.exp() - ref_lprobs.exp()).abs().sum(-1)
    weight = tvd * beta2 + 1e-3
    beta2 = beta / weight
    final_tea_logits = weight.unsqueeze(-1) * (teacher_logits - reference_logits) + teacher_logits
    final_tea_lprobs = torch.log_softmax(final_tea_logits, dim=-1, dtype=torch.float32)
    rlhf_loss = (stu_probs * (stu_lprobs - final_tea_lprobs)).sum(-1) * beta2
    rlhf_loss = ((rlhf_loss * mask).sum(-1) / mask.sum(-1)).mean(0)
    return rlhf_loss, expected_reward


def test_parity_with_official_code_l1_r_code_official_offset():
    """Property 7. ids [p0 p1 p2 y1 y2 EOS pad] (P = 3, T = 3): the official code indexes the logits at the response
    tokens' own positions {3, 4, 5} (labels unshifted, mask = labels != -100); tokentrain uses {2, 3, 4}. With the
    official mask fed to tokentrain's loss (the offset emulated) and l1 with r = r_code, the losses agree."""
    g = torch.Generator().manual_seed(4)
    b, length, v, h = 3, 7, 13, 6
    heads = [(torch.randn(v, h, generator=g), torch.randn(v, generator=g)) for _ in range(3)]
    hidden = [torch.randn(b, length, h, generator=g) for _ in range(3)]
    logits = [hh @ w.t() + bias for hh, (w, bias) in zip(hidden, heads)]
    labels = torch.full((b, length), -100)
    labels[0, 3:6] = 1  # P = 3, T = 3 (y1 y2 EOS), a pad at 6
    labels[1, 2:7] = 1  # P = 2, T = 5
    labels[2, 5:6] = 1  # P = 5, T = 1
    official_loss, official_reward = official_aligndistil(*logits, labels, beta=0.1, beta2=10.0)
    official_mask = labels != -100  # the code's positions {3, 4, 5} for row 0
    assert official_mask[0].nonzero().flatten().tolist() == [3, 4, 5]
    ours_mask = torch.zeros_like(official_mask)
    ours_mask[:, :-1] = official_mask[:, 1:]  # tokentrain's positions: P-1 ... P+T-2
    assert ours_mask[0].nonzero().flatten().tolist() == [2, 3, 4]
    seq = torch.arange(b).unsqueeze(1).expand(b, length)[official_mask]
    s = TeacherSettings(distance="l1", r=10.0, beta0=0.1)
    out = aligndistil_loss(
        hidden[0][official_mask], *heads[0], hidden[1][official_mask], *heads[1], hidden[2][official_mask],
        *heads[2], seq, b, s, chunk_tokens=4,
    )  # fmt: skip
    assert out.loss.item() == pytest.approx(official_loss.item(), abs=1e-6)
    expected_reward = torch.zeros(b).index_add_(0, seq, out.reward).mean()
    assert expected_reward.item() == pytest.approx(official_reward.item(), abs=1e-6)
    # the same with the spec's default convention: tvd with r = 2 r_code
    tvd = aligndistil_loss(
        hidden[0][official_mask], *heads[0], hidden[1][official_mask], *heads[1], hidden[2][official_mask],
        *heads[2], seq, b, TeacherSettings(r=20.0), chunk_tokens=4,
    )  # fmt: skip
    assert tvd.loss.item() == pytest.approx(official_loss.item(), abs=1e-6)


def test_non_finite_teacher_logits_name_the_model_and_position():
    case = random_case()
    case["h"][2][9, 1] = float("nan")
    with pytest.raises(NonFiniteLogitsError) as err:
        run_case(case, settings(), chunk=4)
    assert err.value.model == "other" and err.value.index == 9
    case = random_case()
    case["w"][1][3, 0] = float("inf")
    with pytest.raises(NonFiniteLogitsError) as err:
        run_case(case, settings(), chunk=4)
    assert err.value.model == "dpo" and err.value.index == 0


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"r": float("nan")}, "r must be finite and > 0"),
        ({"eps": 0.0}, "eps must be finite and > 0"),
        ({"ratio": -1.0}, "ratio must be finite and > 0"),
        ({"beta0": float("inf")}, "beta0 must be finite and > 0"),
        ({"distance": "kl"}, "distance must be one of"),
        ({"teacher": "theorem1_adaptive"}, "teacher must be one of"),
        ({"alpha": "clipped"}, "alpha must be one of"),
        ({"teacher": "dpo_ref"}, "'dpo_ref' takes alpha 'constant' only"),
    ],
)
def test_settings_refused(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        TeacherSettings(**kw)


def test_bad_shapes_and_chunk():
    case = random_case()
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        run_case(case, settings(), chunk=0)
    case["w"][2] = case["w"][2][:-1]
    with pytest.raises(ValueError, match="different vocabularies: student 11, dpo 11, other 10"):
        run_case(case, settings(), chunk=4)
