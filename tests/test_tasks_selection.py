"""Tests of tasks/selection.py (specs/critical_dpo.md section 4 "Select" and the second pair source; vector D).

Vector D's four answer lists exactly; the walk's code semantics where the paper's wording differs; the row builders;
and the real `example_model_solutions` file (skipped with a reason when ../shared/data is absent, as in a fresh clone).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from tokentrain.tasks.selection import (
    GSM8K_SOLUTION_KEYS,
    build_sets,
    is_heldout,
    samples_from_gsm8k_solutions,
    select,
)

GOLD = "42"


def verdicts(answers, gold=GOLD):
    return [a != "" and a == gold for a in answers]


# ------------------------------------------------------------------------------------------------------ vector D


@pytest.mark.parametrize(
    "answers, expected",
    [
        # W = 10, need 5: group 17 (size 3) taken -> need 2; group 23 (size 2) taken -> need 0; singletons left out.
        (
            ["42", "17", "42", "23", "17", "9", "42", "17", "23", "5", "42", "11", "3", "8"],
            {"pos": 0, "neg": [1, 3], "pair": (0, 1)},
        ),
        # All wrong, W = 10, need 5: group 17 (size 3) taken -> need 2; every other group is a singleton: skipped
        # (the code's size >= 2 rule; the paper's "covering 50%" would add "5" and "9").
        (["17", "5", "17", "9", "17", "11", "3", "8", "4", "6"], {"pos": None, "neg": [0], "pair": None}),
        # Ties by first appearance: 7 (0, 3) before 9 (1, 2); W = 5, need 3 -> both taken; the pair's rejected is 7's.
        (["7", "9", "9", "7", "1", "42"], {"pos": 5, "neg": [0, 1], "pair": (5, 0)}),
        # "" (no answer) is ignored: it is neither a group nor a wrong sample.
        (["42", "", "42", "42"], {"pos": 0, "neg": [], "pair": None}),
    ],
)
def test_vector_d(answers, expected):
    assert select(answers, verdicts(answers)) == expected


def test_skipped_singletons_do_not_lower_need():
    # Wrong groups 17 (size 3), 5, 9, 11 (singletons), 23 (size 2): W = 8, need 4. Take 17 -> need 1; the singletons
    # are skipped and, as in the code (`need_add_false -= count` inside the `if`), do not count; take 23 -> need -1.
    answers = ["17", "5", "17", "9", "17", "11", "23", "23"]
    assert select(answers, verdicts(answers)) == {"pos": None, "neg": [0, 6], "pair": None}


def test_first_wrong_group_is_taken_even_as_a_singleton_and_correct_groups_are_not_walked():
    answers = ["42", "42", "3", "8"]  # W = 2, need 1: "3" taken although a singleton, then need 0
    assert select(answers, verdicts(answers)) == {"pos": 0, "neg": [2], "pair": (0, 2)}
    # A correct group ordered before the wrong ones changes nothing in the walk.
    answers = ["8", "42", "42", "42", "8", "1"]
    assert select(answers, verdicts(answers)) == {"pos": 1, "neg": [0], "pair": (1, 0)}


def test_select_length_mismatch():
    with pytest.raises(ValueError, match="2 answers but 3 verdicts"):
        select(["1", "2"], [True, False, False])


def test_build_sets_rows():
    samples = [
        {
            "question_id": "q0",
            "question": "What?",
            "gold": GOLD,
            "prompt": "Question: What?\nAnswer:",
            "completions": ["c0 A: 42", "c1 A: 7", "c2 A: 7", "c3 A: 9"],
            "answers": ["42", "7", "7", "9"],
            "correct": [True, False, False, False],
        },
        {
            "question_id": "q1",
            "question": "Who?",
            "gold": GOLD,
            "prompt": "Question: Who?\nAnswer:",
            "completions": ["d0", "d1"],
            "answers": ["5", ""],
            "correct": [False, False],
        },
    ]
    sets = build_sets(samples)
    assert sets["pos_sft"] == [{"question_id": "q0", "prompt": "Question: What?\nAnswer:", "completion": " c0 A: 42"}]
    assert sets["neg_sft"] == [
        {"question_id": "q0", "prompt": "Question: What?\nAnswer:", "completion": " c1 A: 7"},  # W = 3, need 2: 7 only
        {"question_id": "q1", "prompt": "Question: Who?\nAnswer:", "completion": " d0"},
    ]
    assert sets["pairs"] == [
        {
            "question_id": "q0",
            "prompt": "Question: What?\nAnswer:",
            "chosen": " c0 A: 42",
            "rejected": " c1 A: 7",
            "gold": GOLD,
        }
    ]
    samples[1]["correct"] = [False]
    with pytest.raises(ValueError, match=r"question_id 'q1': 2 completions, 2 answers and 1 verdicts"):
        build_sets(samples)


def test_heldout_rule():
    assert [i for i in range(12) if is_heldout(i)] == [3, 7, 11]


# ------------------------------------------------------------------------------------- example_model_solutions


def _solutions_path() -> Path:
    for var in ("TOKENTRAIN_SHARED_DATA", "TOKENTRAIN_DATA"):
        if os.environ.get(var):
            return Path(os.environ[var]) / "gsm8k" / "example_model_solutions.jsonl.gz"
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl.gz"


@pytest.fixture(scope="module")
def solutions_path():
    path = _solutions_path()
    if not path.exists():
        pytest.skip(f"{path} not found: the shared data folder is absent (set TOKENTRAIN_DATA to its path)")
    return path


def test_gsm8k_solutions_samples_and_grading(solutions_path):
    samples = samples_from_gsm8k_solutions(solutions_path, split="all")
    with gzip.open(solutions_path, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    assert len(samples) == len(raw) == 1319
    flags = [[row[k]["is_correct"] for k in GSM8K_SOLUTION_KEYS] for row in raw]
    agree = sum(c == f for s, fl in zip(samples, flags) for c, f in zip(s["correct"], fl))
    assert agree == 4 * 1319 == 5276  # the grader agrees with OpenAI's is_correct on every solution
    first = samples[0]
    assert first["question_id"] == 0 and first["gold"] == "18"
    assert first["prompt"] == f"Question: {raw[0]['question']}\nAnswer:"
    assert first["completions"] == [raw[0][k]["solution"] for k in GSM8K_SOLUTION_KEYS]
    assert first["answers"] == ["26", "224", first["answers"][2], "18"] and first["correct"] == [False] * 3 + [True]


def test_gsm8k_solutions_selection_counts(solutions_path):
    samples = samples_from_gsm8k_solutions(solutions_path, split="all")
    sets = build_sets(samples)
    assert {k: len(v) for k, v in sets.items()} == {"pos_sft": 887, "neg_sft": 1163, "pairs": 731}
    # Row 0: pair (175b_verification, 6b_finetuning).
    pair = select(samples[0]["answers"], samples[0]["correct"])["pair"]
    assert tuple(GSM8K_SOLUTION_KEYS[i] for i in pair) == ("175b_verification", "6b_finetuning")
    row0 = sets["pairs"][0]
    assert row0["question_id"] == 0 and row0["gold"] == "18"
    assert row0["chosen"] == " " + samples[0]["completions"][3]
    assert row0["rejected"] == " " + samples[0]["completions"][0]
    assert all(p["chosen"].startswith(" ") and not p["prompt"].endswith(" ") for p in sets["pairs"])


def test_gsm8k_solutions_train_split(solutions_path):
    train = samples_from_gsm8k_solutions(solutions_path)  # default: train
    heldout = samples_from_gsm8k_solutions(solutions_path, split="heldout")
    assert (len(train), len(heldout)) == (990, 329)
    assert all(not is_heldout(s["question_id"]) for s in train) and all(is_heldout(s["question_id"]) for s in heldout)
    sets = build_sets(train)
    assert {k: len(v) for k, v in sets.items()} == {"pos_sft": 666, "neg_sft": 869, "pairs": 545}


def test_gsm8k_solutions_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        samples_from_gsm8k_solutions(tmp_path / "x.jsonl", split="test")
    with pytest.raises(FileNotFoundError, match="not found"):
        samples_from_gsm8k_solutions(tmp_path / "missing.jsonl.gz")
    row = {"question": "Q?", "ground_truth": "A: 3", **{k: {"solution": "A: 3"} for k in GSM8K_SOLUTION_KEYS}}
    broken = {**row, "175b_finetuning": {"is_correct": True}}
    del broken["6b_verification"]
    path = tmp_path / "solutions.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(KeyError, match=r"row 1 lacks field\(s\) \['6b_verification', '175b_finetuning.solution'\]"):
        samples_from_gsm8k_solutions(path)
    path.write_text(json.dumps({**row, "ground_truth": "no number"}) + "\n")
    with pytest.raises(ValueError, match="row 0 \\(question_id 0\\): GSM8K gold answer is not .#### N."):
        samples_from_gsm8k_solutions(path)
