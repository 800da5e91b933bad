"""Equation completion: the task of the concept_heads mini experiment and quickstart (spec `specs/concept_heads.md`
section 7).

A row is an equation split at its `=`: prompt `lhs=` (e.g. `48/2=`), completion `rhs` (`24`; TRL appends `<eos>`).
With one token per character every answer is a multi-token concept whose leading digit depends on the whole result.

- `gsm8k_equations`: every calculator annotation `<<lhs=rhs>>` of GSM8K answers with lhs `^\\d+[-+*/]\\d+$` and rhs
  `^\\d+$`. Train keeps every occurrence (duplicates are the real frequencies), test the distinct ones, each marked
  `seen` when it also occurs in train. Phase 0 reads Tiny Shakespeare and the GSM8K train questions and answers with
  the annotations removed (`48/2 = 24` as prose, never the task format).
- `synthetic_equations`: the same shapes made in code (quickstart, no ../shared): equations of two 1-2 digit numbers
  and arithmetic prose around them.

Everything here is pure Python and seeded: the same arguments give the same rows.
"""

from __future__ import annotations

import random
import re
import string

ANNOTATION = re.compile(r"<<([^<>]*)>>")
LHS = re.compile(r"^\d+[-+*/]\d+$")
RHS = re.compile(r"^\d+$")
EQUATION_CHARS = "0123456789+-*/="


# ------------------------------------------------------------------------------------------------------- GSM8K


def annotations(answer: str) -> list[tuple[str, str]]:
    """The (lhs, rhs) calculator annotations of one GSM8K answer that are integer binary equations, in order."""
    out = []
    for inner in ANNOTATION.findall(answer):
        lhs, eq, rhs = inner.partition("=")
        if eq and LHS.match(lhs) and RHS.match(rhs):
            out.append((lhs, rhs))
    return out


def strip_annotations(text: str) -> str:
    """`48/2 = <<48/2=24>>24` -> `48/2 = 24`: the prose without the calculator annotations."""
    return ANNOTATION.sub("", text)


