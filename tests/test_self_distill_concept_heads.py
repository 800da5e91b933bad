"""Tests for tokentrain/signals/self_distill.py: the phase-1 data of concept_heads (spec `specs/concept_heads.md`
sections 2 and 4, and the generated-row errors of section 9)."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset

from tokentrain.data import prompt_ids
from tokentrain.signals.self_distill import (
    COLUMNS,
    check_generated_row,
    prepare_generated_dataset,
    sample_completions,
)

X = -100


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts(pc_rows):
    return Dataset.from_list([{"prompt": r["prompt"]} for r in pc_rows])


@pytest.fixture(scope="module")
def sampled(prompts, tiny_model_factory, tiny_tokenizer):
    return sample_completions(prompts, tiny_model_factory(0), tiny_tokenizer, max_new_tokens=8, batch_size=5, seed=3)


def test_columns_and_alignment(sampled, prompts, tiny_tokenizer):
    assert sampled.column_names == list(COLUMNS)
    assert str(sampled.features["prompt_ids"].feature.dtype) == "int32"
    assert str(sampled.features["completion_ids"].feature.dtype) == "int32"
    eos = tiny_tokenizer.eos_token_id
    for i, row in enumerate(sampled):
        assert row["prompt"] == prompts[i]["prompt"]  # input order
        assert row["prompt_ids"] == prompt_ids(prompts[i], tiny_tokenizer)  # what the trainer will tokenise
        ids = row["completion_ids"]
        assert row["completion"] == tiny_tokenizer.decode(ids, skip_special_tokens=True)
        if row["finish_reason"] == "eos":
            assert ids[-1] == eos and eos not in ids[:-1]
        else:
            assert row["finish_reason"] == "length" and len(ids) == 8 and eos not in ids
        assert check_generated_row(row, i, tiny_tokenizer, len(tiny_tokenizer)) == bool(row["completion"])


def test_sampling_settings_are_explicit_and_batches_sorted(prompts, tiny_model_factory, tiny_tokenizer):
    """temperature 1.0, top_p 1.0, top_k 0 set explicitly; the model's own generation defaults (here a repetition
    penalty and min_p) do not apply; prompts batched longest first; the model's config restored afterwards."""
    model = tiny_model_factory(0)
    model.generation_config.repetition_penalty = 1.7
    model.generation_config.min_p = 0.2
    own = model.generation_config
    calls = []
    original = model.generate

    def spy(**kwargs):
        gc = kwargs["generation_config"]
        calls.append((kwargs["input_ids"].shape[1], gc, model.generation_config))
        return original(**kwargs)

    model.generate = spy
    sample_completions(prompts, model, tiny_tokenizer, max_new_tokens=3, batch_size=4)
    widths = [w for w, _, _ in calls]
    assert len(calls) == 3 and widths == sorted(widths, reverse=True)
    for _, gc, active in calls:
        assert (gc.do_sample, gc.temperature, gc.top_p, gc.top_k) == (True, 1.0, 1.0, 0)
        assert active is gc and active.repetition_penalty in (None, 1.0) and active.min_p is None
    assert model.generation_config is own


def test_samples_from_the_whole_distribution(tiny_model_factory, tiny_tokenizer):
    """600 one-token samples of one prompt from a near-uniform random model: far more than 50 distinct tokens, so no
    top-k (transformers' default top_k is 50); and the same seed gives the same samples."""
    data = Dataset.from_list([{"prompt": "<s>name[Zizzi]<sep>"}] * 600)
    model = tiny_model_factory(0)
    a = sample_completions(data, model, tiny_tokenizer, max_new_tokens=1, batch_size=300, seed=1, progress=False)
    first = [ids[0] for ids in a["completion_ids"]]
    assert len(set(first)) > 100
    b = sample_completions(data.select(range(20)), model, tiny_tokenizer, max_new_tokens=1, batch_size=300, seed=1)
    c = sample_completions(data.select(range(20)), model, tiny_tokenizer, max_new_tokens=1, batch_size=300, seed=2)
    assert b["completion_ids"] == a["completion_ids"][:20] and b["completion_ids"] != c["completion_ids"]


