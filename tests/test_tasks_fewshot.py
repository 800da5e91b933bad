"""Tests of the few-shot prompt blocks (tasks/fewshot.py): exemplar counts and layout, the graders reading each
exemplar's answer, fewshot_prompt and cut_at_stop."""

from __future__ import annotations

import pytest

from tokentrain.tasks import fewshot, gsm8k
from tokentrain.tasks import math as math_task
from tokentrain.tasks.fewshot import FEWSHOT, STOP_STRINGS, cut_at_stop, fewshot_prompt

GSM8K_ANSWERS = ["6", "5", "39", "8", "9", "29", "33", "8"]
MATH_ANSWERS = ["[2,5)", "24", "16", r"-\frac{2}{3}"]


def test_api_constants():
    assert set(FEWSHOT) == {"gsm8k", "math"}
    assert STOP_STRINGS == ("\n\nQuestion:", "\n\nProblem:")
    for block in FEWSHOT.values():
        assert block == block.strip()  # no leading or trailing separator


def test_gsm8k_block_has_the_8_exemplars_in_the_zero_shot_layout():
    block = FEWSHOT["gsm8k"]
    assert block.count("Question: ") == 8 and block.count("\nAnswer: ") == 8
    assert block.startswith("Question: There are 15 trees in the grove.")
    for opening in (
        "If there are 3 cars in the parking lot",
        "Leah had 32 chocolates",
        "Jason had 20 lollipops",
        "Shawn has five toys",
        "There were nine computers",
        "Michael had 58 golf balls",
        "Olivia has $23",
    ):
        assert f"\n\nQuestion: {opening}" in block
    assert " \n" not in block  # the official trailing space before "\nAnswer:" is removed
    assert len(fewshot.GSM8K_EXEMPLARS) == 8
    for (question, chain), piece in zip(fewshot.GSM8K_EXEMPLARS, block.split("\n\n"), strict=True):
        assert piece == f"Question: {question}\nAnswer: {chain}"
        assert "\n" not in question + chain


def test_math_block_has_the_4_minerva_exemplars_in_the_zero_shot_layout():
    block = FEWSHOT["math"]
    assert block.count("Problem: ") == 4 and block.count("\nSolution: ") == 4
    assert block.count("I hope it is correct.") == 4
    assert block.startswith(r"Problem: Find the domain of the expression $\frac{\sqrt{x-2}}{\sqrt{5-x}}$.}")
    for opening in (r"If $\det \mathbf{A} = 2$", "Terrell usually lifts", "If the system of equations"):
        assert f"\n\nProblem: {opening}" in block
    assert len(fewshot.MATH_EXEMPLARS) == 4
    assert block == "\n\n".join(f"Problem: {p}\nSolution: {s}" for p, s in fewshot.MATH_EXEMPLARS)
    assert "\\\\\n" in block  # the LaTeX line breaks of the align* environments are real "\\" (raw strings)


@pytest.mark.parametrize("index", range(8))
def test_gsm8k_grader_reads_each_exemplar(index):
    question, chain = fewshot.GSM8K_EXEMPLARS[index]
    assert chain.endswith(f"The answer is {GSM8K_ANSWERS[index]}.")
    assert gsm8k.extract_answer(chain) == GSM8K_ANSWERS[index]
    assert gsm8k.grade(" " + chain, GSM8K_ANSWERS[index]) == "correct"


@pytest.mark.parametrize("index", range(4))
def test_math_grader_reads_each_exemplar(index):
    problem, solution = fewshot.MATH_EXEMPLARS[index]
    gold = MATH_ANSWERS[index]
    assert math_task.extract_answer(solution) == math_task.normalize(gold)
    assert math_task.grade(" " + solution, gold) == "correct"
    boxed_only = solution.split("\nFinal Answer:")[0]  # the \boxed{} of the worked solution agrees
    assert math_task.extract_answer(boxed_only) == math_task.normalize(gold)


def test_no_exemplar_contains_a_stop_string():
    # A model that reproduces the block is cut exactly at the end of the first exemplar.
    assert cut_at_stop(FEWSHOT["gsm8k"]) == "Question: {}\nAnswer: {}".format(*fewshot.GSM8K_EXEMPLARS[0])
    assert cut_at_stop(FEWSHOT["math"]) == "Problem: {}\nSolution: {}".format(*fewshot.MATH_EXEMPLARS[0])
    for question, chain in fewshot.GSM8K_EXEMPLARS:
        assert cut_at_stop(chain) == chain and cut_at_stop(question) == question
    for problem, solution in fewshot.MATH_EXEMPLARS:
        assert cut_at_stop(solution) == solution and cut_at_stop(problem) == problem


def test_fewshot_prompt():
    prompt = "Question: Janet has 3 apples.\nAnswer:"
    assert fewshot_prompt("gsm8k", prompt) == FEWSHOT["gsm8k"] + "\n\n" + prompt
    assert fewshot_prompt("gsm8k", prompt).endswith("The answer is 8.\n\nQuestion: Janet has 3 apples.\nAnswer:")
    math_prompt = "Problem: What is $1+1$?\nSolution:"
    assert fewshot_prompt("math", math_prompt) == FEWSHOT["math"] + "\n\n" + math_prompt
    assert fewshot_prompt("none", prompt) == prompt


@pytest.mark.parametrize("task", ["arithmetic", "GSM8K", "", "minerva"])
def test_fewshot_prompt_unknown_task(task):
    with pytest.raises(ValueError, match="none, gsm8k, math"):
        fewshot_prompt(task, "Question: q\nAnswer:")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 3 + 2 = 5. The answer is 5.\n\nQuestion: If Tom has", "3 + 2 = 5. The answer is 5."),
        (" So 7.\n\nProblem: next\n\nQuestion: other", "So 7."),
        (" So 7.\n\nQuestion: next\n\nProblem: other", "So 7."),  # the earliest stop wins, whichever it is
        ("  no stop here \n", "no stop here"),
        ("\n\nQuestion: at once", ""),
        (" one\n\nsecond paragraph\n\nQuestion", "one\n\nsecond paragraph\n\nQuestion"),  # no colon: not a stop
        (" a\nQuestion: b", "a\nQuestion: b"),  # one newline: not a stop
        ("", ""),
    ],
)
def test_cut_at_stop(text, expected):
    assert cut_at_stop(text) == expected


def test_cut_at_stop_custom_stops():
    assert cut_at_stop("x. END y", stops=(" END",)) == "x."
    assert cut_at_stop("a.\n\nQuestion: b", stops=[".\n\nQuestion:", "\n\nQuestion:"]) == "a"
    assert cut_at_stop(" a \n\nQuestion: b", stops=()) == "a \n\nQuestion: b"


def test_cut_generation_of_a_fewshot_prompt_grades():
    """A base model that answers and then starts the next exemplar: the cut keeps only its answer."""
    generation = " She has 3 + 4 = 7 apples. The answer is 7.\n\nQuestion: A farmer has 12 cows. The answer is 12."
    completion = cut_at_stop(generation)
    assert completion == "She has 3 + 4 = 7 apples. The answer is 7."
    assert gsm8k.grade(completion, "7") == "correct"
    assert gsm8k.grade(generation, "7") == "wrong"  # uncut, the grader would read the next exemplar's answer
