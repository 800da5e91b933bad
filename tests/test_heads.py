"""Tests for tokentrain/heads.py: spec `specs/concept_heads.md` sections 3 (heads, capture, memory, persistence), 6
(initialisation, causality, chunked = naive, memory, persistence) and 9 (bad inputs of the heads).

Models are built from a LlamaConfig in code at odd shapes (vocabulary 37, hidden 16, 3 heads, batch 3, length 7),
in float32 on the CPU, where every comparison that the spec calls exact is `torch.equal`.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

from tokentrain.heads import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AuxHeads,
    AuxHeadsConfig,
    decoder_layers,
    final_norm,
    unembedding_probe,
)
from tokentrain.losses.concept_heads import head_targets

X = -100
HEAD_TYPES = ("decoder_layer", "resblock")
ATTN = ("eager", "sdpa")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama(vocab=37, hidden=16, layers=2, attn="sdpa", seed=0, tied=False):
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(attn)
    return model.eval()


def randomize(heads, seed=1, scale=0.2):
    """Move every head away from its (NTP-equal) initialisation, so that each head computes something of its own."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def batch(B=3, T=7, vocab=37, seed=0, left_pad=(0, 2, 0)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate(left_pad[:B]):
        mask[b, :n] = 0
        ids[b, :n] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_every_head_equals_the_ntp_head_at_init(head_type, attn):
    model = llama(attn=attn)
    heads = AuxHeads.attach(model, AuxHeadsConfig(3, head_type))
    ids, mask = batch()
    logits = heads.logits(model, ids, mask)  # (H+1, B, T, V)
    assert logits.shape == (4, 3, 7, 37)
    assert torch.equal(logits[0], model(input_ids=ids, attention_mask=mask).logits)
    for i in range(1, 4):
        assert torch.equal(logits[i], logits[0]), f"head {i}"


def test_decoder_layer_head_is_a_copy_of_the_last_layer():
    model = llama()
    heads = AuxHeads.attach(model, AuxHeadsConfig(2, "decoder_layer"))
    last = decoder_layers(model)[-1]
    for head in heads.heads:
        assert type(head) is type(last) and head is not last
        for (n, p), (m, q) in zip(head.named_parameters(), last.named_parameters()):
            assert n == m and torch.equal(p, q) and p.data_ptr() != q.data_ptr()
        assert not head._forward_pre_hooks and not head._forward_hooks  # the capture hooks are not copied
    assert "concept_heads.heads.0.self_attn.q_proj.weight" in dict(model.named_parameters())


# ------------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_heads_are_causal_with_left_padding(head_type, attn):
    """Changing token t+1 leaves every head's logits at the real positions <= t bit-identical."""
    model = llama(attn=attn)
    heads = AuxHeads.attach(model, AuxHeadsConfig(3, head_type))
    randomize(heads)
    ids, mask = batch(T=9, left_pad=(0, 3, 1))
    base = heads.logits(model, ids, mask)
    assert not torch.equal(base[1], base[0])  # the heads differ from the NTP head
    for t in (3, 5, 7):
        changed = ids.clone()
        changed[:, t + 1] = (changed[:, t + 1] % 36) + 1
        out = heads.logits(model, changed, mask)
        real = mask[:, : t + 1].bool()  # padded positions read nothing real (eager spreads them over all keys)
        assert torch.equal(out[:, :, : t + 1][:, real], base[:, :, : t + 1][:, real]), f"t={t}"
        assert not torch.equal(out[:, :, t + 1 :], base[:, :, t + 1 :])  # the change is seen later