def equation_rows(train_answers: list[str], test_answers: list[str]) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows): train every annotation occurrence, test the distinct ones in first-seen order with
    `seen` = it also occurs in train. Rows: {prompt: 'lhs=', completion: 'rhs'} (+ `seen` for test)."""
    train = [pair for answer in train_answers for pair in annotations(answer)]
    known = set(train)
    test = list(dict.fromkeys(pair for answer in test_answers for pair in annotations(answer)))
    return (
        [{"prompt": f"{lhs}=", "completion": rhs} for lhs, rhs in train],
        [{"prompt": f"{lhs}=", "completion": rhs, "seen": (lhs, rhs) in known} for lhs, rhs in test],
    )


def ascii_only(text: str) -> str:
    """Drop every non-ASCII character (the character vocabulary is ASCII)."""
    return text.encode("ascii", "ignore").decode("ascii")


def gsm8k_corpus(questions: list[str], answers: list[str]) -> list[str]:
    """Phase-0 documents from GSM8K train: question, newline, answer without annotations."""
    return [ascii_only(f"{q}\n{strip_annotations(a)}\n") for q, a in zip(questions, answers)]


def question_tails(questions: list[str], n: int, chars: int, seed: int) -> list[str]:
    """Phase-1 prompts: the last `chars` characters of `n` random questions, then a newline."""
    rng = random.Random(seed)
    picked = rng.sample(range(len(questions)), n)
    return [ascii_only(questions[i])[-chars:] + "\n" for i in picked]


def text_openings(text: str, n: int, chars: int, seed: int) -> list[str]:
    """Phase-1 prompts: the first `chars` characters of `n` random paragraphs (blank-line separated) of `text` that are
    at least that long."""
    paragraphs = [p for p in ascii_only(text).split("\n\n") if len(p) >= chars]
    if len(paragraphs) < n:
        raise ValueError(f"only {len(paragraphs)} paragraphs of >= {chars} characters, {n} asked")
    rng = random.Random(seed)
    return [paragraphs[i][:chars] for i in rng.sample(range(len(paragraphs)), n)]


# ------------------------------------------------------------------------------------------------- made in code

_NAMES = ["Ann", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade"]
_THINGS = ["apple", "book", "coin", "shell", "card", "stamp", "marble", "sticker"]
_PROSE = {
    "+": "{n} had {a} {t}s and found {b} more, so {n} has {a}+{b} = {c} {t}s now.",
    "-": "{n} had {a} {t}s and gave away {b}, so {a}-{b} = {c} {t}s are left.",
    "*": "{n} bought {a} boxes of {b} {t}s each: {a}*{b} = {c} {t}s in all.",
    "/": "{n} shared {a} {t}s among {b} friends, so each got {a}/{b} = {c} {t}s.",
}
_FILLER = [
    "The shop opens early on market days.",
    "It rained all morning, then the sun came out.",
    "Everyone agreed that the plan was a good one.",
    "The class counted everything twice to be sure.",
]


def make_equation(rng: random.Random) -> tuple[str, str, str]:
    """(a, op, b) with an integer, non-negative result: + and - on 1-2 digit numbers, * on 1-2 digits times one digit,
    / exact with a one-digit divisor."""
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
    elif op == "-":
        a = rng.randint(1, 99)
        b = rng.randint(0, a)
    elif op == "*":
        a, b = rng.randint(1, 99), rng.randint(2, 9)
    else:
        b, q = rng.randint(2, 9), rng.randint(1, 30)
        a = b * q
    return str(a), op, str(b)


def evaluate(a: str, op: str, b: str) -> str:
    x, y = int(a), int(b)
    return str({"+": x + y, "-": x - y, "*": x * y, "/": x // max(y, 1)}[op])


def synthetic_equations(num_train: int, num_test: int, pool: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) like `equation_rows`: train draws `num_train` rows (with repeats) from a pool of `pool` distinct
    equations; test holds `num_test` distinct equations, half from the pool (`seen`) and half never in train."""
    rng = random.Random(seed)
    distinct: dict[tuple[str, str], None] = {}
    while len(distinct) < pool + num_test:
        a, op, b = make_equation(rng)
        distinct[(f"{a}{op}{b}", evaluate(a, op, b))] = None
    every = list(distinct)
    known, fresh = every[:pool], every[pool:]
    train = [rng.choice(known) for _ in range(num_train)]
    n_seen = num_test // 2
    test = [(pair, True) for pair in rng.sample(known, n_seen)] + [(pair, False) for pair in fresh[: num_test - n_seen]]
    return (
        [{"prompt": f"{lhs}=", "completion": rhs} for lhs, rhs in train],
        [{"prompt": f"{lhs}=", "completion": rhs, "seen": seen} for (lhs, rhs), seen in test],
    )


def synthetic_corpus(num_docs: int, seed: int) -> list[str]:
    """Phase-0 documents made in code: a few sentences of arithmetic prose (`12+7 = 19`, never the task format
    `12+7=19`) and filler."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            if rng.random() < 0.25:
                sentences.append(rng.choice(_FILLER))
                continue
            a, op, b = make_equation(rng)
            sentences.append(
                _PROSE[op].format(n=rng.choice(_NAMES), t=rng.choice(_THINGS), a=a, b=b, c=evaluate(a, op, b))
            )
        docs.append(" ".join(sentences) + "\n")
    return docs


def sentence_openings(docs: list[str], n: int, chars: int, seed: int) -> list[str]:
    """Phase-1 prompts made in code: the first `chars` characters of `n` random documents."""
    rng = random.Random(seed)
    return [docs[i][:chars] for i in rng.sample(range(len(docs)), n)]


# ----------------------------------------------------------------------------------------------------- phase 0


def alphabet(texts: list[str]) -> str:
    """The sorted characters of `texts` and of every equation: the character tokenizer's vocabulary (after its
    specials). Printable ASCII and newline only: anything else is an error naming it."""
    chars = set(EQUATION_CHARS)
    for text in texts:
        chars.update(text)
    bad = sorted(c for c in chars if c not in string.printable or c in "\t\r\x0b\x0c")
    if bad:
        raise ValueError(f"characters outside printable ASCII and newline in the corpus: {bad[:10]}")
    return "".join(sorted(chars))


def windows(corpus: str, count: int, chars: int, seed: int) -> list[str]:
    """`count` windows of `chars` characters at uniformly random offsets of `corpus` (phase-0 pretraining rows)."""
    if len(corpus) <= chars:
        raise ValueError(f"corpus of {len(corpus)} characters is too short for windows of {chars}")
    rng = random.Random(seed)
    return [corpus[o : o + chars] for o in (rng.randrange(len(corpus) - chars + 1) for _ in range(count))]
