"""Tests of signals/ref_logps.py (specs/weighted_ntp.md section 2, P7, section 9): the scoring pass through TRL's fused
head equals a naive full-logits log_softmax, whatever the batch size and row order; the drop_prompt view; bad rows."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from tokentrain.data import completion_ids_of, tokenize_row
from tokentrain.signals.ref_logps import reference_view, score_ref_logps
from tokentrain.tokens import IGNORE_INDEX, naive_token_logps

ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def sharp_model(factory, seed=0):
    """The tiny model with embeddings (tied: also the LM head) scaled up, so that log-probs spread over several nats
    instead of sitting near -log V: a misplaced or shifted value then differs by far more than the tolerance."""
    model = factory(seed).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20.0)
    return model


@torch.no_grad()
def naive_ref_logps(model, input_ids, labels):
    """log_softmax over the full [1, T, V] logits of the model's plain forward, at the target positions."""
    ids, lab = torch.tensor([input_ids]), torch.tensor([labels])
    logits = model(input_ids=ids).logits  # (1, T, V)
    logps = naive_token_logps(logits, lab)[0]  # (T-1,)
    return logps[lab[0, 1:] != IGNORE_INDEX].tolist()


def view_of(row, tok, drop_prompt):
    """The reference's view, built here independently: the row's tokens, or [BOS] + its completion ids."""
    out = tokenize_row(row, tok)
    if not drop_prompt:
        return out["input_ids"], out["labels"]
    completion = completion_ids_of(out["input_ids"], out["labels"])
    return [tok.bos_token_id, *completion], [IGNORE_INDEX, *completion]


def close(a, b, atol=ATOL):
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------------------ P7


@pytest.mark.parametrize("drop_prompt", [False, True])
def test_p7_equals_naive_log_softmax(drop_prompt, pc_rows, tiny_tokenizer, tiny_model_factory):
    model = sharp_model(tiny_model_factory)
    naive = [naive_ref_logps(model, *view_of(r, tiny_tokenizer, drop_prompt)) for r in pc_rows]
    ids, logps = score_ref_logps(Dataset.from_list(pc_rows), model, tiny_tokenizer, drop_prompt, batch_size=4)
    assert len(ids) == len(logps) == len(pc_rows)
    spread = []
    for i, row in enumerate(pc_rows):
        out = tokenize_row(row, tiny_tokenizer)
        assert ids[i] == completion_ids_of(out["input_ids"], out["labels"])  # the policy's ids, either view
        assert len(logps[i]) == len(ids[i])
        close(logps[i], naive[i])
        assert max(logps[i]) <= 0.0
        spread += logps[i]
    assert max(spread) - min(spread) > 1.0  # the comparison is not between near-constant values


def test_p7_independent_of_batch_size_and_row_order(pc_rows, tiny_tokenizer, tiny_model_factory):
    model = sharp_model(tiny_model_factory)
    _, base = score_ref_logps(pc_rows, model, tiny_tokenizer, batch_size=1)
    for bs in (3, 16):
        _, logps = score_ref_logps(pc_rows, model, tiny_tokenizer, batch_size=bs)
        for a, b in zip(logps, base):
            close(a, b)
    # Rows come back in input order whatever order they go in: a permutation of the rows permutes the results.
    perm = [5, 11, 0, 7, 2, 9, 1, 10, 3, 8, 4, 6]
    ids, logps = score_ref_logps([pc_rows[p] for p in perm], model, tiny_tokenizer, batch_size=3)
    for i, p in enumerate(perm):
        assert ids[i] == completion_ids_of(**_io(pc_rows[p], tiny_tokenizer))
        close(logps[i], base[p])


def _io(row, tok):
    out = tokenize_row(row, tok)
    return {"input_ids": out["input_ids"], "labels": out["labels"]}


def test_drop_prompt_equal_completions_under_different_prompts(tiny_tokenizer, tiny_model_factory):
    model = sharp_model(tiny_model_factory)
    completion = "Aromi serves Italian food in the riverside."
    rows = [
        {"prompt": "<s>name[Aromi], food[Italian], area[riverside]<sep>", "completion": completion},
        {"prompt": "<s>name[Zizzi]<sep>", "completion": completion},
        {"prompt": "<s>food[French], area[city centre], name[The Mill]<sep>", "completion": completion},
    ]
    ids, dropped = score_ref_logps(rows, model, tiny_tokenizer, drop_prompt=True, batch_size=2)
    assert ids[0] == ids[1] == ids[2]
    for other in dropped[1:]:
        close(other, dropped[0], atol=1e-6)
    # With the prompt in view, the same completion scores differently (so the check above can fail).
    _, kept = score_ref_logps(rows, model, tiny_tokenizer, drop_prompt=False, batch_size=2)
    assert max(abs(a - b) for a, b in zip(kept[0], kept[1])) > 1e-2


