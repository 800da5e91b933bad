"""Tests of signals/aligndistil_alpha.py (specs/aligndistil.md section 2, "Inspection-only scoring pass", and 9).

`completion_ids` equal TRL 1.16's DPO `chosen_ids`; entry t of `aligndistil_distance`/`aligndistil_alpha` equals a
naive full-logits computation at the position predicting completion_ids[t] and the α_t the trainer's loss uses on the
same row; results do not depend on batch size, chunk size or row order; bad inputs raise naming the row or model.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

import tokentrain.trainers.aligndistil as trainer_module
from tokentrain.data import SignalAlignmentError
from tokentrain.losses.aligndistil import TeacherSettings
from tokentrain.models import tiny_llama, train_tokenizer
from tokentrain.signals.aligndistil_alpha import score_aligndistil_alpha
from tokentrain.trainers.aligndistil import AlignDistilConfig, AlignDistilTrainer

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"prompt": "Q: 12+7=", "chosen": " 19", "rejected": " 18 or so"},
    {"prompt": "Q: 3+4=", "chosen": " 7 because 3 and 4 make 7", "rejected": " 8"},
    {"prompt": "Q: 40+2 is what?=", "chosen": " 42", "rejected": " 41 since 40 and 1"},
    {"prompt": "Q: 5+5=", "chosen": " 10 so", "rejected": " 11 so"},
    {"prompt": "Q: 100+23=", "chosen": " 123 exactly", "rejected": " 132"},
]
CHAT_ROWS = [
    {
        "prompt": [{"role": "user", "content": "Q: 12+7="}],
        "chosen": [{"role": "assistant", "content": "19"}],
        "rejected": [{"role": "assistant", "content": "18 or so"}],
    },
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 3+4="}],
        "chosen": [{"role": "assistant", "content": "7 because 3 and 4 make 7"}],
        "rejected": [{"role": "assistant", "content": "8"}],
    },
]
SETTINGS = TeacherSettings(r=5.0)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS] * 4 + ["user assistant system Be brief."]
    tok = train_tokenizer(texts, vocab_size=300)

    def make(seed):
        return tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=seed)

    return SimpleNamespace(tok=tok, dpo=make(1), other=make(2), student=make(0), out=str(tmp_path_factory.mktemp("s")))


def score(env, rows, dpo=None, other=None, **kw):
    return score_aligndistil_alpha(
        Dataset.from_list(rows), dpo if dpo is not None else env.dpo, other or env.other, env.tok, SETTINGS, **kw
    )


def naive(env, prompt_ids, completion_ids, settings=SETTINGS):
    """D_t and α_t from the models' full logits (plain forward), at the positions predicting each completion id."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        z_d, z_o = (m(input_ids=ids).logits[0].double() for m in (env.dpo, env.other))
    rows = slice(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)
    p_d, p_o = torch.softmax(z_d[rows], -1), torch.softmax(z_o[rows], -1)
    d = 0.5 * (p_d - p_o).abs().sum(-1)
    return d, settings.r * d + settings.eps


@pytest.mark.parametrize("rows", [ROWS, CHAT_ROWS], ids=["standard", "conversational"])
def test_columns_equal_trl_split_and_naive_full_logits(env, rows):
    split = DPOTrainer(
        copy.deepcopy(env.student),
        ref_model=copy.deepcopy(env.dpo),
        args=DPOConfig(output_dir=env.out, bf16=False, report_to="none", max_length=None),
        train_dataset=Dataset.from_list(rows),
        processing_class=env.tok,
    ).train_dataset
    columns = score(env, rows, batch_size=2, chunk_tokens=3)
    assert columns["completion_ids"] == split["chosen_ids"]
    for i in range(len(rows)):
        d, a = naive(env, split[i]["prompt_ids"], split[i]["chosen_ids"])
        assert len(columns["aligndistil_distance"][i]) == len(columns["aligndistil_alpha"][i]) == len(d)
        assert torch.allclose(torch.tensor(columns["aligndistil_distance"][i], dtype=torch.float64), d, atol=ATOL)
        assert torch.allclose(torch.tensor(columns["aligndistil_alpha"][i], dtype=torch.float64), a, atol=ATOL)
        assert all(SETTINGS.eps <= x <= SETTINGS.r + SETTINGS.eps for x in columns["aligndistil_alpha"][i])


