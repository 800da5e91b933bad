"""`arith_chain`: the synthetic task of the critical_dpo mini experiment (spec `specs/critical_dpo.md` section 7).

A problem adds or subtracts two 3-4 digit numbers; the completion works column by column, units first, with the carry
(or borrow) written out, then gives the result:

    prompt      "Q:472+389\\n"
    completion  "2+9+0=11\\n7+8+1=16\\n4+3+1=8\\nA:861"        (TRL appends EOS)

    prompt      "Q:4821-389\\n"
    completion  "1-9-0=-8\\n2-8-1=-7\\n8-3-1=4\\n4-0-0=4\\nA:4432"

A wrong column (a dropped carry, a slip in one digit) is exactly the kind of critical token the method looks for.
Correct <=> the integer after the last "A:" equals the result; no integer there -> "unparsable".
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .grading import Verdict


# The characters of every prompt and completion; the mini experiment's tokenizer is these plus <pad> <bos> <eos>.
ALPHABET = "0123456789+-=:QA\n"


def solve(a: int, op: str, b: int) -> str:
    """The worked completion of a{op}b: one line "{x}{op}{y}{op}{c}={s}" per column, units first, then "A:{result}"."""
    n = max(len(str(a)), len(str(b)))
    xs, ys = str(a).zfill(n)[::-1], str(b).zfill(n)[::-1]  # digits, units first; missing digits are 0
    lines, carry = [], 0  # c_0 = 0
    for x, y in zip(map(int, xs), map(int, ys)):
        s = x + y + carry if op == "+" else x - y - carry  # "-": may be negative, the borrow goes to the next column
        lines.append(f"{x}{op}{y}{op}{carry}={s}")
        carry = s // 10 if op == "+" else int(s < 0)
    lines.append(f"A:{a + b if op == '+' else a - b}")
    return "\n".join(lines)


def make_problem(rng: random.Random) -> dict[str, str]:
    """One problem {prompt, completion, gold}; draws from `rng` in the spec's order: op, n_a, n_b, a, b."""
    op = rng.choice("+-")
    n_a, n_b = rng.randint(3, 4), rng.randint(3, 4)
    a = rng.randint(10 ** (n_a - 1), 10**n_a - 1)
    b = rng.randint(10 ** (n_b - 1), 10**n_b - 1)
    if op == "-" and a < b:
        a, b = b, a  # results stay non-negative
    result = a + b if op == "+" else a - b
    return {"prompt": f"Q:{a}{op}{b}\n", "completion": solve(a, op, b), "gold": str(result)}


def make_problems(n: int, seed: int) -> list[dict[str, str]]:
    """`n` problems from one `random.Random(seed)`: the same seed gives the same list (pool 0, dev 777, test 12345)."""
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def extract_answer(text: str) -> str:
    """The integer after the last "A:" ('-12' for "A:-12"); '' when there is no "A:" or no integer right after it."""
    if "A:" not in text:
        return ""
    match = re.match(r"\s*(-?\d+)", text.rsplit("A:", 1)[1])
    return str(int(match[1])) if match else ""  # int(): "A:007" answers 7


def gold_answer(gold: str | int) -> str:
    """The gold result as a canonical integer string; a gold that is not an integer is a data error."""
    try:
        return str(int(gold))
    except ValueError:
        raise ValueError(f"arith_chain gold answer is not an integer: {gold!r}") from None


def grade(completion: str, gold: str | int) -> Verdict:
    """'correct' if the integer after the last "A:" equals `gold`, 'unparsable' if there is none, else 'wrong'."""
    target = int(gold_answer(gold))
    answer = extract_answer(completion)
    if not answer:
        return "unparsable"
    return "correct" if int(answer) == target else "wrong"