def test_chat_prompts_use_the_template_with_the_generation_prompt(tiny_model_factory, tiny_tokenizer):
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "name[Aromi]"}]}])
    out = sample_completions(data, tiny_model_factory(0), tiny_tokenizer, max_new_tokens=4)
    expected = tiny_tokenizer.apply_chat_template(data[0]["prompt"], add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert out[0]["prompt_ids"] == list(expected)
    assert out[0]["prompt"] == data[0]["prompt"]


def test_bad_sampling_arguments(prompts, tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory(0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample_completions(prompts, model, tiny_tokenizer, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_k >= 0"):
        sample_completions(prompts, model, tiny_tokenizer, max_new_tokens=2, top_k=-1)
    with pytest.raises(KeyError, match=r"lacks column\(s\) \['prompt'\]"):
        sample_completions(Dataset.from_list([{"question": "x"}]), model, tiny_tokenizer, max_new_tokens=2)


# --------------------------------------------------------------------------------------- the trainer's checks


def test_training_rows_are_the_stored_ids(sampled, tiny_tokenizer):
    prepared = prepare_generated_dataset(sampled, tiny_tokenizer, len(tiny_tokenizer))
    kept = [r for r in sampled if r["completion"]]
    assert len(prepared) == len(kept)
    for row, out in zip(kept, prepared):
        assert out["input_ids"] == row["prompt_ids"] + row["completion_ids"]
        assert out["labels"] == [X] * len(row["prompt_ids"]) + row["completion_ids"]  # the sampled EOS included


def test_sampled_ids_need_not_be_the_canonical_tokenisation(tiny_tokenizer):
    """The stored ids are trained on as sampled: a word spelt one character per token is kept as such."""
    word = "riverside"
    ids = [tiny_tokenizer.convert_tokens_to_ids(c) for c in word] + [tiny_tokenizer.eos_token_id]
    assert len(tiny_tokenizer(word)["input_ids"]) < len(word)  # the tokenizer would merge it
    prompt = "<s>name[Aromi]<sep>"
    row = {
        "prompt": prompt,
        "completion": word,
        "prompt_ids": tiny_tokenizer(prompt)["input_ids"],
        "completion_ids": ids,
        "finish_reason": "eos",
    }
    out = prepare_generated_dataset(Dataset.from_list([row]), tiny_tokenizer, len(tiny_tokenizer))
    assert out[0]["input_ids"][-len(ids) :] == ids and out[0]["labels"][-len(ids) :] == ids


def _row(tokenizer, **change):
    prompt = "<s>name[Aromi]<sep>"
    completion_ids = tokenizer("Aromi serves food.")["input_ids"] + [tokenizer.eos_token_id]
    row = {
        "prompt": prompt,
        "completion": "Aromi serves food.",
        "prompt_ids": tokenizer(prompt)["input_ids"],
        "completion_ids": completion_ids,
        "finish_reason": "eos",
    }
    row.update(change)
    return row


def test_prompt_ids_from_another_tokenisation_name_row_and_position(tiny_tokenizer):
    row = _row(tiny_tokenizer)
    row["prompt_ids"] = row["prompt_ids"][:4] + [7] + row["prompt_ids"][5:]
    with pytest.raises(ValueError, match="row 3: stored 'prompt_ids' differ .* at position 4 .*re-run the generate"):
        check_generated_row(row, 3, tiny_tokenizer, len(tiny_tokenizer))


def test_ids_outside_the_vocabulary_are_refused(tiny_tokenizer):
    row = _row(tiny_tokenizer)
    row["completion_ids"] = row["completion_ids"][:2] + [len(tiny_tokenizer) + 5] + row["completion_ids"][2:]
    with pytest.raises(ValueError, match=rf"row 1: completion_ids\[2\] = {len(tiny_tokenizer) + 5} is not a token id"):
        check_generated_row(row, 1, tiny_tokenizer, len(tiny_tokenizer))


def test_decode_mismatch_is_refused(tiny_tokenizer):
    row = _row(tiny_tokenizer, completion="Aromi serves beer.")
    with pytest.raises(ValueError, match="row 0: decoding 'completion_ids' gives .*first difference at character 13"):
        check_generated_row(row, 0, tiny_tokenizer, len(tiny_tokenizer))


def test_unknown_finish_reason_is_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"finish_reason 'stop' is not one of \['eos', 'length'\]"):
        check_generated_row(_row(tiny_tokenizer, finish_reason="stop"), 0, tiny_tokenizer, len(tiny_tokenizer))


def test_empty_completions_are_counted_and_not_trained_on(tiny_tokenizer, caplog):
    eos = tiny_tokenizer.eos_token_id
    rows = [_row(tiny_tokenizer), _row(tiny_tokenizer, completion="", completion_ids=[eos]), _row(tiny_tokenizer)]
    with caplog.at_level(logging.WARNING, logger="tokentrain.signals.self_distill"):
        out = prepare_generated_dataset(Dataset.from_list(rows), tiny_tokenizer, len(tiny_tokenizer))
    assert len(out) == 2 and "1 of 3 generated rows have an empty completion" in caplog.text and "[1]" in caplog.text


def test_truncation_and_packing(tiny_tokenizer, caplog):
    rows = [_row(tiny_tokenizer) for _ in range(3)]
    n_prompt = len(rows[0]["prompt_ids"])
    out = prepare_generated_dataset(
        Dataset.from_list(rows), tiny_tokenizer, len(tiny_tokenizer), max_length=n_prompt + 2
    )
    assert [len(r["input_ids"]) for r in out] == [n_prompt + 2] * 3 and out[0]["labels"][-2:] == rows[0][
        "completion_ids"
    ][:2]
    with caplog.at_level(logging.WARNING, logger="tokentrain.signals.self_distill"):
        cut = prepare_generated_dataset(
            Dataset.from_list(rows), tiny_tokenizer, len(tiny_tokenizer), max_length=n_prompt
        )
    assert len(cut) == 0 and "no completion token left after truncation" in caplog.text
    packed = prepare_generated_dataset(
        Dataset.from_list(rows), tiny_tokenizer, len(tiny_tokenizer), max_length=4096, packing=True
    )
    assert len(packed) == 1 and len(packed[0]["seq_lengths"]) == 3
