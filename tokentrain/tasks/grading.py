"""What the task graders share: the verdict type, `accuracy` over verdicts, and the `GRADERS` dict.

Every grader is `grade(completion: str, gold: str) -> Verdict`. "unparsable" (no answer could be read from the
completion) is its own verdict so that a format failure is visible in the metrics, and it is never counted correct.
A gold answer that does not parse is a data error: the graders raise ValueError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

from . import arithmetic, gsm8k, math

Verdict = Literal["correct", "wrong", "unparsable"]
VERDICTS: tuple[Verdict, ...] = ("correct", "wrong", "unparsable")

# Task name -> module with `grade`, `extract_answer` and `gold_answer`; the names recipes use in `task:`.
TASKS = {"gsm8k": gsm8k, "math": math, "arithmetic": arithmetic}
GRADERS: dict[str, Callable[[str, str], Verdict]] = {name: module.grade for name, module in TASKS.items()}


def accuracy(results: Iterable[Verdict]) -> dict[str, int | float]:
    """{correct, wrong, unparsable: counts; accuracy: correct / all}; unparsable answers count against accuracy.

    ["correct", "wrong", "unparsable", "correct"] -> {correct: 2, wrong: 1, unparsable: 1, accuracy: 0.5}.
    """
    counts = dict.fromkeys(VERDICTS, 0)
    for i, verdict in enumerate(results):
        if verdict not in counts:
            raise ValueError(f"result {i} is {verdict!r}, not one of {VERDICTS}")
        counts[verdict] += 1
    total = sum(counts.values())
    if total == 0:
        raise ValueError("accuracy of no results: nothing was graded")
    return {**counts, "accuracy": counts["correct"] / total}


def gold_answers(rows, task: str, gold_column: str, source: str, label: Callable[[int], str]) -> list[str]:
    """The canonical gold answer of every row (`task`'s parser); a missing `prompt` or gold column, or a gold that
    does not parse, is an error naming the row (`label(i)`), raised before any model is loaded."""
    missing = [c for c in ("prompt", gold_column) if c not in rows.column_names]
    if missing:
        raise KeyError(
            f"{source}: rows need column(s) {missing} (have {rows.column_names}); build `prompt` with "
            "prompt_template, name the gold column with gold_column"
        )
    golds = []
    for i, gold in enumerate(rows[gold_column]):
        try:
            golds.append(TASKS[task].gold_answer(str(gold)))
        except ValueError as e:
            raise ValueError(f"{source}: {label(i)}: {e}") from None
    return golds