def test_negative_control_decoder_head_without_the_mask_sees_the_future():
    """The official code calls its heads without a mask: under eager that leaks future tokens into position t."""
    model = llama(attn="eager")
    heads = AuxHeads.attach(model, AuxHeadsConfig(1, "decoder_layer"))
    ids, mask = batch(left_pad=(0, 0, 0))

    def head_output(input_ids, drop_mask):
        heads.arm()
        model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        capture = heads.read()
        if drop_mask:
            capture.kwargs.pop("attention_mask")
        return heads.head_hidden(0, capture)

    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] % 36) + 1
    with torch.no_grad():
        assert torch.equal(head_output(ids, False)[:, :5], head_output(changed, False)[:, :5])
        assert not torch.equal(head_output(ids, True)[:, :5], head_output(changed, True)[:, :5])


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_packed_row_equals_documents_alone(head_type, attn):
    """Packed (padding-free, position_ids restart at 0): document 2's head logits equal those of document 2 alone."""
    model = llama(attn=attn)
    heads = AuxHeads.attach(model, AuxHeadsConfig(2, head_type))
    randomize(heads)
    g = torch.Generator().manual_seed(3)
    doc1, doc2 = torch.randint(1, 37, (1, 5), generator=g), torch.randint(1, 37, (1, 6), generator=g)
    packed = torch.cat([doc1, doc2], dim=1)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]])
    together = heads.logits(model, packed, position_ids=positions)
    alone = heads.logits(model, doc2)
    torch.testing.assert_close(together[:, :, 5:], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(together[:, :, :5], heads.logits(model, doc1), atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------- chunked CE = naive CE


def naive_head_nll(heads, model, capture, targets):
    """Reference: full float64 logits per head, log-softmax, gather; the same graph up to the head's hidden state."""
    norm, lm_head = final_norm(model), model.get_output_embeddings()
    sums, hits = [], []
    for i in range(heads.config.num_aux_heads):
        logits = lm_head(norm(heads.head_hidden(i, capture))).double()  # (B, T, V)
        logps = torch.log_softmax(logits, -1)
        target = targets[i + 1]
        valid = target != X
        picked = logps.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums.append(-(picked * valid).sum())
        hits.append(((logits.argmax(-1) == target) & valid).sum())
    return torch.stack(sums), torch.stack(hits)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_chunked_head_nll_equals_naive_values_and_gradients(head_type):
    """B 3, T 7, V 37, d 16, H 3: the heads' NLL sums and the gradients of every trainable weight, to 1e-5."""
    model = llama(attn="eager")
    heads = AuxHeads.attach(model, AuxHeadsConfig(3, head_type))
    randomize(heads)
    model.train()
    model.lm_head.requires_grad_(False)  # frozen, as in every phase
    ids, mask = batch()
    labels = ids.clone()
    labels[mask == 0] = X
    labels[:, :2] = X  # a prompt
    targets = head_targets(labels, 3, attention_mask=mask)

    results = []
    for fn in ("chunked", "naive"):
        model.zero_grad()
        heads.arm()
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        capture = heads.read()
        sums, hits = (
            heads.head_nll(model, capture, targets)
            if fn == "chunked"
            else naive_head_nll(heads, model, capture, targets)
        )
        (sums * torch.tensor([0.8, 0.64, 0.512], dtype=sums.dtype)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((sums.detach().double(), hits, grads))
    (s_c, h_c, g_c), (s_n, h_n, g_n) = results
    torch.testing.assert_close(s_c, s_n, atol=1e-5, rtol=0)
    assert torch.equal(h_c, h_n)
    assert g_c.keys() == g_n.keys() and any("concept_heads" in n for n in g_c) and any("layers.0" in n for n in g_c)
    for name in g_c:
        torch.testing.assert_close(g_c[name], g_n[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_score_equals_full_logits(head_type):
    """`score` (evaluation: chunked, no logits) = CE and top-1 hits computed from `logits()` in float64."""
    model = llama()
    heads = AuxHeads.attach(model, AuxHeadsConfig(3, head_type))
    randomize(heads)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, X)
    labels[:, :3] = X
    scored = heads.score(model, ids, labels, attention_mask=mask)
    targets = head_targets(labels, 3, attention_mask=mask)
    logps = torch.log_softmax(heads.logits(model, ids, mask).double(), -1)  # (H+1, B, T, V)
    valid = targets != X
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(scored["nll"].double(), -(picked * valid).sum(dim=(1, 2)), atol=1e-5, rtol=0)
    assert torch.equal(scored["correct"], ((logps.argmax(-1) == targets) & valid).sum(dim=(1, 2)))
    assert scored["count"].tolist() == valid.sum(dim=(1, 2)).tolist()


def test_head_without_targets_adds_exactly_zero_and_keeps_its_weights_in_the_graph():
    model = llama()
    heads = AuxHeads.attach(model, AuxHeadsConfig(4, "resblock"))
    ids = torch.randint(1, 37, (1, 3))
    targets = head_targets(ids, 4)  # length 3: heads 2..4 have no target
    heads.arm()
    model(input_ids=ids, use_cache=False)
    sums, hits = heads.head_nll(model, heads.read(), targets)
    assert sums[1:].tolist() == [0.0, 0.0, 0.0] and hits.tolist()[1:] == [0, 0, 0] and sums[0] > 0
    sums.sum().backward()
    assert all(p.grad is not None for p in heads.heads[3].parameters())  # DDP needs every head in the graph


# ------------------------------------------------------------------------------------------ gradient path


def test_decoder_layer_head_losses_reach_layers_below_n_and_the_norm_but_not_layer_n():
    """Phase 2 gradient path (decoder_layer): head losses flow into layers 1..N-1 and the final norm, never into
    layer N (head 0's private layer)."""
    model = llama(layers=3)
    heads = AuxHeads.attach(model, AuxHeadsConfig(2, "decoder_layer"))
    heads.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    model.model.embed_tokens.requires_grad_(False)
    ids, mask = batch()
    heads.arm()
    model(input_ids=ids, attention_mask=mask, use_cache=False)
    sums, _ = heads.head_nll(model, heads.read(), head_targets(ids, 2, attention_mask=mask))
    sums.sum().backward()
    layers = decoder_layers(model)
    for p in layers[-1].parameters():
        assert p.grad is None or not p.grad.any()
    for i in (0, 1):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[i].parameters()), f"layer {i}"
    assert model.model.norm.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ the capture


def test_capture_records_only_when_armed_and_reads_once():
    model = llama()
    heads = AuxHeads.attach(model, AuxHeadsConfig(1, "decoder_layer"))
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)  # not armed: nothing recorded
    with pytest.raises(RuntimeError, match="did not run"):
        heads.read()
    heads.arm()
    model(input_ids=ids, attention_mask=mask, use_cache=False)
    capture = heads.read()
    assert capture.hidden_in.shape == capture.hidden_out.shape == (3, 7, 16)
    assert capture.kwargs["use_cache"] is False and capture.kwargs["cache"] is None
    assert {"attention_mask", "position_embeddings", "position_ids"} <= set(capture.kwargs)
    with pytest.raises(RuntimeError):
        heads.read()  # disarmed when read
    out = model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 10 and not heads._record  # generate() never records


def test_gradient_checkpointing_recompute_does_not_touch_the_capture():
    """Loss and gradients with activation checkpointing equal those without (the backward's recompute of layer N
    runs after the capture was read)."""
    grads = []
    for checkpointing in (False, True):
        model = llama()
        heads = AuxHeads.attach(model, AuxHeadsConfig(2, "decoder_layer"))
        randomize(heads)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        ids, mask = batch()
        heads.arm()
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        sums, _ = heads.head_nll(model, heads.read(), head_targets(ids, 2, attention_mask=mask))
        (sums.sum() + out.logits.square().mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------- persistence


@pytest.fixture
def saved_heads(tmp_path):
    model = llama()
    heads = AuxHeads.attach(model, AuxHeadsConfig(3, "decoder_layer"))
    randomize(heads)
    folder = heads.save(tmp_path / "heads")
    return model, heads, folder


def test_save_and_strict_load_round_trip(saved_heads):
    model, heads, folder = saved_heads
    state = load_file(str(folder / WEIGHTS_FILE))
    assert set(state) == set(heads.state_dict()) and all(k.startswith("heads.") for k in state)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    assert meta["format"] == "tokentrain.concept_heads" and meta["version"] == 1
    assert meta["num_aux_heads"] == 3 and meta["head_type"] == "decoder_layer"
    assert meta["attach"] == "last_layer_input" and meta["final_norm"] is True
    assert (meta["model_type"], meta["layer_class"]) == ("llama", "LlamaDecoderLayer")
    assert (meta["hidden_size"], meta["vocab_size"], meta["num_hidden_layers"]) == (16, 37, 2)
    assert meta["dtype"] == "float32" and len(meta["unembedding_probe"]) == 16
    w = model.lm_head.weight
    assert meta["unembedding_probe"][5] == w[5 * 37 // 16, 5 * 16 // 16].item()

    fresh = llama()  # same seed: same base weights, fresh heads
    loaded = AuxHeads.load(fresh, folder)
    ids, mask = batch()
    assert torch.equal(loaded.logits(fresh, ids, mask), heads.logits(model, ids, mask))


def test_load_onto_a_bf16_copy_is_within_the_probe_tolerance(saved_heads):
    _, _, folder = saved_heads
    fresh = llama().to(torch.bfloat16)
    loaded = AuxHeads.load(fresh, folder)
    assert next(loaded.parameters()).dtype == torch.bfloat16


def _rewrite(folder, change):
    state = load_file(str(folder / WEIGHTS_FILE))
    change(state)
    save_file(state, str(folder / WEIGHTS_FILE))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s.pop("heads.1.mlp.up_proj.weight"), r"missing keys \['heads.1.mlp.up_proj.weight'\]"),
        (lambda s: s.update({"heads.3.extra": torch.zeros(2)}), r"unexpected keys \['heads.3.extra'\]"),
        (
            lambda s: s.update({"heads.0.mlp.down_proj.weight": torch.zeros(16, 8)}),
            r"mis-shaped keys \['heads.0.mlp.down_proj.weight: saved \(16, 8\), expected \(16, 32\)'\]",
        ),
    ],
)
def test_strict_load_failures_name_the_keys(saved_heads, change, match):
    model, _, folder = saved_heads
    _rewrite(folder, change)
    fresh = llama()
    with pytest.raises(ValueError, match=match):
        AuxHeads.load(fresh, folder)
    assert "concept_heads" not in fresh._modules and not decoder_layers(fresh)[-1]._forward_hooks  # rolled back


def test_strict_load_lists_at_most_five_keys(saved_heads):
    _, _, folder = saved_heads
    _rewrite(folder, lambda s: [s.pop(k) for k in [k for k in s if k.startswith("heads.2.")]])
    with pytest.raises(ValueError, match=r"missing keys \[.*\] \(\+4 more\)"):
        AuxHeads.load(llama(), folder)


@pytest.mark.parametrize(
    "other, match",
    [
        (lambda: llama(hidden=24), "saved for another model: hidden_size is 16 there but 24 here"),
        (lambda: llama(vocab=41), "saved for another model: vocab_size is 37 there but 41 here"),
        (lambda: llama(layers=3), "saved for another model: num_hidden_layers is 2 there but 3 here"),
        (lambda: llama(seed=5), "trained against another lm_head"),
    ],
)
def test_heads_for_another_model_name_the_field(saved_heads, other, match):
    _, _, folder = saved_heads
    with pytest.raises(ValueError, match=match):
        AuxHeads.load(other(), folder)


def test_layer_class_mismatch_is_named(saved_heads):
    _, _, folder = saved_heads
    meta = json.loads((folder / CONFIG_FILE).read_text())
    meta["layer_class"] = "Qwen2DecoderLayer"
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="layer_class is 'Qwen2DecoderLayer' there but 'LlamaDecoderLayer' here"):
        AuxHeads.load(llama(), folder)


