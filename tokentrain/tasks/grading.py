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
