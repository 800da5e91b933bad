"""ZeRO-3 shapes without DeepSpeed: code that reads an LM head's shape or allocates a gradient shaped like it must do
so where the head is whole.

Under DeepSpeed ZeRO-3 a parameter's `.data` is an empty tensor outside its module's forward or a `GatheredParameters`
context (TRL's `maybe_gather_lm_head_ctx`); `ds_shape` keeps its full shape. `Partitioned` below reproduces exactly
that on one process: `partition(p)` empties a parameter (its full value kept aside), `gather(*params)` puts the full
values back for the duration of a `with` block and empties them again on exit, and does nothing for a parameter that
is already whole, as TRL's context does for a tied head that `embed_tokens` keeps available.

The bugs these tests pin (both raised on every rank of `tests/test_topology.py`'s ZeRO-3 run before the fix):
- aligndistil: the vocabulary check read the frozen heads' shapes outside `gather()`:
  `ValueError: LM heads of different vocabularies: student 300, dpo 0, other 0`; and the backward allocated `grad_w`
  from the student head's shape before entering `gather()`: `RuntimeError: Bad in-place call: input tensor size [0]
  and output tensor size [300, 32] should match`.
- aligndistil with an untied student head: the loss's output was a dataclass, which DeepSpeed's module hooks do not
  look into, so the head was not gathered again for its gradient accumulation: `RuntimeError: The size of tensor a
  (0) must match the size of tensor b (32) at non-singleton dimension 1` (the output is now a named tuple).
- unlearning: `_check_target_ids` read the vocabulary from the head's local shape:
  `ValueError: row 0, column 'target_ids', position 0: 136 is not a token id of the model (0..-1)`.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from tokentrain.losses.aligndistil import TeacherSettings, aligndistil_loss
from tokentrain.trainers.unlearning import _check_target_ids

pytestmark = pytest.mark.usefixtures("one_thread")

V, H, N = 37, 5, 11  # odd vocabulary, width and position count


class Partitioned:
    """One process's view of ZeRO-3 partitioning (see the module docstring)."""

    def __init__(self):
        self.full: dict[int, torch.Tensor] = {}
        self.gathers = 0  # how many times a gather actually materialised something

    def partition(self, p: nn.Parameter) -> nn.Parameter:
        self.full[id(p)] = p.data
        p.ds_shape = p.data.shape
        p.data = torch.empty(0, dtype=p.dtype)
        return p

    @contextlib.contextmanager
    def gather(self, *params):
        todo = [p for p in params if p is not None and id(p) in self.full and p.data.numel() == 0]
        for p in todo:
            p.data = self.full[id(p)]
        self.gathers += bool(todo)
        try:
            yield
        finally:
            for p in todo:
                self.full[id(p)] = p.data
                p.data = torch.empty(0, dtype=p.dtype)


def _heads(seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    heads = []
    for _ in range(3):  # student, dpo, other
        w = nn.Parameter(torch.randn(V, H, generator=g))
        b = nn.Parameter(0.1 * torch.randn(V, generator=g)) if bias else None
        heads.append((w, b))
    hidden = [torch.randn(N, H, generator=g) for _ in range(3)]
    return heads, hidden


def _run(heads, hidden, gather=contextlib.nullcontext):
    """aligndistil_loss over two sequences, chunk 4 (three chunks); returns (loss, gradients of the student's hidden
    states, head weight and head bias (None without a bias)).

    The gradients are taken with `torch.autograd.grad`, i.e. as the autograd function returns them: what a partitioned
    parameter's gradient accumulation then does with them is DeepSpeed's (its hooks reduce a full-sized gradient)."""
    seq = torch.tensor([0] * 6 + [1] * 5)
    h_s = hidden[0].clone().requires_grad_(True)
    (w_s, b_s), (w_d, b_d), (w_o, b_o) = heads
    settings = TeacherSettings(r=2.0)
    out = aligndistil_loss(h_s, w_s, b_s, hidden[1], w_d, b_d, hidden[2], w_o, b_o, seq, 2, settings, 4, gather)
    inputs = [h_s, w_s] + ([b_s] if b_s is not None else [])
    grads = torch.autograd.grad(out.loss, inputs)
    return out.loss.detach(), grads[0], grads[1], grads[2] if b_s is not None else None


@pytest.mark.parametrize(
    "partitioned, bias",
    [
        # the topology test's case: tied student head (kept whole by embed_tokens), both teachers' heads partitioned
        (("dpo", "other"), False),
        # an untied student head partitioned too, every head with a bias: the student's gradients are full-sized
        (("student", "dpo", "other"), True),
    ],
)
def test_aligndistil_under_partitioned_heads_equals_whole_heads(partitioned, bias):
    """Partitioned heads gathered through `gather` give the whole heads' loss and gradients (hidden state, head
    weight and bias), and every partition is empty again afterwards."""
    heads, hidden = _heads(seed=3, bias=bias)
    expected = _run(heads, hidden)

    sharded, _ = _heads(seed=3, bias=bias)
    zero3 = Partitioned()
    names = ("student", "dpo", "other")
    for name, (w, b) in zip(names, sharded):
        if name in partitioned:
            zero3.partition(w)
            if b is not None:
                zero3.partition(b)
    flat = [p for head in sharded for p in head]
    got = _run(sharded, hidden, gather=lambda: zero3.gather(*flat))

    assert got[2].shape == (V, H)  # a full-sized gradient, as ZeRO-3's reduce hook receives it
    for what, a, b in zip(("loss", "hidden grad", "weight grad", "bias grad"), got, expected):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=what)
    for name, (w, _) in zip(names, sharded):
        assert (w.numel() == 0) == (name in partitioned), name  # partitions restored on exit
    assert zero3.gathers == 2  # once around the check and the forward, once in the backward: never per chunk


