"""Tests for tokentrain/signals/whp_labels.py (spec specs/unlearning.md sections 2.4-2.6, 6 properties and 9).

The pass (backbones once, only the weighted positions projected, in chunks, rows batched and sorted) is compared with
a naive implementation that runs each row alone through the full models, takes `[T, V]` logits and applies the
formula in float64. Tiny Llamas from conftest (vocab 300, 256 positions): baseline seed 0, reinforced seed 1.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tokentrain.data import target_positions, tokenize_row
from tokentrain.signals.anchors import AnchorTerms, AnchorTermsError, align_row, row_text, tokenize_with_offsets
from tokentrain.signals.whp_labels import score_whp_labels

DICT = AnchorTerms.from_pairs(
    [("Aromi", "Bistro Nine"), ("The Eagle", "Hawk"), ("Zizzi", "Zed"), ("riverside", "shore")]
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tiny_model_factory):
    return tiny_model_factory(0).eval(), tiny_model_factory(1).eval()


@pytest.fixture(scope="module")
def rows(pc_rows):
    extra = [
        {"prompt": "", "completion": "Aromi met The Eagle by the riverside. Aromi left; The Eagle stayed at Zizzi."},
        {"text": "Zizzi and Aromi near the riverside, Zizzi again."},
    ]
    return [*pc_rows[:7], *extra]


def naive_labels(rows, baseline, reinforced, tokenizer, anchors, alpha, rho=0.0):
    """Row by row, full logits (float64), the formula written out; returns (targets, weights, base argmax) per row."""
    out = []
    for example in rows:
        tokens = tokenize_row(example, tokenizer)
        ids, positions = tokens["input_ids"], target_positions(tokens["labels"])
        if anchors is None:
            z_ids, q, repeat, penalty = ids, {j: j for j in positions}, set(), {}
        else:
            s, special = row_text(example, tokenizer)
            s_ids, s_off = tokenize_with_offsets(tokenizer, s, special)
            assert s_ids == ids
            matches = anchors.find(s)
            z_ids, z_off = tokenize_with_offsets(tokenizer, anchors.translate(s, matches), special)
            align = align_row(s_off, z_off, z_ids, matches, anchors.terms)
            q = {j: align.q[j] for j in positions if align.q[j] is not None}
            repeat = {j for j in positions if align.repeat[j]}
            penalty = {j: align.penalty[j] for j in positions}
        with torch.no_grad():
            lb = baseline(input_ids=torch.tensor([z_ids])).logits[0].double()  # (Tz, V)
            lr = reinforced(input_ids=torch.tensor([ids])).logits[0].double()  # (Ts, V)
        targets, weights, tops = [], [], []
        for j in positions:
            if j not in q or j in repeat:
                targets.append(ids[j])
                weights.append(0.0)
                tops.append(None)
                continue
            v_b, v_r = lb[q[j] - 1], lr[j - 1]
            v_g = v_b - alpha * (v_r - v_b).clamp(min=0)
            for t in penalty.get(j, []):
                v_g[t] -= rho
            targets.append(int(v_g.argmax()))
            weights.append(1.0)
            tops.append(int(v_b.argmax()))
        out.append((ids, positions, targets, weights, tops))
    return out


@pytest.mark.parametrize(
    "anchors, alpha, rho, batch_size, chunk_size",
    [(DICT, 5.0, 0.0, 2, 7), (DICT, 1.5, 0.0, 4, 4096), (None, 5.0, 0.0, 3, 5), (DICT, 2.0, 3.0, 2, 6)],
)
def test_labels_match_naive_full_logits(rows, models, tiny_tokenizer, anchors, alpha, rho, batch_size, chunk_size):
    baseline, reinforced = models
    columns, stats = score_whp_labels(
        rows, baseline, reinforced, tiny_tokenizer, anchors, alpha, rho, batch_size=batch_size, chunk_size=chunk_size
    )
    ref = naive_labels(rows, baseline, reinforced, tiny_tokenizer, anchors, alpha, rho)
    weighted = changed = flipped = 0
    for i, (ids, positions, targets, weights, tops) in enumerate(ref):
        assert columns["completion_ids"][i] == [ids[j] for j in positions]
        assert columns["prompt_ids"][i] == [t for p, t in enumerate(ids) if p not in positions]
        assert columns["token_weights"][i] == weights, i
        assert columns["target_ids"][i] == targets, i
        for j, t, w, top in zip(positions, targets, weights, tops):
            if w:
                weighted += 1
                changed += t != ids[j]
                flipped += t != top
    assert stats["rows"] == len(rows) and stats["weighted"] == weighted
    assert stats["changed"] == pytest.approx(changed / weighted) and stats["flipped"] == pytest.approx(
        flipped / weighted
    )
    assert 0 < stats["changed"] < 1 and stats["flipped"] > 0  # a real test: reinforcement moved some labels
    if anchors is None:
        assert stats["anchor_matches"] == 0 and all(all(w) for w in columns["token_weights"])
    if rho > 0:  # guard: rule (b) changed some labels here, so the comparison covers it
        plain, _ = score_whp_labels(rows, baseline, reinforced, tiny_tokenizer, anchors, alpha, 0.0)
        assert plain["target_ids"] != columns["target_ids"]


def test_stats_term_first_and_leak(rows, models, tiny_tokenizer):
    baseline, reinforced = models
    columns, stats = score_whp_labels(rows, baseline, reinforced, tiny_tokenizer, DICT, 5.0)
    term_first = leak = 0
    for example, targets, weights in zip(rows, columns["target_ids"], columns["token_weights"]):
        s, special = row_text(example, tiny_tokenizer)
        s_ids, s_off = tokenize_with_offsets(tiny_tokenizer, s, special)
        align = align_row(s_off, s_off, s_ids, DICT.find(s), DICT.terms)
        index = {j: k for k, j in enumerate(target_positions(tokenize_row(example, tiny_tokenizer)["labels"]))}
        for j, first in enumerate(align.term_first):
            if first and j in index and weights[index[j]]:
                term_first += 1
                leak += targets[index[j]] == s_ids[j]
    assert stats["term_first"] == term_first > 0
    assert stats["leak"] == pytest.approx(leak / term_first)
    assert columns["n_anchor_matches"] == [len(DICT.find(row_text(r, tiny_tokenizer)[0])) for r in rows]
    assert stats["anchor_matches"] == sum(columns["n_anchor_matches"]) > 0


def test_alpha_zero_without_dictionary_is_baseline_argmax(rows, models, tiny_tokenizer):
    """alpha = 0, no dictionary: target = argmax of the baseline on s, every position with a prefix weighted."""
    baseline, reinforced = models
    columns, _ = score_whp_labels(rows, baseline, reinforced, tiny_tokenizer, None, alpha=0.0)
    for example, targets, weights in zip(rows, columns["target_ids"], columns["token_weights"]):
        tokens = tokenize_row(example, tiny_tokenizer)
        with torch.no_grad():
            logits = baseline(input_ids=torch.tensor([tokens["input_ids"]])).logits[0]
        assert targets == [int(logits[j - 1].argmax()) for j in target_positions(tokens["labels"])]
        assert all(w == 1.0 for w in weights)


def test_reinforced_equal_to_baseline_gives_baseline_argmax(rows, models, tiny_tokenizer):
    baseline, _ = models
    for alpha in (0.0, 5.0):
        a, _ = score_whp_labels(rows, baseline, baseline, tiny_tokenizer, DICT, alpha=alpha)
        b, _ = score_whp_labels(rows, baseline, copy.deepcopy(baseline), tiny_tokenizer, DICT, alpha=0.0)
        assert a["target_ids"] == b["target_ids"]


def test_chat_rows_are_aligned_on_the_rendered_template(models, tiny_tokenizer):
    baseline, reinforced = models
    row = {"messages": [{"role": "user", "content": "Who is Aromi?"}, {"role": "assistant", "content": "Aromi is."}]}
    columns, _ = score_whp_labels([row], baseline, reinforced, tiny_tokenizer, DICT, 5.0)
    ref = naive_labels([row], baseline, reinforced, tiny_tokenizer, DICT, 5.0)[0]
    assert columns["target_ids"][0] == ref[2] and columns["token_weights"][0] == ref[3]
    assert columns["n_anchor_matches"] == [2] and 0.0 in ref[3]  # the second "Aromi" is zeroed (rule (a))


# ------------------------------------------------------------------------------------------------------- errors


def test_models_with_different_vocabularies_are_refused(rows, tiny_model_factory, tiny_tokenizer):
    baseline, reinforced = tiny_model_factory(0), tiny_model_factory(1)
    baseline.config._name_or_path, reinforced.config._name_or_path = "runs/base", "runs/reinforced"
    reinforced.resize_token_embeddings(320)
    with pytest.raises(
        ValueError, match=r"baseline 'runs/base' has 300 logits .* reinforced 'runs/reinforced' has 320"
    ):
        score_whp_labels(rows[:1], baseline, reinforced, tiny_tokenizer)
    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match=r"'runs/base' and reinforced .* first differing id 300: None vs '<extra>'"):
        score_whp_labels(rows[:1], baseline, tiny_model_factory(1), tiny_tokenizer, reinforced_tokenizer=other)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": -1.0}, r"alpha must be a finite number >= 0, got -1\.0"),
        ({"alpha": math.nan}, r"alpha must be a finite number >= 0, got nan"),
        ({"alpha": math.inf}, r"alpha must be a finite number >= 0, got inf"),
        ({"repeat_penalty": -0.5}, r"repeat_penalty must be a finite number >= 0, got -0\.5"),
    ],
)
def test_bad_settings(rows, models, tiny_tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        score_whp_labels(rows[:1], *models, tiny_tokenizer, DICT, **kwargs)


def test_rows_longer_than_the_model_are_errors(models, tiny_tokenizer):
    long_row = {"prompt": "", "completion": "Aromi " * 300}
    with pytest.raises(ValueError, match=r"row 1 has \d+ tokens \(original text\) but the models read at most 256"):
        score_whp_labels([{"prompt": "", "completion": "Aromi."}, long_row], *models, tiny_tokenizer, DICT)
    # fits as written, too long once translated ("Aromi" -> "Bistro Nine" has more tokens)
    n = len(tiny_tokenizer(text="Aromi " * 60)["input_ids"])
    k = 60 * 250 // n
    row = {"prompt": "", "completion": "Aromi " * k}
    assert len(tokenize_row(row, tiny_tokenizer)["input_ids"]) <= 256
    with pytest.raises(ValueError, match=r"row 0 has \d+ tokens \(translated text\)"):
        score_whp_labels([row], *models, tiny_tokenizer, DICT)


def test_empty_completion_no_match_and_slow_tokenizer(rows, models, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"row 1: the completion tokenises to nothing"):
        score_whp_labels([rows[0], {"text": ""}], *models, tiny_tokenizer, DICT)
    nothing = AnchorTerms.from_pairs([("Gryphon", "eagle")], source="terms.yaml")
    with pytest.raises(AnchorTermsError, match=r"terms\.yaml: no term of the dictionary occurs in the forget rows"):
        score_whp_labels(rows, *models, tiny_tokenizer, nothing)

    class SlowTokenizer:
        is_fast = False

        def __init__(self, tok):
            self._tok = tok

        def __len__(self):
            return len(self._tok)

        def __call__(self, *args, **kwargs):
            return self._tok(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._tok, name)

    with pytest.raises(ValueError, match=r"need a fast tokenizer \(character offsets\)"):
        score_whp_labels(rows, *models, SlowTokenizer(tiny_tokenizer), DICT)
    score_whp_labels(rows[:2], *models, SlowTokenizer(tiny_tokenizer), None)  # no dictionary: no offsets needed
