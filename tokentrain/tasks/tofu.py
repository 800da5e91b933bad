"""TOFU metrics (spec `specs/unlearning.md` section 4; Maini et al., arXiv 2401.06121, code `locuslab/tofu`
aggregate_eval_stat.py and open-unlearning's memorization.py / privacy.py).

Every metric reads mean token NLLs of answers given their question, L_bar = mean_k -log pi(a_k | q, a_<k):
- P(a | q) = exp(-L_bar); `forget_prob` / `retain_prob` = mean P(answer | question) over forget / retain rows.
- per forget row, R = exp(-mean_k L_bar_pert,k) / exp(-L_bar_para): the mean over the perturbed answers is taken on
  losses (a geometric mean of probabilities), as both codes do; the TOFU paper writes an arithmetic mean of
  probabilities. `forget_truth_ratio` = mean min(R, 1/R) (1: true and false answers equally likely); the retain form
  is max(0, 1 - R).
- `forget_quality` = the two-sample Kolmogorov-Smirnov p-value (scipy `ks_2samp`) between this model's forget R
  values and a retain-only model's (its metrics file, `forget_truth_ratio_values`). TOFU's aggregate script tests
  exp(L_pert - L_para) = 1/R: the KS statistic is the same under any strictly monotone map of both samples.
Rows: base models read `Question: {question}\\nAnswer:` with the completion " " + answer; chat models TRL's
conversational prompt-completion form. Loss on answer tokens only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROMPT = "Question: {question}\nAnswer:"
TRUTH_RATIO_VALUES = "forget_truth_ratio_values"  # the metrics-file key forget_quality reads from the retain model

# ------------------------------------------------------------------------------------------------ pure metrics


def mean_nll(token_nlls: Sequence[float]) -> float:
    if not token_nlls:
        raise ValueError("an answer with no token has no mean NLL")
    return sum(token_nlls) / len(token_nlls)


def answer_prob(token_nlls: Sequence[float]) -> float:
    """P(a | q) = exp(-mean token NLL of the answer)."""
    return math.exp(-mean_nll(token_nlls))


def truth_ratio(paraphrased_nll: float, perturbed_nlls: Sequence[float]) -> float:
    """R = exp(-mean_k L_pert,k) / exp(-L_para) from mean token NLLs (geometric mean of the false answers)."""
    if not perturbed_nlls:
        raise ValueError("the truth ratio needs at least one perturbed answer")
    return math.exp(paraphrased_nll - sum(perturbed_nlls) / len(perturbed_nlls))


def forget_truth_score(r: float) -> float:
    """min(R, 1/R): 1 when the true and false answers are equally likely."""
    return min(r, 1.0 / r)


def retain_truth_score(r: float) -> float:
    """max(0, 1 - R): high when the true answer is much likelier than the false ones."""
    return max(0.0, 1.0 - r)


def _ks_2samp():
    try:
        from scipy.stats import ks_2samp
    except ImportError:
        raise ImportError(
            "forget_quality needs scipy (pip install scipy): the KS test comes from scipy.stats"
        ) from None
    return ks_2samp


def ks_pvalue(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov p-value (scipy `ks_2samp`, its default method, as TOFU and open-unlearning)."""
    ks_2samp = _ks_2samp()
    if not x or not y:
        raise ValueError(f"the KS test needs two non-empty samples, got {len(x)} and {len(y)} values")
    return float(ks_2samp(list(x), list(y)).pvalue)


# -------------------------------------------------------------------------------------------------------- rows


def qa_row(question: str, answer: str, chat: bool = False) -> dict[str, Any]:
    """A prompt/completion row: base-model text form, or TRL's conversational form for chat models."""
    if chat:
        return {
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": answer}],
        }
    return {"prompt": PROMPT.format(question=question), "completion": " " + answer}


