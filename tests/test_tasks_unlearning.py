"""Tests for tokentrain/tasks/familiarity.py and tokentrain/tasks/tofu.py (spec specs/unlearning.md sections 4, 6
vector 7 and 9): the pure metrics on hand-computed numbers, the KS p-value against exact enumeration, and the
model-running helpers against naive full-logit computations on the conftest tiny Llama."""

from __future__ import annotations

import itertools
import json
import math
import sys
from fractions import Fraction

import pytest
import torch

from tokentrain.data import target_positions, tokenize_row
from tokentrain.signals.anchors import AnchorTerms
from tokentrain.tasks import familiarity as fam
from tokentrain.tasks import tofu


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------- vector 7 (pure)


def test_vector7_tofu_numbers():
    assert tofu.answer_prob([0.2, 1.0, 0.3]) == pytest.approx(0.606531, abs=1e-6)  # e^-0.5
    r = tofu.truth_ratio(1.0, [1.5, 2.0, 2.5])  # exp(-2) / exp(-1) = e^-1
    assert r == pytest.approx(0.367879, abs=1e-6)
    assert tofu.forget_truth_score(r) == pytest.approx(0.367879, abs=1e-6)
    assert tofu.forget_truth_score(1 / r) == pytest.approx(0.367879, abs=1e-6)  # symmetric in R <-> 1/R
    assert tofu.retain_truth_score(r) == pytest.approx(0.632121, abs=1e-6)
    assert tofu.retain_truth_score(2.0) == 0.0
    arithmetic = sum(math.exp(-x) for x in (1.5, 2.0, 2.5)) / 3 / math.exp(-1.0)
    assert arithmetic == pytest.approx(0.399180, abs=1e-6) and abs(arithmetic - r) > 0.03  # the paper's form differs


def test_vector7_perplexity_and_familiarity():
    assert fam.perplexity([[0.5, 2.0, 1.0]]) == pytest.approx(3.211271, abs=1e-6)  # exp(3.5 / 3)
    assert fam.perplexity([[0.5], [2.0, 1.0]]) == pytest.approx(3.211271, abs=1e-6)  # token mean, not row mean
    completions = ["the Queen said", "a Queenly air", "the queen", "a Rabbit-hole"]
    expects = [["Queen"], ["Queen"], ["Queen"], ["Rabbit"]]
    assert fam.familiarity(completions, expects) == 0.5
    assert fam.mentions("the White\n Rabbit ran", ["White Rabbit"])
    assert fam.anchor_prob([[math.log(0.5), math.log(0.2)], [math.log(0.8)]], [[1], [0]]) == pytest.approx(0.5)
    assert math.isnan(fam.anchor_prob([[0.0]], [[]]))


def _exact_ks_pvalue(x, y):
    """P(D >= d) under H0 by enumerating every split of the pooled sample (no ties)."""
    pooled = sorted(x + y)

    def stat(a):
        b = [v for v in pooled if v not in a]
        return max(
            abs(Fraction(sum(u <= t for u in a), len(a)) - Fraction(sum(u <= t for u in b), len(b))) for t in pooled
        )

    d = stat(x)
    splits = list(itertools.combinations(pooled, len(x)))
    return Fraction(sum(stat(list(s)) >= d for s in splits), len(splits))


