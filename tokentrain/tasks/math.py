"""MATH / MATH-500 answers: extraction, normalisation and the grader (spec `specs/critical_dpo.md` section 4, vector E).

Extraction: if "Final Answer:" occurs (the 4-shot Minerva format), the text between the first and the last "$" after
it, cut at "I hope it is correct"; otherwise the content of the last `\\boxed{...}` or `\\fbox{...}` (balanced braces;
`\\boxed 5` too). Nothing found -> "" -> the verdict "unparsable", never "correct".

Normalisation (`normalize`), applied to both the prediction and the gold answer:

- spec: remove `\\left`, `\\right`, `\\!`, spaces, `^\\circ`, `^{\\circ}`, `\\$`, `$` and a trailing "."; `\\dfrac` and
  `\\tfrac` -> `\\frac`.
- tokentrain additions from Hendrycks et al.'s `is_equiv` (the MATH paper's grader), each one a form the MATH-500 gold
  answers themselves use: units `\\text{ cm}` / `\\mbox{ inches}^2` (text starting with a space) removed, other
  `\\text{X}` / `\\textbf{X}` / `\\mbox{X}` -> X; `\\%` and `%` removed; `\\frac12` -> `\\frac{1}{2}` and
  `\\sqrt2` -> `\\sqrt{2}`; a leading one-letter `x=` removed (only when it is the one "="); a whole answer "a/b" of
  integers -> `\\frac{a}{b}`.

Equality: equal normalised strings, or both parse as numbers (a decimal, thousands commas allowed, `\\frac{a}{b}` or
a/b, with an optional "-") equal within relative 1e-4. Simpler than the official code's sympy `math_equal` [T].
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .grading import Verdict

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def last_boxed(text: str) -> str:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (balanced braces) or `\\boxed 5` (up to "$"); '' if none."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return ""
    rest = text[matches[-1].end() :]
    if not rest.lstrip().startswith("{"):
        return rest.split("$")[0].strip()  # `\boxed 5$`: the argument runs to the closing "$"
    rest = rest.lstrip()
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i]
    return ""  # unbalanced: the completion was cut inside the box


def extract_answer(text: str) -> str:
    """The normalised answer of a completion or a reference solution; '' when there is none."""
    answer = ""
    if "Final Answer:" in text:
        tail = text.split("Final Answer:", 1)[1].split("I hope it is correct")[0]
        first, last = tail.find("$"), tail.rfind("$")
        if first < last:
            answer = tail[first + 1 : last]
            if _BOXED.search(answer):
                answer = last_boxed(answer)
    if not answer:
        answer = last_boxed(text)
    return normalize(answer)


def _fix_fracs(text: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac9{19}` -> `\\frac{9}{19}`, `\\frac{270}7` -> `\\frac{270}{7}`."""
    text = re.sub(r"\\frac([0-9a-zA-Z])([0-9a-zA-Z])", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac([0-9a-zA-Z])\{", r"\\frac{\1}{", text)
    return re.sub(r"\\frac(\{[^{}]*\})([0-9a-zA-Z])", r"\\frac\1{\2}", text)


def normalize(answer: str) -> str:
    """Canonical form of a MATH answer string (module docstring lists the rules); idempotent."""
    text = answer.strip()
    # Units first: they are recognised by the space that opens them ("5.4 \text{ cents}", "864 \mbox{ inches}^2").
    text = re.sub(r"\\(?:text|mbox)\{\s[^{}]*\}(?:\^\{?\d\}?)?", "", text)
    text = re.sub(r"\\(?:text|textbf|mbox)\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\s+", "", text)
    text = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", text)  # not \leftarrow, \rightarrow
    text = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", text)
    for junk in (r"\!", r"^{\circ}", r"^\circ", r"\$", "$", r"\%", "%"):
        text = text.replace(junk, "")
    text = text.rstrip(".")
    text = _fix_fracs(text)
    text = re.sub(r"\\sqrt([0-9a-zA-Z])", r"\\sqrt{\1}", text)
    if text.count("=") == 1 and re.match(r"[a-zA-Z]=", text):
        text = text[2:]  # "x=5" -> "5", "y=2x+3" -> "2x+3"; "5x-7y+11z+4=0" stays
    text = re.sub(r"^(-?)(\d+)/(\d+)$", r"\1\\frac{\2}{\3}", text)
    return text


_DECIMAL = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_FRACTION = re.compile(rf"(-?)(?:\\frac\{{({_DECIMAL})\}}\{{({_DECIMAL})\}}|({_DECIMAL})/({_DECIMAL}))")


def as_number(text: str) -> float | None:
    """The value of a normalised answer that is a decimal, `\\frac{a}{b}` or a/b (with an optional "-"); else None."""
    if re.fullmatch(_DECIMAL, text):
        return float(text.replace(",", ""))
    match = _FRACTION.fullmatch(text)
    if match is None:
        return None
    num, den = (float(s.replace(",", "")) for s in (match[2] or match[4], match[3] or match[5]))
    if den == 0:
        return None
    return -num / den if match[1] else num / den


def is_equiv(answer: str, gold: str) -> bool:
    """Two normalised answers are equal: same string, or both numbers within relative 1e-4."""
    if answer == gold:
        return True
    a, b = as_number(answer), as_number(gold)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-4)


def gold_answer(gold: str) -> str:
    """Normalised gold answer (a MATH `answer` field); ValueError when it normalises to nothing."""
    answer = normalize(gold)
    if not answer:
        raise ValueError(f"MATH gold answer is empty after normalisation: {gold!r}")
    return answer


def grade(completion: str, gold: str) -> Verdict:
    """'correct' if the completion's answer equals the gold answer, 'unparsable' if it has none, else 'wrong'."""
    target = gold_answer(gold)
    answer = extract_answer(completion)
    if not answer:
        return "unparsable"
    return "correct" if is_equiv(answer, target) else "wrong"
