"""Tests of signals/head.py (issue 15): the direct and the fused head paths of every scoring pass give the results of
the plain forward (full logits -> the loss's own arithmetic) and of the previous pass (TRL's fused head for
ref_logps), within 1e-6 in float32, at odd shapes: a vocabulary of 337 (the tokenizer's 300 + 37 unused ids), chunks
of 7 positions, vocabulary tiles of 41 columns (the last one ragged), rows of different lengths batched together
(right padding; the passes pad on the right by construction) and alone.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

import tokentrain.signals.head as head
from tokentrain.data import split_preference_row, tokenize_row
from tokentrain.losses.aligndistil import TeacherSettings, teacher_log_probs
from tokentrain.losses.critical_dpo import contrastive_scores
from tokentrain.losses.unlearning import generic_labels
from tokentrain.signals.aligndistil_alpha import score_aligndistil_alpha
from tokentrain.signals.anchors import AnchorTerms
from tokentrain.signals.contrastive import score_contrastive
from tokentrain.signals.ref_logps import score_ref_logps
from tokentrain.signals.whp_labels import score_whp_labels
from tokentrain.tokens import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-6
EXTRA_IDS = 37  # logit width 337: odd, and tiles of 41 leave a ragged last tile
CHUNK_ROWS, TILE = 7, 41
DICT = AnchorTerms.from_pairs([("Aromi", "Bistro Nine"), ("riverside", "shore"), ("Zizzi", "Zed")])


def odd_llama(tokenizer, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer) + EXTRA_IDS,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=3,
        intermediate_size=40,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked distributions: the paths must agree where it matters
    return model


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    return odd_llama(tiny_tokenizer, 0), odd_llama(tiny_tokenizer, 1)


@pytest.fixture
def forced(monkeypatch):
    """callable(path, n_models) -> the path name, with chunks of 7 positions and (fused) tiles of 41 columns."""
    vocab = None

    def force(path: str, n_models: int, width: int) -> str:
        nonlocal vocab
        vocab = width
        if path == "direct":
            monkeypatch.setattr(head, "HEAD_BYTES_CPU", 4 * width * n_models * CHUNK_ROWS)
        else:
            monkeypatch.setattr(head, "FUSED_ROWS", CHUNK_ROWS)
            monkeypatch.setattr(head, "MIN_VOCAB_TILE", 1)
            monkeypatch.setattr(head, "HEAD_BYTES_CPU", 4 * CHUNK_ROWS * n_models * TILE)
        return path

    return force


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """The plain forward's float32 logits (T, V) of one unpadded sequence."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


# ------------------------------------------------------------------------------------------------ the head itself


def test_plan_head_picks_the_path_from_shapes_and_device():
    # CPU, one model, 4,600 positions (a batch of 8 rows of ~600 tokens)
    assert head.plan_head(4600, 8192, "cpu") == head.HeadPlan("direct", 512, 8192)
    assert head.plan_head(4600, 32768, "cpu") == head.HeadPlan("direct", 128, 32768)
    assert head.plan_head(4600, 131072, "cpu") == head.HeadPlan("fused", 1024, 4096)
    # two models share the budget: 32k still direct (64 rows), 128k fused with half-width tiles
    assert head.plan_head(4600, 32768, "cpu", n_models=2) == head.HeadPlan("direct", 64, 32768)
    assert head.plan_head(4600, 131072, "cpu", n_models=2) == head.HeadPlan("fused", 1024, 2048)
    # a batch of 10 positions fits whole at any V; CUDA's budget keeps 152k direct
    assert head.plan_head(10, 131072, "cpu") == head.HeadPlan("direct", 10, 131072)
    assert head.plan_head(4600, 151936, "cuda").path == "direct"
    # forcing
    assert head.plan_head(4600, 8192, "cpu", path="fused").path == "fused"
    assert head.plan_head(4600, 131072, "cpu", path="direct") == head.HeadPlan("direct", 32, 131072)
    with pytest.raises(ValueError, match=r"head path must be one of \['auto', 'direct', 'fused'\], got 'tiled'"):
        head.plan_head(10, 100, "cpu", path="tiled")


@pytest.mark.parametrize("path", ["direct", "fused"])
@pytest.mark.parametrize("transform", [(1.0, None), (0.7, 3.0)])
def test_target_logps_equal_a_float64_reference(tiny_tokenizer, path, transform, forced):
    model = odd_llama(tiny_tokenizer, 2)
    vocab = head.logit_width(model)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(53, 24, generator=g)  # (N, H) odd N: 7 chunks of 7 and one of 4
    targets = torch.randint(0, vocab, (53,), generator=g)
    plan = head.plan_head(53, vocab, "cpu", path=forced(path, 1, vocab))
    assert (plan.rows, plan.vocab_tile) == (CHUNK_ROWS, vocab if path == "direct" else TILE)
    out = head.target_logps(model, hidden, targets, plan, transform)
    scale, softcap = transform
    z = hidden.double() @ model.lm_head.weight.double().t() * scale  # (N, V)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    expected = torch.log_softmax(z, -1).gather(1, targets.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------ ref_logps