@pytest.mark.parametrize(
    "expected, match",
    [
        (AuxHeadsConfig(4, "decoder_layer"), "saved with num_aux_heads 3 but this run asks for 4"),
        (AuxHeadsConfig(3, "resblock"), "saved with head_type 'decoder_layer' but this run asks for 'resblock'"),
    ],
)
def test_head_config_mismatch_is_named(saved_heads, expected, match):
    _, _, folder = saved_heads
    with pytest.raises(ValueError, match=match):
        AuxHeads.load(llama(), folder, expected=expected)


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, CONFIG_FILE])
def test_heads_folder_missing_a_file(saved_heads, missing):
    _, _, folder = saved_heads
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"{missing} missing"):
        AuxHeads.load(llama(), folder)


def test_resblock_round_trip_and_attach_point(tmp_path):
    model = llama()
    heads = AuxHeads.attach(model, AuxHeadsConfig(2, "resblock"))
    randomize(heads)
    folder = heads.save(tmp_path)
    assert json.loads((folder / CONFIG_FILE).read_text())["attach"] == "last_layer_output"
    assert sorted(load_file(str(folder / WEIGHTS_FILE))) == [
        "heads.0.linear.bias",
        "heads.0.linear.weight",
        "heads.1.linear.bias",
        "heads.1.linear.weight",
    ]
    fresh = llama()
    ids, mask = batch()
    assert torch.equal(AuxHeads.load(fresh, folder).logits(fresh, ids, mask), heads.logits(model, ids, mask))