def check_tofu_rows(rows: Sequence[dict[str, Any]], name: str, truth_ratio: bool) -> None:
    """Every row needs question and answer; with the truth ratio also paraphrased_answer and perturbed_answer."""
    needed = ["question", "answer"] + (["paraphrased_answer", "perturbed_answer"] if truth_ratio else [])
    for i, row in enumerate(rows):
        missing = [c for c in needed if not row.get(c)]
        if missing:
            why = " (the truth ratio needs them; ../shared/data/tofu has none for retain rows)" if truth_ratio else ""
            raise KeyError(f"{name} row {i} lacks {missing}{why}")
        if truth_ratio and not isinstance(row["perturbed_answer"], list | tuple):
            raise ValueError(f"{name} row {i}: perturbed_answer must be a list of answers")


def read_truth_ratios(path: str | Path) -> list[float]:
    """The forget R values a retain-only model's metrics file holds (`forget_truth_ratio_values`)."""
    path = Path(str(path))
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"retain_model_eval {path}: cannot read a metrics JSON ({e})") from None
    values = data.get(TRUTH_RATIO_VALUES) if isinstance(data, dict) else None
    if not values:
        raise KeyError(
            f"retain_model_eval {path} has no {TRUTH_RATIO_VALUES!r}: evaluate the retain model with the tofu task first"
        )
    return [float(v) for v in values]


# ------------------------------------------------------------------------------------------- model-running helpers


def answer_nlls(model, tokenizer, pairs: Sequence[tuple[str, str]], chat=False, batch_size=16, accelerator=None):
    """Mean token NLL of each answer given its question."""
    from .familiarity import completion_logps

    rows = [qa_row(q, a, chat) for q, a in pairs]
    return [mean_nll([-v for v in r]) for r in completion_logps(model, tokenizer, rows, batch_size, accelerator)]


def evaluate_tofu(
    model,
    tokenizer,
    forget_rows: Sequence[dict[str, Any]],
    retain_rows: Sequence[dict[str, Any]] | None = None,
    chat: bool = False,
    truth_ratio_metric: bool = True,
    forget_quality: bool = False,
    retain_model_eval: str | Path | None = None,
    batch_size: int = 16,
    accelerator=None,
) -> dict[str, Any]:
    """forget_prob, forget_truth_ratio (+ its per-row values), retain_prob and forget_quality of one model."""
    if forget_quality and not retain_model_eval:
        raise ValueError(
            "forget_quality needs retain_model_eval: the metrics file of a model trained on retain rows only"
        )
    if forget_quality and not truth_ratio_metric:
        raise ValueError("forget_quality compares truth ratios: it needs truth_ratio_metric")
    if forget_quality:
        _ks_2samp()  # fail before any model runs
    check_tofu_rows(forget_rows, "forget", truth_ratio_metric)
    if retain_rows is not None:
        check_tofu_rows(retain_rows, "retain", False)

    pairs = [(r["question"], r["answer"]) for r in forget_rows]
    n_forget = len(pairs)
    if truth_ratio_metric:
        pairs += [(r["question"], r["paraphrased_answer"]) for r in forget_rows]
        pairs += [(r["question"], p) for r in forget_rows for p in r["perturbed_answer"]]
    if retain_rows is not None:
        pairs += [(r["question"], r["answer"]) for r in retain_rows]
    nlls = answer_nlls(model, tokenizer, pairs, chat, batch_size, accelerator)

    metrics: dict[str, Any] = {"forget_prob": sum(math.exp(-v) for v in nlls[:n_forget]) / n_forget}
    pos = 2 * n_forget if truth_ratio_metric else n_forget
    if truth_ratio_metric:
        ratios = []
        for i, row in enumerate(forget_rows):
            k = len(row["perturbed_answer"])
            ratios.append(truth_ratio(nlls[n_forget + i], nlls[pos : pos + k]))
            pos += k
        metrics["forget_truth_ratio"] = sum(forget_truth_score(r) for r in ratios) / len(ratios)
        metrics[TRUTH_RATIO_VALUES] = ratios
    if retain_rows is not None:
        metrics["retain_prob"] = sum(math.exp(-v) for v in nlls[pos:]) / len(retain_rows)
    if forget_quality:
        metrics["forget_quality"] = ks_pvalue(metrics[TRUTH_RATIO_VALUES], read_truth_ratios(retain_model_eval))
    return metrics