def test_ks_pvalue_known_values():
    assert tofu.ks_pvalue([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert tofu.ks_pvalue([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)  # 2 of the C(6,3) = 20 splits
    x, y = [0.1, 0.5, 0.9, 1.3], [0.2, 0.3, 0.4]
    assert _exact_ks_pvalue(x, y) == Fraction(8, 35)
    assert tofu.ks_pvalue(x, y) == pytest.approx(8 / 35)
    # invariant under a strictly monotone map of both samples (TOFU's script tests 1/R, open-unlearning R)
    assert tofu.ks_pvalue([1 / v for v in x], [1 / v for v in y]) == pytest.approx(8 / 35)


def test_forget_quality_errors(monkeypatch, tmp_path, tiny_tokenizer, tiny_model_factory):
    rows = [{"question": "Q?", "answer": "A.", "paraphrased_answer": "B.", "perturbed_answer": ["C."]}]
    model = tiny_model_factory(0)
    with pytest.raises(ValueError, match=r"forget_quality needs retain_model_eval"):
        tofu.evaluate_tofu(model, tiny_tokenizer, rows, forget_quality=True)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(ImportError, match=r"forget_quality needs scipy"):
        tofu.evaluate_tofu(model, tiny_tokenizer, rows, forget_quality=True, retain_model_eval=tmp_path / "m.json")
    monkeypatch.undo()
    (tmp_path / "m.json").write_text(json.dumps({"forget_prob": 0.2}))
    with pytest.raises(KeyError, match=r"m\.json has no 'forget_truth_ratio_values'"):
        tofu.read_truth_ratios(tmp_path / "m.json")


def test_tofu_row_errors():
    rows = [
        {"question": "Q?", "answer": "A.", "paraphrased_answer": "B.", "perturbed_answer": ["C."]},
        {"question": "Q"},
    ]
    with pytest.raises(KeyError, match=r"forget row 1 lacks \['answer', 'paraphrased_answer', 'perturbed_answer'\]"):
        tofu.check_tofu_rows(rows, "forget", truth_ratio=True)
    with pytest.raises(KeyError, match=r"retain row 0 lacks \['paraphrased_answer'\]"):
        tofu.check_tofu_rows([{"question": "Q", "answer": "A", "perturbed_answer": ["x"]}], "retain", True)
    tofu.check_tofu_rows([{"question": "Q", "answer": "A"}], "retain", truth_ratio=False)
    assert tofu.qa_row("Who?", "Me.") == {"prompt": "Question: Who?\nAnswer:", "completion": " Me."}
    assert tofu.qa_row("Who?", "Me.", chat=True)["completion"] == [{"role": "assistant", "content": "Me."}]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "expect": ["X"]}', '{"expect": ["X"]}'], r"line 2: needs a non-empty string `prompt`"),
        (['{"prompt": "a", "expect": []}'], r"line 1: `expect` must be a non-empty list"),
        (['{"prompt": "a", "expect": ["  "]}'], r"line 1: `expect` must be a non-empty list"),
        (['{"prompt": "a", "expect": ["X"]}', "", "{oops"], r"line 3: not a JSON object"),
        ([""], r"no prompt"),
    ],
)
def test_prompt_file_errors(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        fam.load_prompts(path)


def test_shipped_prompts_load():
    from pathlib import Path

    prompts = fam.load_prompts(Path(__file__).resolve().parents[1] / "recipes/unlearning/familiarity_prompts.jsonl")
    assert len(prompts) == 25 and prompts[3]["expect"] == ["Hatter", "Dormouse"]


# ---------------------------------------------------------------------------------------- model-running helpers


def naive_answer_nll(model, tokenizer, row):
    """Mean token NLL of the completion, full logits, the row alone."""
    tokens = tokenize_row(row, tokenizer)
    ids, positions = tokens["input_ids"], target_positions(tokens["labels"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return [-logp[j - 1, ids[j]].item() for j in positions], ids, positions, logp


TOFU_ROWS = [
    {
        "question": f"Where does {name} serve {food} food?",
        "answer": f"{name} serves {food} food in the riverside.",
        "paraphrased_answer": f"In the riverside, {name} has {food} food.",
        "perturbed_answer": [f"{name} serves {f} food in the city centre." for f in ("Indian", "French", "Thai")],
    }
    for name, food in (("Aromi", "Italian"), ("Zizzi", "English"), ("Cotto", "Chinese"))
]


def test_evaluate_tofu_matches_naive(tiny_model_factory, tiny_tokenizer, tmp_path):
    model = tiny_model_factory(3).eval()
    retain = [{"question": "Who is The Mill?", "answer": "The Mill is a pub."}, {"question": "Hi?", "answer": "Yes."}]
    ratios = []
    for r in TOFU_ROWS:
        para = naive_answer_nll(model, tiny_tokenizer, tofu.qa_row(r["question"], r["paraphrased_answer"]))[0]
        perts = [
            naive_answer_nll(model, tiny_tokenizer, tofu.qa_row(r["question"], p))[0] for p in r["perturbed_answer"]
        ]
        mean = [sum(v) / len(v) for v in perts]
        ratios.append(math.exp(-sum(mean) / len(mean)) / math.exp(-sum(para) / len(para)))
    probs = [
        math.exp(-sum(v) / len(v))
        for v in (
            naive_answer_nll(model, tiny_tokenizer, tofu.qa_row(r["question"], r["answer"]))[0] for r in TOFU_ROWS
        )
    ]
    retain_probs = [
        math.exp(-sum(v) / len(v))
        for v in (naive_answer_nll(model, tiny_tokenizer, tofu.qa_row(r["question"], r["answer"]))[0] for r in retain)
    ]
    retain_eval = tmp_path / "retain_metrics.json"
    retain_eval.write_text(json.dumps({tofu.TRUTH_RATIO_VALUES: [0.5, 0.6, 0.7, 0.8]}))
    metrics = tofu.evaluate_tofu(
        model, tiny_tokenizer, TOFU_ROWS, retain, forget_quality=True, retain_model_eval=retain_eval, batch_size=4
    )
    assert metrics["forget_prob"] == pytest.approx(sum(probs) / 3, rel=1e-5)
    assert metrics["retain_prob"] == pytest.approx(sum(retain_probs) / 2, rel=1e-5)
    assert metrics[tofu.TRUTH_RATIO_VALUES] == pytest.approx(ratios, rel=1e-5)
    assert metrics["forget_truth_ratio"] == pytest.approx(sum(min(r, 1 / r) for r in ratios) / 3, rel=1e-5)
    from scipy.stats import ks_2samp

    assert metrics["forget_quality"] == pytest.approx(ks_2samp(ratios, [0.5, 0.6, 0.7, 0.8]).pvalue)


def test_evaluate_book_matches_naive(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory(2).eval()
    anchors = AnchorTerms.from_pairs([("Aromi", "Bistro"), ("Zizzi", "Zed")])
    forget = [
        {"prompt": "", "completion": "Aromi serves Italian food. Zizzi is near Aromi."},
        {"prompt": "", "completion": "The Mill is a pub near Zizzi."},
    ]
    retain = [{"prompt": "", "completion": "Loch Fyne serves French food."}]
    prompts = [{"prompt": "Aromi serves", "expect": ["Italian"]}, {"prompt": "The Eagle is", "expect": ["Zizzi"]}]
    metrics, completions = fam.evaluate_book(model, tiny_tokenizer, prompts, forget, retain, anchors, max_new_tokens=5)

    # greedy decoding written out: BOS + prompt, 5 argmax steps (no EOS in this untrained model's top choices)
    for p, text in zip(prompts, completions):
        ids = [tiny_tokenizer.bos_token_id, *tiny_tokenizer(text=p["prompt"], add_special_tokens=False)["input_ids"]]
        new = []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                new.append(nxt)
                if nxt == tiny_tokenizer.eos_token_id:
                    break
        assert text == tiny_tokenizer.decode(new, skip_special_tokens=True)
    assert metrics["familiarity"] == fam.familiarity(completions, [p["expect"] for p in prompts])

    nlls, probs = [], []
    for row in forget:
        values, ids, positions, logp = naive_answer_nll(model, tiny_tokenizer, row)
        nlls.append(values)
        s = row["completion"] + tiny_tokenizer.eos_token
        offsets = tiny_tokenizer(text=s, return_offsets_mapping=True)["offset_mapping"]
        first_starts = {m.term: m.start for m in reversed(anchors.find(s))}.values()  # each term's first match
        # the token whose span holds a first match's first character; positions with a prefix only
        found = [j for j, (a, b) in enumerate(offsets) if any(a <= st < b for st in first_starts)]
        probs += [math.exp(logp[j - 1, ids[j]].item()) for j in found if j in positions]
    assert len(probs) == 2  # "Zizzi" in row 0 (its "Aromi" opens the row: no prefix) and "Zizzi" in row 1
    assert metrics["anchor_prob"] == pytest.approx(sum(probs) / len(probs), rel=1e-5)
    assert metrics["forget_ppl"] == pytest.approx(math.exp(sum(map(sum, nlls)) / sum(map(len, nlls))), rel=1e-5)
    retain_nll = naive_answer_nll(model, tiny_tokenizer, retain[0])[0]
    assert metrics["retain_ppl"] == pytest.approx(math.exp(sum(retain_nll) / len(retain_nll)), rel=1e-5)