@pytest.mark.parametrize("path", ["direct", "fused"])
@pytest.mark.parametrize("drop_prompt", [False, True])
def test_ref_logps_equal_trls_fused_head_and_the_plain_forward(
    tiny_tokenizer, models, pc_rows, path, drop_prompt, forced
):
    reference = models[0]
    rows = Dataset.from_list(pc_rows)
    force = forced(path, 1, head.logit_width(reference))
    ids, batched = score_ref_logps(rows, reference, tiny_tokenizer, drop_prompt, batch_size=5, head_path=force)
    _, alone = score_ref_logps(rows, reference, tiny_tokenizer, drop_prompt, batch_size=1, head_path=force)
    # the previous pass: TRL's fused head, one row at a time
    trl_model = copy.deepcopy(reference)
    add_fused_lm_head(trl_model, cast_lm_head_to_fp32=True)
    bos = tiny_tokenizer.bos_token_id
    for i, row in enumerate(pc_rows):
        tokens = tokenize_row(row, tiny_tokenizer)
        if drop_prompt:
            tokens = {"input_ids": [bos, *ids[i]], "labels": [IGNORE_INDEX, *ids[i]]}
        with torch.no_grad():
            out = trl_model(
                input_ids=torch.tensor([tokens["input_ids"]]),
                labels=torch.tensor([tokens["labels"]]),
                fused_lm_head=True,
            )
        previous = out.log_probs[0][out.label_mask[0]]
        logits = full_logits(reference, tokens["input_ids"])[:-1]  # (T-1, V)
        labels = torch.tensor(tokens["labels"][1:])
        plain = torch.log_softmax(logits, -1).gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)[labels >= 0]
        for got in (batched[i], alone[i]):
            torch.testing.assert_close(torch.tensor(got), previous, atol=ATOL, rtol=0)
            torch.testing.assert_close(torch.tensor(got), plain, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------- contrastive


def preference_rows(pc_rows) -> list[dict]:
    rows = []
    for i, row in enumerate(pc_rows):
        other = pc_rows[(i + 3) % len(pc_rows)]["completion"]
        rows.append({"prompt": row["prompt"], "chosen": " " + row["completion"], "rejected": " " + other + " No."})
    return rows


@pytest.mark.parametrize("path", ["direct", "fused"])
def test_contrastive_paths_equal_the_plain_forwards(tiny_tokenizer, models, pc_rows, path, forced):
    pos, neg = models
    rows = preference_rows(pc_rows)
    force = forced(path, 2, head.logit_width(pos))
    kw = dict(ce_beta=0.7, score_chosen=True, max_length=None, max_prompt_length=None, head_path=force)
    batched = score_contrastive(Dataset.from_list(rows), pos, neg, tiny_tokenizer, batch_size=5, **kw)
    alone = score_contrastive(Dataset.from_list(rows), pos, neg, tiny_tokenizer, batch_size=1, **kw)
    assert batched == alone or all(
        torch.allclose(torch.tensor(a), torch.tensor(b), atol=ATOL, rtol=0)
        for side in ("rejected_weights", "chosen_weights")
        for a, b in zip(batched[side], alone[side])
    )
    for r, row in enumerate(rows):
        split = split_preference_row(row, tiny_tokenizer)
        n_prompt = len(split["prompt_ids"])
        for side in ("rejected", "chosen"):
            seq = split["prompt_ids"] + split[f"{side}_ids"]
            z_pos, z_neg = full_logits(pos, seq)[n_prompt - 1 : -1], full_logits(neg, seq)[n_prompt - 1 : -1]
            y = torch.tensor(split[f"{side}_ids"])
            s = contrastive_scores(z_pos, z_neg, y, torch.ones_like(y, dtype=torch.bool), 0.7)  # (K,)
            expected = 1.0 - s if side == "rejected" else s
            if split[f"{side}_ids"][-1] == tiny_tokenizer.eos_token_id:
                expected[-1] = 1.0  # the EOS TRL appends (spec rule)
            torch.testing.assert_close(torch.tensor(batched[f"{side}_weights"][r]), expected, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------- whp_labels


@pytest.mark.parametrize("path", ["direct", "fused"])
def test_whp_labels_paths_equal_the_plain_forwards(tiny_tokenizer, models, pc_rows, path, forced):
    baseline, reinforced = models
    rows = Dataset.from_list(pc_rows)
    force = forced(path, 2, head.logit_width(baseline))
    columns, _ = score_whp_labels(rows, baseline, reinforced, tiny_tokenizer, None, 2.0, batch_size=5, head_path=force)
    # without a dictionary: v_b and v_r on the same text, every completion position labelled
    for i, row in enumerate(pc_rows):
        tokens = tokenize_row(row, tiny_tokenizer)
        positions = [j for j, label in enumerate(tokens["labels"]) if label != IGNORE_INDEX]
        idx = torch.tensor(positions) - 1
        v_b, v_r = full_logits(baseline, tokens["input_ids"])[idx], full_logits(reinforced, tokens["input_ids"])[idx]
        assert columns["target_ids"][i] == generic_labels(v_b, v_r, 2.0).tolist(), f"row {i}"


def test_whp_labels_paths_agree_with_a_dictionary_and_repeat_penalty(tiny_tokenizer, models, pc_rows, forced):
    """Rule (b)'s penalty mask is cut per vocabulary tile on the fused path: labels and stats equal the direct path's
    and the unforced (auto) pass's exactly."""
    baseline, reinforced = models
    rows = Dataset.from_list(pc_rows)
    kw = dict(anchors=DICT, alpha=3.0, repeat_penalty=50.0, batch_size=4)
    auto = score_whp_labels(rows, baseline, reinforced, tiny_tokenizer, **kw)
    for path in ("direct", "fused"):
        force = forced(path, 2, head.logit_width(baseline))
        assert score_whp_labels(rows, baseline, reinforced, tiny_tokenizer, head_path=force, **kw) == auto, path
    assert auto[1]["weighted"] > 0 and auto[1]["changed"] > 0  # the comparison is not vacuous


# ---------------------------------------------------------------------------------------------- aligndistil_alpha


@pytest.mark.parametrize("path", ["direct", "fused"])
@pytest.mark.parametrize("distance", ["tvd", "l1"])
def test_aligndistil_alpha_paths_equal_the_plain_forwards(tiny_tokenizer, models, pc_rows, path, distance, forced):
    dpo, other = models
    rows = preference_rows(pc_rows)
    settings = TeacherSettings(r=5.0, distance=distance)
    force = forced(path, 2, head.logit_width(dpo))
    out = score_aligndistil_alpha(Dataset.from_list(rows), dpo, other, tiny_tokenizer, settings, 5, head_path=force)
    for r, row in enumerate(rows):
        split = split_preference_row(row, tiny_tokenizer)
        seq, n_prompt = split["prompt_ids"] + split["chosen_ids"], len(split["prompt_ids"])
        z_d, z_o = full_logits(dpo, seq)[n_prompt - 1 : -1], full_logits(other, seq)[n_prompt - 1 : -1]
        _, alpha, d = teacher_log_probs(z_d, z_o, settings)  # the previous pass's function
        assert out["completion_ids"][r] == split["chosen_ids"]
        torch.testing.assert_close(torch.tensor(out["aligndistil_distance"][r]), d, atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(out["aligndistil_alpha"][r]), alpha, atol=5 * ATOL, rtol=0)


@pytest.mark.parametrize("path", ["direct", "fused"])
def test_aligndistil_alpha_non_finite_logit_names_model_and_row(tiny_tokenizer, models, pc_rows, path, forced):
    dpo = models[0]
    other = copy.deepcopy(models[1])
    with torch.no_grad():
        other.lm_head.weight[300] = float("inf")  # an unused id: every position's logit row is non-finite
    rows = Dataset.from_list(preference_rows(pc_rows)[:3])
    force = forced(path, 2, head.logit_width(dpo))
    with pytest.raises(ValueError, match=r"non-finite logits from other_model: row \d+, position \d+"):
        score_aligndistil_alpha(rows, dpo, other, tiny_tokenizer, TeacherSettings(), 2, head_path=force)


# -------------------------------------------------------------------------------------------------------- the bench


def test_bench_scoring_quick_prints_every_figure():
    """`python -m bench.scoring --quick` runs every pass at three vocabularies and prints both ratios of each."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bench.scoring", "--quick", "--reps", "1"]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = dict(re.findall(r"^bench: (\S+) ([0-9.]+) ratio$", done.stdout, flags=re.M))
    expected = {
        f"scoring/{name}/v{k}k/{what}"
        for name in ("ref_logps", "contrastive", "whp_labels", "aligndistil_alpha")
        for k in (1, 2, 4)
        for what in ("throughput_ratio", "peak_mem_ratio")
    }
    assert set(figures) == expected
    assert all(float(v) > 0 for v in figures.values())
