"""Selection of critical-token DPO's training sets from graded samples (spec `specs/critical_dpo.md` section 4).

Per question, N sampled chains are graded against the gold answer; `select` then picks, as the official code does
(`select_data_for_sft_and_dpo`, with its random shuffle and random representative made deterministic):

- groups: samples with the same answer ("" = no answer: ignored), ordered by size (descending), ties by first
  appearance; a group's representative is its first member;
- `pos`: the representative of the first correct group (-> `pos_sft`, the positive model's data);
- `neg`: W = number of wrong samples, need = ceil(0.5·W); walking the wrong groups in order, a representative is
  taken if need > 0 and (it is the first wrong group taken or its size is >= 2), and then need -= its size
  (-> `neg_sft`). The size >= 2 condition is the code's; the paper says only "most frequent, covering 50%";
- `pair`: (first correct representative, first wrong representative) when both exist (code `dpo top-k = 1`).

Vector D: answers ["7", "9", "9", "7", "1", "42"], gold "42" -> groups 7 (0, 3), 9 (1, 2), 1 (4), 42 (5);
W = 5, need 3: take 0 (need 1), take 1 (need -1); pos 5; pair (5, 0).

Rows use the prompt format of section 4: prompt "Question: {q}\\nAnswer:" and completion " " + chain, so that the
prompt is a clean token prefix of prompt + completion (TRL cuts the prompt otherwise). No few-shot block.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import gsm8k

# The fraction of wrong samples the negative set covers ("top-p 50%", paper and code).
NEG_TOP_P = 0.5

# example_model_solutions.jsonl: the four solutions of each GSM8K test row, in this sample order.
GSM8K_SOLUTION_KEYS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
# Rows with index % HELDOUT_EVERY == HELDOUT_EVERY - 1 are held out of training (evaluation only), against contamination.
HELDOUT_EVERY = 4

SPLITS = ("train", "heldout", "all")


def select(answers: list[str], correct: list[bool]) -> dict[str, Any]:
    """Indices chosen from one question's samples: {"pos": int | None, "neg": list[int], "pair": (int, int) | None}.

    `answers[i]` is sample i's extracted answer ("" = none, ignored); `correct[i]` its verdict.

    Vector D: ["42","17","42","23","17","9","42","17","23","5","42","11","3","8"] with gold "42" -> W = 10,
    need 5: group 17 (size 3) taken, need 2; group 23 (size 2) taken, need 0 -> pos 0, neg [1, 3], pair (0, 1).
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} verdicts")
    groups: dict[str, list[int]] = {}  # answer -> member indices, in order of first appearance
    for i, answer in enumerate(answers):
        if answer != "":
            groups.setdefault(answer, []).append(i)
    ordered = sorted(groups.values(), key=len, reverse=True)  # stable: ties keep first appearance
    wrong_groups = [g for g in ordered if not correct[g[0]]]
    pos = next((g[0] for g in ordered if correct[g[0]]), None)

    need = math.ceil(NEG_TOP_P * sum(len(g) for g in wrong_groups))
    neg: list[int] = []
    for group in wrong_groups:
        if need > 0 and (not neg or len(group) >= 2):
            neg.append(group[0])
            need -= len(group)  # only taken groups count, as in the code
    pair = (pos, wrong_groups[0][0]) if pos is not None and wrong_groups else None
    return {"pos": pos, "neg": neg, "pair": pair}


def build_sets(samples: Iterable[dict[str, Any]], completion_prefix: str = " ") -> dict[str, list[dict[str, Any]]]:
    """`pos_sft`, `neg_sft` and `pairs` rows from a samples table, in question order (neg rows in selection order).

    Completions are `completion_prefix` + chain: " " for "Answer:" prompts (the space belongs to the completion),
    "" for arith_chain, whose prompt ends with a newline.

    Samples rows: `question_id`, `question`, `gold`, `prompt`, `completions` (stripped chains), `answers`, `correct`.
    SFT rows: `question_id`, `prompt`, `completion`; pair rows: `question_id`, `prompt`, `chosen`, `rejected`, `gold`.
    """
    sets: dict[str, list[dict[str, Any]]] = {"pos_sft": [], "neg_sft": [], "pairs": []}
    for row in samples:
        qid = row["question_id"]
        completions, answers, correct = row["completions"], row["answers"], row["correct"]
        if not len(completions) == len(answers) == len(correct):
            raise ValueError(
                f"question_id {qid!r}: {len(completions)} completions, {len(answers)} answers and "
                f"{len(correct)} verdicts; the samples table needs one of each per sample"
            )
        chosen = select(answers, correct)
        if chosen["pos"] is not None:
            sets["pos_sft"].append(
                {
                    "question_id": qid,
                    "prompt": row["prompt"],
                    "completion": completion_prefix + completions[chosen["pos"]],
                }
            )
        for i in chosen["neg"]:
            sets["neg_sft"].append(
                {"question_id": qid, "prompt": row["prompt"], "completion": completion_prefix + completions[i]}
            )
        if chosen["pair"] is not None:
            win, lose = chosen["pair"]
            sets["pairs"].append(
                {
                    "question_id": qid,
                    "prompt": row["prompt"],
                    "chosen": completion_prefix + completions[win],
                    "rejected": completion_prefix + completions[lose],
                    "gold": row["gold"],
                }
            )
    return sets


def gsm8k_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def is_heldout(index: int) -> bool:
    """Whether GSM8K test row `index` is kept out of training by `samples_from: gsm8k_solutions`."""
    return index % HELDOUT_EVERY == HELDOUT_EVERY - 1


def samples_from_gsm8k_solutions(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """A samples table from OpenAI's `example_model_solutions.jsonl(.gz)`: no generation, 4 real samples per question.

    Row i is GSM8K test row i (`question_id` = i); its samples are the four solutions in `GSM8K_SOLUTION_KEYS` order,
    graded with `tasks.gsm8k` against the "A: N" line of `ground_truth`. `split`: "train" (index % 4 != 3, 990 rows),
    "heldout" (index % 4 == 3, 329 rows, evaluation only) or "all". A missing field is an error naming row and key.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"samples_from gsm8k_solutions: {path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    samples = []
    with opener(path, "rt", encoding="utf-8") as f:
        for index, line in enumerate(f):
            if split != "all" and is_heldout(index) != (split == "heldout"):
                continue
            row = json.loads(line)
            missing = [k for k in ("question", "ground_truth", *GSM8K_SOLUTION_KEYS) if k not in row]
            missing += [f"{k}.solution" for k in GSM8K_SOLUTION_KEYS if k in row and "solution" not in row[k]]
            if missing:
                raise KeyError(f"{path}: row {index} lacks field(s) {missing}")
            try:
                gold = gsm8k.gold_answer(row["ground_truth"])
            except ValueError as e:
                raise ValueError(f"{path}: row {index} (question_id {index}): {e}") from None
            completions = [row[k]["solution"].strip() for k in GSM8K_SOLUTION_KEYS]
            answers = [gsm8k.extract_answer(c) for c in completions]
            samples.append(
                {
                    "question_id": index,
                    "question": row["question"],
                    "gold": gold,
                    "prompt": gsm8k_prompt(row["question"]),
                    "completions": completions,
                    "answers": answers,
                    "correct": [gsm8k.grade(c, gold) == "correct" for c in completions],
                }
            )
    return samples


def question_hash(text) -> str:
    """A question's identity across files: sha1 of its whitespace-normalised text (chat prompts: their JSON)."""
    text = text if isinstance(text, str) else json.dumps(text, sort_keys=True)
    return hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