def test_probe_reads_sixteen_fixed_entries():
    model = llama(vocab=37, hidden=16)
    w = model.lm_head.weight
    assert unembedding_probe(model) == [w[k * 37 // 16, k * 16 // 16].item() for k in range(16)]


# ---------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("n", [0, -2, 2.0, True])
def test_num_aux_heads_must_be_a_positive_integer(n):
    with pytest.raises(ValueError, match="num_aux_heads must be an integer >= 1"):
        AuxHeadsConfig(num_aux_heads=n)


def test_unknown_head_type_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"head_type must be one of \['decoder_layer', 'resblock'\], got 'mlp'"):
        AuxHeadsConfig(head_type="mlp")


def test_model_without_a_layers_list_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=37, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="GPT2LMHeadModel: its decoder .* has no `layers` list"):
        AuxHeads.attach(model, AuxHeadsConfig(1))


def test_attach_twice_or_after_peft_is_refused():
    from peft import LoraConfig, get_peft_model

    model = llama()
    AuxHeads.attach(model, AuxHeadsConfig(1))
    with pytest.raises(ValueError, match="already has concept_heads"):
        AuxHeads.attach(model, AuxHeadsConfig(1))
    peft = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="before wrapping the model with PEFT"):
        AuxHeads.attach(peft, AuxHeadsConfig(1))