def test_drop_prompt_view_is_bos_plus_completion_ids(pc_rows, tiny_tokenizer):
    row = pc_rows[-1]  # "<s>name[Aromi]<sep>" -> "Aromi." + "</s>"
    completion = tiny_tokenizer("Aromi.</s>")["input_ids"]
    view = reference_view(row, tiny_tokenizer, drop_prompt=True, row=0)
    assert view["input_ids"] == [tiny_tokenizer.bos_token_id, *completion]
    assert view["labels"] == [IGNORE_INDEX, *completion]
    assert view["completion_ids"] == completion
    # Without drop_prompt the view is the policy's own tokenisation.
    full = reference_view(row, tiny_tokenizer, drop_prompt=False, row=0)
    assert full["input_ids"] == tokenize_row(row, tiny_tokenizer)["input_ids"]
    assert full["completion_ids"] == completion


def test_drop_prompt_without_bos_starts_from_eos(pc_rows, tiny_tokenizer):
    # Qwen2.5 has no BOS: s = EOS.
    backend = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())  # a copy: the fixture is shared
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    assert tok.bos_token_id is None
    view = reference_view(pc_rows[-1], tok, drop_prompt=True, row=0)
    assert view["input_ids"][0] == tok.eos_token_id and view["input_ids"][1:] == view["completion_ids"]


# ----------------------------------------------------------------------------------------------------- bad rows (§9)


@pytest.mark.parametrize(
    "bad",
    [
        {"text": "<s>Aromi serves food.</s>"},
        {"messages": [{"role": "user", "content": "Aromi?"}, {"role": "assistant", "content": "Aromi."}]},
        {
            "prompt": [{"role": "user", "content": "Aromi?"}],
            "completion": [{"role": "assistant", "content": "Yes."}, {"role": "user", "content": "And?"}],
        },
    ],
    ids=["text", "messages", "multi_turn_completion"],
)
def test_drop_prompt_refuses_rows_without_a_single_completion(bad, pc_rows, tiny_tokenizer, tiny_model_factory):
    rows = [pc_rows[0], pc_rows[1], bad]
    with pytest.raises(ValueError, match=r"^row 2: drop_prompt needs single-completion prompt/completion rows"):
        score_ref_logps(rows, tiny_model_factory(0), tiny_tokenizer, drop_prompt=True)
    if "text" in bad:  # without drop_prompt, a text row is scored on all its tokens but the first
        ids, logps = score_ref_logps([bad], tiny_model_factory(0), tiny_tokenizer)
        assert ids[0] == tokenize_row(bad, tiny_tokenizer)["input_ids"][1:] and len(logps[0]) == len(ids[0])


@pytest.mark.parametrize("drop_prompt", [False, True])
def test_row_longer_than_max_positions_names_the_row(drop_prompt, pc_rows, tiny_tokenizer, tiny_model_factory):
    rows = list(pc_rows[:5])
    rows[3] = {"prompt": rows[3]["prompt"], "completion": " ".join([rows[3]["completion"]] * 3)}  # the longest row
    n = len(view_of(rows[3], tiny_tokenizer, drop_prompt)[0])
    assert all(len(view_of(r, tiny_tokenizer, drop_prompt)[0]) < n for i, r in enumerate(rows) if i != 3)
    model = tiny_model_factory(0)
    model.config.max_position_embeddings = n  # exactly fits: scored
    _, logps = score_ref_logps(rows, model, tiny_tokenizer, drop_prompt=drop_prompt)
    assert len(logps) == 5
    model.config.max_position_embeddings = n - 1  # one token too many: refused, never truncated
    with pytest.raises(ValueError, match=rf"^row 3 has {n} tokens but the reference reads at most {n - 1}"):
        score_ref_logps(rows, model, tiny_tokenizer, drop_prompt=drop_prompt)