def test_aligndistil_vocabulary_check_sees_full_shapes():
    """The check compares whole heads: a teacher with another vocabulary is still refused when it is partitioned."""
    heads, hidden = _heads(seed=4, bias=False)
    g = torch.Generator().manual_seed(5)
    heads[2] = (nn.Parameter(torch.randn(V + 2, H, generator=g)), None)
    zero3 = Partitioned()
    for w, _ in heads[1:]:
        zero3.partition(w)
    flat = [w for w, _ in heads]
    with pytest.raises(ValueError, match=f"LM heads of different vocabularies: student {V}, dpo {V}, other {V + 2}"):
        _run(heads, hidden, gather=lambda: zero3.gather(*flat))


def test_aligndistil_output_is_seen_by_deepspeed_module_hooks():
    """The trainer returns the loss's output from the student's forward; ZeRO-3 hooks the tensors of a module's output
    (`apply_to_tensors_only`: tuples, lists, dicts) to re-gather the module's parameters before its backward, an
    untied LM head included. The loss must be among them: with the former dataclass it was not, and an untied head's
    gradient met its empty partition (`test_untied_lm_head_under_zero3[aligndistil]` in tests/test_topology.py)."""
    zero_utils = pytest.importorskip("deepspeed.runtime.zero.utils", reason="DeepSpeed is not installed")
    heads, hidden = _heads(seed=6, bias=False)
    seq = torch.tensor([0] * N)
    h_s = hidden[0].clone().requires_grad_(True)
    out = aligndistil_loss(h_s, *heads[0], hidden[1], *heads[1], hidden[2], *heads[2], seq, 1, TeacherSettings(), 4)
    seen = []
    hooked = zero_utils.apply_to_tensors_only(lambda t: seen.append(t) or t, out)
    assert any(t is out.loss for t in seen), "DeepSpeed's output hooks do not reach the loss"
    assert hooked.loss is out.loss and len(seen) == len(out)


class _TinyLM(nn.Module):
    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


def test_unlearning_target_check_reads_the_full_vocabulary_of_a_partitioned_head():
    """`_check_target_ids` on a ZeRO-3 model (head partition empty, `ds_shape` whole): in-range ids pass, an id past
    the vocabulary is refused with the full range in the message."""
    from datasets import Dataset

    model = _TinyLM(300, 32)
    Partitioned().partition(model.lm_head.weight)
    assert model.lm_head.weight.shape == (0,)
    good = Dataset.from_list([{"completion_ids": [5, 6, 7], "target_ids": [136.0, 299.0, 4.0]}])
    _check_target_ids(good, model)
    bad = Dataset.from_list([{"completion_ids": [5, 6], "target_ids": [136.0, 300.0]}])
    with pytest.raises(
        ValueError, match=r"row 0, column 'target_ids', position 1: 300.0 is not a token id of the model"
    ):
        _check_target_ids(bad, model)
    with pytest.raises(ValueError, match=r"\(0\.\.299\)"):
        _check_target_ids(bad, model)