def test_detach_leaves_a_vanilla_model():
    model = llama()
    heads = AuxHeads.attach(model, AuxHeadsConfig(2))
    heads.detach(model)
    assert not any("concept_heads" in k for k in model.state_dict())
    assert not decoder_layers(model)[-1]._forward_pre_hooks


# --------------------------------------------------------------------------------------------------- memory


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.numel() > self.numel:
                self.numel, self.shape = x.numel(), tuple(x.shape)
        return out


@pytest.mark.parametrize("num_heads, T", [(1, 33), (4, 33), (4, 65)])
def test_peak_loss_memory_is_one_tile_whatever_the_heads_and_length(monkeypatch, num_heads, T):
    """The whole phase-2 micro-batch loss (backbone, TRL's fused head 0, H heads, chunked CE) and its backward: the
    largest tensor is one (rows, vocab) tile of the chunked kernel, the same for H = 1 and 4 and for T = 33 and 65,
    never a (B, T, V) logits tensor. TRL's tile is (min(N, 4096), min(V, 32768)); the token side is lowered to 16
    here so that the tile is reached at test sizes (V = 40,000 > the 32,768 vocabulary chunk)."""
    import types

    import trl.kernels.chunked_logprob as kernel
    from trl.trainer.utils import add_fused_lm_head

    from tokentrain.trainers.concept_heads import ConceptHeadsTrainer

    monkeypatch.setattr(kernel, "TOKEN_CHUNK_SIZE", 16)
    V, B = 40_000, 2
    model = llama(vocab=V, hidden=16, layers=1)
    heads = AuxHeads.attach(model, AuxHeadsConfig(num_heads, "decoder_layer"))
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    model.train()
    model.lm_head.requires_grad_(False)
    model.model.embed_tokens.requires_grad_(False)
    heads.requires_grad_(False)
    ids = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = X
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    targets = head_targets(labels, num_heads, attention_mask=inputs["attention_mask"])
    counts = (targets != X).sum(dim=(1, 2))
    fake = types.SimpleNamespace(aux_heads=heads, args=types.SimpleNamespace(phase="finetune", alpha=0.8, beta=0.01))
    with LargestTensor() as probe:
        loss, _ = ConceptHeadsTrainer._loss_in_forward(fake, model, inputs, targets, counts, 1.0)
        loss.backward()
    tile = 16 * 32_768
    assert probe.numel == tile, probe.shape
    assert probe.numel < B * T * V  # less than a single head's logits, let alone (H + 1) * B * T * V
