"""GSM8K answers: extraction, canonical numbers and the grader (spec `specs/critical_dpo.md` section 4, vector E).

The gold answer of a GSM8K row is the number after "#### " in its `answer` text ("A: " in the official repository's
`example_model_solutions.jsonl`). A model's answer is, by the first rule that matches:

1. the number after the last "#### "             (the format of the 8-shot prompt),
2. the number after the last "The answer is"     (T in any case),
3. the number after the last line-initial "A: "  (the format of `example_model_solutions`),
4. the last number anywhere in the text.

Numbers are canonicalised ("$" and "," dropped, a trailing "." stripped, "18.00" -> "18", "0.50" -> "0.5") so that
equal strings mean equal numbers. No number -> "" -> the verdict "unparsable", never "correct".
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .grading import Verdict

# One number as people write it: optional sign and "$", digits with optional thousands commas ("1,234", not "5,6"),
# optional decimals. The sign must not follow a word character or ")", so "15-3" reads as 15 and 3, not 15 and -3.
_NUMBER = r"(?:(?<![\w)\]])-\s?)?\$?\s?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
_RULES = (
    re.compile(rf"####\s*({_NUMBER})"),
    re.compile(rf"[Tt]he answer is:?\s*({_NUMBER})"),
    re.compile(rf"^A:\s*({_NUMBER})", re.MULTILINE),
    re.compile(rf"({_NUMBER})"),
)


def canonical_number(text: str) -> str:
    """'$1,234.50.' -> '1234.5', '18.00' -> '18', '-0.0' -> '0'; '' when `text` is not a number.

    String arithmetic, not float or Decimal: exact for any number of digits ("0.333...3" keeps all its 3s).
    """
    text = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", text):
        return ""
    sign = "-" if text.startswith("-") else ""
    whole, _, frac = text.lstrip("-").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")  # "007" -> "7", "0.50" -> "0.5"
    if whole == "0" and not frac:
        sign = ""  # "-0" is 0
    return sign + whole + (f".{frac}" if frac else "")


def extract_answer(text: str) -> str:
    """The canonical number a completion (or a gold solution) answers with; '' when it contains no number."""
    for rule in _RULES:
        matches = rule.findall(text)
        if matches:
            return canonical_number(matches[-1])
    return ""


def gold_answer(gold: str) -> str:
    """Canonical gold number from a full GSM8K answer ('...#### 1,000'), a solution ending in a line 'A: 1,000'
    (example_model_solutions), or a bare number ('1,000' -> '1000').

    Raises ValueError for anything else: a gold answer that does not parse (or a wrong `gold_column`, such as the
    question) is a data error, never a silent miss. Predictions are read more leniently (`extract_answer`).
    """
    text = str(gold).strip()
    match = _RULES[0].search(text) or _RULES[2].search(text) or re.fullmatch(rf"({_NUMBER})\.?", text)
    if not match:
        raise ValueError(f"GSM8K gold answer is not '#### N', a line 'A: N' or a number: {text[-200:]!r}")
    return extract_answer(text)


def grade(completion: str, gold: str) -> Verdict:
    """'correct' if the completion's answer equals the gold number, 'unparsable' if it has no number, else 'wrong'."""
    target = gold_answer(gold)
    answer = extract_answer(completion)
    if not answer:
        return "unparsable"
    return "correct" if answer == target else "wrong"