def test_independent_of_batch_chunk_and_order(env):
    reference = score(env, ROWS, batch_size=1, chunk_tokens=1)
    other = score(env, ROWS, batch_size=4, chunk_tokens=256)
    reversed_rows = score(env, ROWS[::-1], batch_size=3, chunk_tokens=5)
    for key in ("aligndistil_distance", "aligndistil_alpha"):
        for a, b, c in zip(reference[key], other[key], reversed_rows[key][::-1]):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6)
            assert torch.allclose(torch.tensor(a), torch.tensor(c), atol=1e-6)
    assert reference["completion_ids"] == reversed_rows["completion_ids"][::-1]


def test_alpha_equals_the_trainers_alpha(env, monkeypatch):
    """The scoring pass is the loss's own teacher: the α_t the trainer uses on a row are the stored ones."""
    captured = []
    original = trainer_module.aligndistil_loss

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        captured.append(out.alpha.clone())
        return out

    monkeypatch.setattr(trainer_module, "aligndistil_loss", spy)
    args = AlignDistilConfig(output_dir=env.out, bf16=False, report_to="none", max_length=None, r=SETTINGS.r)
    trainer = AlignDistilTrainer(
        copy.deepcopy(env.student), args, train_dataset=Dataset.from_list(ROWS), processing_class=env.tok,
        dpo_model=env.dpo, other_model=env.other,
    )  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    trainer.compute_loss(trainer.model, batch)
    columns = score(env, ROWS)
    stored = torch.tensor([a for row in columns["aligndistil_alpha"] for a in row])
    assert torch.allclose(captured[0], stored, atol=1e-6)


def test_stored_completion_ids_mismatch_names_row_and_position(env):
    columns = score(env, ROWS)
    stored = [list(ids) for ids in columns["completion_ids"]]
    stored[3][1] = (stored[3][1] + 1) % len(env.tok)
    data = [{**row, "completion_ids": ids} for row, ids in zip(ROWS, stored)]
    with pytest.raises(SignalAlignmentError, match="row 3: stored 'completion_ids' differ .* at position 1"):
        score(env, data)
    assert score(env, [{**row, "completion_ids": ids} for row, ids in zip(ROWS, columns["completion_ids"])])


def test_empty_prompt_is_an_error_naming_the_row(env):
    with pytest.raises(ValueError, match="row 1: the prompt has no tokens"):
        score(env, [ROWS[0], {"prompt": "", "chosen": "x", "rejected": "y"}])


def test_rows_without_rejected_are_scored(env):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in ROWS]
    columns = score(env, rows)
    assert all(ids[-1] == env.tok.eos_token_id for ids in columns["completion_ids"])


def test_bad_models(env):
    with pytest.warns(UserWarning, match="same weights: the contrast is zero"):
        columns = score(env, ROWS[:2], other=copy.deepcopy(env.dpo))
    assert all(a == pytest.approx(SETTINGS.eps) for row in columns["aligndistil_alpha"] for a in row)
    capped = copy.deepcopy(env.dpo)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="dpo_model .* declares a logit transform"):
        score(env, ROWS, dpo=capped)
    wide = copy.deepcopy(env.other)
    wide.resize_token_embeddings(310)
    with pytest.raises(
        ValueError,
        match=r"LM-head rows differ: dpo_model \(in-memory model\) has 300 and other_model \(in-memory model\) has 310",
    ):
        score(env, ROWS, other=wide)
    with pytest.raises(KeyError, match=r"lacks column\(s\) \['chosen'\]"):
        score(env, [{"prompt": r["prompt"]} for r in ROWS])


def test_non_finite_logits_name_row_and_position(env):
    def hook(_module, _args, output):
        if output.last_hidden_state.shape[1] > 10:
            output.last_hidden_state[0, 8] = float("inf")
        return output

    handle = env.other.base_model.register_forward_hook(hook)
    try:
        with pytest.raises(ValueError, match=r"non-finite logits from other_model: row 1, position 8"):
            score(env, ROWS, batch_size=1)  # row 1 is the longest, scored first
    finally:
        handle.remove()
