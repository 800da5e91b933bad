"""The `tokentrain inspect` heat map: one span per token with its value on hover, escaping, scales, clear errors.

The pages are parsed back with the standard library's HTMLParser, so the checks see what a browser sees (titles and
texts unescaped) rather than matching raw markup.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from datasets import Dataset

from tokentrain.heatmap import (
    BLUE,
    PURPLE,
    RED,
    REDS,
    WHITE,
    choose_scale,
    effective_weights,
    render_heatmap,
    write_heatmap,
)
from tokentrain.models import train_tokenizer

TEXTS = ["the cat sat on the mat.", "a dog ran\nto the park.", "<b>bold</b> & 'quotes'\tand tabs"] * 4


@pytest.fixture(scope="module")
def tok():
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    tokenizer.add_tokens(["<script>"])  # one token whose text is markup
    return tokenizer


class Page(HTMLParser):
    """Collects, per row block, the token spans as (classes, title, text), its header and its sides (a pair's chosen
    and rejected responses: label text and spans), plus the legend's attributes and the summary's text."""

    def __init__(self, page: str):
        super().__init__()
        self.rows: dict[int, list[dict]] = {}
        self.sides: dict[int, list[dict]] = {}
        self.headers: dict[int, str] = {}
        self.legend: dict = {}
        self.summary = ""
        self._row, self._span, self._in, self._side = None, None, None, None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = a.get("class", "").split()
        if tag == "div" and a.get("id", "").startswith("row-"):
            self._row = int(a["id"][4:])
            self.rows[self._row], self.sides[self._row], self.headers[self._row] = [], [], ""
        elif tag == "div" and a.get("id") == "legend":
            self.legend = a
        elif tag == "table" and a.get("id") == "summary":
            self._in = "summary"
        elif tag == "div" and "side" in classes:
            self._side = {"label": "", "spans": []}
            self.sides[self._row].append(self._side)
        elif tag == "div" and ("lab" in classes or "hdr" in classes):
            self._in = "lab" if "lab" in classes else "hdr"
        elif tag == "span" and "t" in classes:
            self._span = {"classes": classes, "title": a["title"], "style": a["style"], "text": ""}
            self.rows[self._row].append(self._span)
            if self._side is not None:
                self._side["spans"].append(self._span)

    def handle_endtag(self, tag):
        if tag == "span" and self._span is not None:
            self._span = None
        elif tag == "table" or (tag == "div" and self._in in ("lab", "hdr")):
            self._in = None

    def handle_data(self, data):
        if self._span is not None:
            self._span["text"] += data
        if self._in == "summary":
            self.summary += data + " "
        elif self._in == "lab":
            self._side["label"] += data
        elif self._in == "hdr":
            self.headers[self._row] += data


def _hex(rgb):
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _rows(tok, texts, weights):
    return [
        {"prompt": f"<s>prompt {i}<sep>", "completion_ids": tok(t)["input_ids"], "token_weights": w}
        for i, (t, w) in enumerate(zip(texts, weights))
    ]


def _weights(n, first):
    # cycle 0.25, 1.0, 1.75 starting at `first`: min 0.25, max 1.75 overall
    cycle = [0.25, 1.0, 1.75]
    return [cycle[(first + k) % 3] for k in range(n)]


@pytest.fixture(scope="module")
def weighted(tok):
    texts = ["the cat sat on the mat.", "a dog ran\nto the park.", "the mat."]
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    return Dataset.from_list(_rows(tok, texts, [_weights(n, i) for i, n in enumerate(lengths)]))


def test_one_span_per_token_with_value_id_and_text_in_title(tok, weighted):
    page = Page(render_heatmap(weighted, tok, "token_weights"))
    assert sorted(page.rows) == [0, 1, 2]
    for i, spans in page.rows.items():
        ids, weights = weighted[i]["completion_ids"], weighted[i]["token_weights"]
        assert len(spans) == len(ids)
        for span, tid, w in zip(spans, ids, weights):
            value, id_part, _ = span["title"].split(" · ", 2)
            assert float(value) == w and id_part == f"id {tid}"
        # the spans read back as the decoded row, once the newline marker is undone
        assert "".join(s["text"] for s in spans).replace("⏎", "\n") == tok.decode(ids)


def test_weights_scale_is_white_at_one_and_legend_has_min_max(tok, weighted):
    page = Page(render_heatmap(weighted, tok, "token_weights"))
    assert (page.legend["data-min"], page.legend["data-max"]) == ("0.25", "1.75")
    assert page.legend["data-kind"] == "relative"
    all_w = [w for ws in weighted["token_weights"] for w in ws]
    assert f"tokens {len(all_w)}" in page.summary and "rows shown 3 of 3" in page.summary
    assert f"mean {sum(all_w) / len(all_w):.4g} · min 0.25 · max 1.75" in page.summary
    spans = page.rows[0]
    # weight 1.0 is neutral -> white; 1.75 is the max -> full red; 0.25 -> 3/4 of the way from white to blue
    by_value = {float(s["title"].split(" · ")[0]): s["style"] for s in spans}
    assert by_value[1.0].startswith("background:#ffffff")
    assert by_value[1.75].startswith(f"background:{_hex(RED)}")
    three_quarters_blue = tuple(round(255 + (c - 255) * 0.75) for c in BLUE)
    assert by_value[0.25].startswith(f"background:{_hex(three_quarters_blue)}")


def test_scales_follow_the_value_range():
    assert choose_scale("ref_logps", [-3.0, -0.5, 0.0]).kind == "logprob"
    assert choose_scale("ref_logps", [0.0, 0.0]).kind == "logprob"  # all-certain log-probs stay log-probs
    assert choose_scale("token_weights", [0.0, 0.0]).kind == "weight"  # all-masked weights stay weights
    assert choose_scale("rejected_weights", [0.1, 0.99, 1.0]).kind == "weight"
    assert choose_scale("token_weights", [0.5, 1.5]).kind == "relative"  # PRIOR's mean-1 weights
    signed = choose_scale("score", [-2.0, 0.5, math.nan])  # nan is ignored
    assert signed.kind == "signed" and (signed.lo, signed.hi) == (-2.0, 0.5)
    assert [v for v, _ in signed.stops] == [-2.0, 0.0, 2.0]  # symmetric around 0


def test_logprob_scale_white_at_zero_darkest_at_min(tok):
    ids = tok("the cat sat")["input_ids"]
    logps = [-(k % 3) * 2.0 for k in range(len(ids))]  # 0, -2, -4, 0, ...
    page = Page(render_heatmap([{"completion_ids": ids, "ref_logps": logps}], tok, "ref_logps"))
    assert (page.legend["data-min"], page.legend["data-max"]) == ("-4", "0")
    styles = {float(s["title"].split(" · ")[0]): s["style"] for s in page.rows[0]}
    assert styles[0.0].startswith("background:#ffffff")
    assert styles[-4.0].startswith(f"background:{_hex(PURPLE)};color:#fff")


def test_everything_is_escaped_and_the_page_is_self_contained(tok):
    script = tok.convert_tokens_to_ids("<script>")
    ids = [script, *tok(" <b>&'x\"")["input_ids"]]
    rows = [{"prompt": "<script>alert(1)</script>", "completion_ids": ids, "token_weights": [1.0] * len(ids)}]
    html = render_heatmap(rows, tok, "token_weights", title="<i>title</i>")
    assert "<script" not in html.lower() and "<b>" not in html and "<i>" not in html
    assert "&lt;script&gt;" in html and "&lt;i&gt;title&lt;/i&gt;" in html
    for bad in ("http:", "https:", "<link", "@import", "url(", "src="):  # nothing loaded from outside
        assert bad not in html
    spans = Page(html).rows[0]
    assert spans[0]["text"] == "<script>" and '"<script>"' in spans[0]["title"]
    assert "".join(s["text"] for s in spans) == "<script>" + tok.decode(ids[1:])


def test_whitespace_is_visible_but_faithful(tok):
    ids = tok("a dog\n\tran  to")["input_ids"]
    html = render_heatmap([{"completion_ids": ids, "token_weights": [1.0] * len(ids)}], tok, "token_weights")
    assert "⏎<br>" in html  # newline: a marker and a real line break
    texts = [s["text"] for s in Page(html).rows[0]]
    assert "⏎" in texts and "⇥\t" in "".join(texts) and " " in "".join(texts)  # spaces kept as spaces
    assert "".join(texts).replace("⏎", "\n").replace("⇥", "") == tok.decode(ids)


def test_partial_utf8_token_shows_replacement_character(tok):
    ids = tok("日")["input_ids"]  # 3 UTF-8 bytes, not in the training texts: split into byte tokens
    assert len(ids) > 1
    spans = Page(render_heatmap([{"completion_ids": ids, "token_weights": [0.5] * len(ids)}], tok, "token_weights"))
    assert all("\ufffd" in s["text"] and "part of a UTF-8 character" in s["title"] for s in spans.rows[0])


def test_rejected_weights_default_to_rejected_ids_beside_the_chosen_response(tok):
    rej = [tok("the dog sat.")["input_ids"], tok("a cat.")["input_ids"]]
    ds = Dataset.from_list(
        [
            {"prompt": "p", "chosen_ids": [5], "rejected_ids": r, "rejected_weights": [0.9] * (len(r) - 1) + [1.0]}
            for r in rej
        ]
    )
    page = Page(render_heatmap(ds, tok, "rejected_weights"))
    for i in (0, 1):
        chosen, rejected = page.sides[i]
        assert chosen["label"] == "chosen · not scored" and rejected["label"] == "rejected"  # chosen on the left
        assert [len(chosen["spans"]), len(rejected["spans"])] == [1, len(rej[i])]
        assert chosen["spans"][0]["title"].startswith("not scored")
    assert page.legend["data-min"] == "0.9" and page.legend["data-max"] == "1"


def test_other_columns_use_ids_column(tok):
    ids = tok("the cat")["input_ids"]
    rows = [{"chosen_ids": ids, "score": [-1.0] * len(ids)}]
    with pytest.raises(KeyError, match="'completion_ids'.*'score'.*chosen_ids"):  # default ids column is absent
        render_heatmap(rows, tok, "score")
    assert len(Page(render_heatmap(rows, tok, "score", ids_column="chosen_ids")).rows[0]) == len(ids)


def test_rows_and_max_rows(tok, weighted):
    assert sorted(Page(render_heatmap(weighted, tok, "token_weights", max_rows=2)).rows) == [0, 1]
    page = Page(render_heatmap(weighted, tok, "token_weights", rows=[2, 0]))
    assert list(page.rows) == [2, 0] and "rows shown 2 of 3" in page.summary


def test_non_finite_values_are_grey_and_left_out_of_the_statistics(tok):
    ids = tok("the cat")["input_ids"][:2]
    page = Page(render_heatmap([{"completion_ids": ids, "token_weights": [None, 0.5]}], tok, "token_weights"))
    assert "bad" in page.rows[0][0]["classes"] and page.rows[0][0]["title"].startswith("nan")
    assert "mean 0.5 · min 0.5 · max 0.5" in page.summary and "1 non-finite" in page.summary


def test_errors_name_the_problem(tok, weighted):
    with pytest.raises(KeyError, match=r"no column 'chosen_weights'.*\['prompt', 'completion_ids', 'token_weights'\]"):
        render_heatmap(weighted, tok, "chosen_weights")
    with pytest.raises(KeyError, match="no ids column 'rejected_ids'"):
        render_heatmap(weighted.rename_column("token_weights", "rejected_weights"), tok, "rejected_weights")
    with pytest.raises(IndexError, match="row 3 is out of range: the dataset has 3 rows"):
        render_heatmap(weighted, tok, "token_weights", rows=[0, 3])
    with pytest.raises(IndexError, match="row -1"):
        render_heatmap(weighted, tok, "token_weights", rows=[-1])
    rows = weighted.to_list()
    rows[1]["token_weights"] = rows[1]["token_weights"][:-1]
    n = len(rows[1]["completion_ids"])
    with pytest.raises(ValueError, match=f"row 1: 'token_weights' has {n - 1} values but 'completion_ids' has {n} ids"):
        render_heatmap(rows, tok, "token_weights")
    rows[1]["token_weights"] = 0.5
    with pytest.raises(ValueError, match="row 1: 'token_weights' is not a per-token list"):
        render_heatmap(rows, tok, "token_weights")


def test_write_heatmap_writes_the_page_and_keeps_old_file_on_error(tok, weighted, tmp_path):
    out = write_heatmap(weighted, tok, "token_weights", tmp_path / "sub" / "heat.html", max_rows=1)
    assert out == tmp_path / "sub" / "heat.html"
    assert sorted(Page(out.read_text(encoding="utf-8")).rows) == [0]
    with pytest.raises(KeyError):
        write_heatmap(weighted, tok, "nope", out)
    assert sorted(Page(out.read_text(encoding="utf-8")).rows) == [0]  # untouched
    assert [p.name for p in out.parent.iterdir()] == ["heat.html"]  # no temporary left behind


# ------------------------------------------------------------------------------------ scales for weights in [0, 1]


def test_weights_in_unit_interval_are_sequential_white_to_red_so_high_weights_stand_out(tok):
    ids = tok("the cat sat on")["input_ids"][:3]
    page = Page(render_heatmap([{"completion_ids": ids, "token_weights": [0.0, 0.5, 1.0]}], tok, "token_weights"))
    assert page.legend["data-kind"] == "weight"
    styles = [s["style"] for s in page.rows[0]]
    assert styles[0] == f"background:{_hex(WHITE)};color:#000"  # weight 0: ignored, white
    assert styles[1] == f"background:{_hex(REDS[0])};color:#000"  # the middle stop
    assert styles[2] == f"background:{_hex(REDS[1])};color:#fff"  # full weight: darkest, white text
    # the scale is fixed to [0, 1] whatever the data range: 0.25 is a quarter of the way whoever else is shown
    low = Page(render_heatmap([{"completion_ids": ids[:1], "token_weights": [0.25]}], tok, "token_weights"))
    quarter = tuple(round(255 + (c - 255) * 0.5) for c in REDS[0])  # halfway from white to the 0.5 stop
    assert low.rows[0][0]["style"].startswith(f"background:{_hex(quarter)}")


def test_signed_signals_keep_a_diverging_scale(tok):
    ids = tok("the cat")["input_ids"][:2]
    page = Page(render_heatmap([{"completion_ids": ids, "excess": [-3.0, 1.5]}], tok, "excess"))
    assert page.legend["data-kind"] == "signed"
    half_red = tuple(round(255 + (c - 255) * 0.5) for c in RED)  # 1.5 of the symmetric span 3: halfway to red
    assert [s["style"][:18] for s in page.rows[0]] == [f"background:{_hex(BLUE)}", f"background:{_hex(half_red)}"]


def test_special_tokens_are_faded_and_named(tok):
    eos = tok.convert_tokens_to_ids("</s>")
    ids = [*tok("the cat")["input_ids"], eos]
    html = render_heatmap([{"completion_ids": ids, "token_weights": [0.5] * len(ids)}], tok, "token_weights")
    spans = Page(html).rows[0]
    assert "sp" in spans[-1]["classes"] and "(special token)" in spans[-1]["title"]
    assert not any("sp" in s["classes"] for s in spans[:-1])
    assert ".sp{opacity:.45" in html  # drawn faded (the browser test checks the computed style)


def test_legend_end_labels_stay_inside_the_bar():
    html = render_heatmap([{"completion_ids": [1, 2], "ref_logps": [-12.3456, 0.0]}], _Identity(), "ref_logps")
    assert '<span class="first" style="left:0.0%">-12.35</span>' in html
    assert '<span class="last" style="left:100.0%">0</span>' in html
    assert ".ends span.first{transform:none}" in html and ".ends span.last{transform:translateX(-100%)}" in html


class _Identity:
    """A tokenizer stand-in whose token i reads as `t<i>`; ids 0 and 1 are special."""

    all_special_ids = [0, 1]

    def decode(self, ids):
        return "".join(f"t{i}" for i in ids)


# ------------------------------------------------------------------------------------ preference rows


def _pairs(tok, n=3):
    """Preference rows like a contrastive score's output: the rejected response departs from the chosen one at a
    known token, its weights peak there; gold answers and texts for the grader."""
    rows = []
    for i in range(n):
        chosen, rejected = f"A:{10 + i}", f"A:{10 + i}9"  # rejected = chosen + one more digit
        c, r = tok(chosen)["input_ids"], tok(rejected)["input_ids"]
        k = next((j for j, (x, y) in enumerate(zip(c, r)) if x != y), min(len(c), len(r)))
        weights = [0.05] * len(r)
        weights[k] = 0.2 * (i + 1)  # row 2 has the largest peak, row 0 the smallest
        rows.append(
            {
                "prompt": f"Q:{i}",
                "chosen": chosen,
                "rejected": rejected,
                "gold": str(10 + i),
                "chosen_ids": c,
                "rejected_ids": r,
                "rejected_weights": weights,
                "k": k,
            }
        )
    return rows


def test_pairs_mark_the_first_divergent_token_on_both_sides_and_show_the_gold_answer(tok):
    rows = _pairs(tok)
    page = Page(render_heatmap(rows, tok, "rejected_weights"))
    for i, row in enumerate(rows):
        chosen, rejected = page.sides[i]
        assert "".join(s["text"] for s in chosen["spans"]) == row["chosen"]
        assert "".join(s["text"] for s in rejected["spans"]) == row["rejected"]
        k = row["k"]
        for side in (chosen, rejected):
            marked = [j for j, s in enumerate(side["spans"]) if "div" in s["classes"]]
            assert marked == ([k] if k < len(side["spans"]) else [])
        assert f"first divergent token: position {k}" in page.headers[i]
        assert f"gold answer {row['gold']}" in page.headers[i]
        assert rejected["spans"][k]["style"] != chosen["spans"][0]["style"]  # the rejected side is coloured


def test_pairs_colour_the_other_side_by_its_own_weights_and_grade_with_a_task(tok):
    rows = _pairs(tok, 2)
    for r in rows:
        r["chosen_weights"] = [1.0] * len(r["chosen_ids"])
    page = Page(render_heatmap(rows, tok, "rejected_weights", task="arithmetic"))
    chosen, rejected = page.sides[0]
    assert chosen["label"] == "chosen · answer 10: correct"
    assert rejected["label"] == "rejected · answer 109: wrong"
    assert all(s["style"].startswith(f"background:{_hex(REDS[1])}") for s in chosen["spans"])  # weight 1
    with pytest.raises(ValueError, match="task must be one of"):
        render_heatmap(rows, tok, "rejected_weights", task="chess")
    for r in rows:
        del r["gold"]
    with pytest.raises(KeyError, match="no column 'gold'"):
        render_heatmap(rows, tok, "rejected_weights", task="arithmetic")


def test_sort_by_max_or_mean_and_pick_rows(tok):
    rows = _pairs(tok, 3)
    # peaks: row 0 0.2, row 1 0.4, row 2 0.6 (other tokens 0.05); then row 0 becomes 0.5 everywhere
    rows[0]["rejected_weights"] = [0.5] * len(rows[0]["rejected_ids"])  # max 0.5 (second), mean 0.5 (first)
    assert list(Page(render_heatmap(rows, tok, "rejected_weights", sort="max")).rows) == [2, 0, 1]
    assert list(Page(render_heatmap(rows, tok, "rejected_weights", sort="mean")).rows) == [0, 2, 1]
    assert list(Page(render_heatmap(rows, tok, "rejected_weights", sort="index")).rows) == [0, 1, 2]
    assert list(Page(render_heatmap(rows, tok, "rejected_weights", sort="max", max_rows=1)).rows) == [2]
    picked = Page(render_heatmap(rows, tok, "rejected_weights", rows=[1, 0], sort="max"))
    assert list(picked.rows) == [0, 1] and "rows shown 2 of 3 (largest value first)" in picked.summary
    assert list(Page(render_heatmap(rows, tok, "rejected_weights", rows=[1, 0])).rows) == [1, 0]  # as given
    with pytest.raises(ValueError, match="sort must be one of"):
        render_heatmap(rows, tok, "rejected_weights", sort="median")


def test_sorting_leaves_special_tokens_out(tok):
    eos = tok.convert_tokens_to_ids("</s>")
    rows = _pairs(tok, 3)
    for r in rows:  # every row ends with the end token at weight 1 (the contrastive EOS rule): no row's max
        r["rejected_ids"].append(eos)
        r["rejected_weights"].append(1.0)
    assert list(Page(render_heatmap(rows, tok, "rejected_weights", sort="max")).rows) == [2, 1, 0]


# ------------------------------------------------------------------------------------ effective weights


def test_effective_prior_weights_are_the_trainers_normalised_weights():
    # p_ref = [0.5, 0.75, 0.9, 0.0001] -> u = 1 - p = [0.5, 0.25, 0.1, 0.9999], sum 1.8499; w = 4 u / 1.8499
    p = [0.5, 0.75, 0.9, 0.0001]
    rows = [{"completion_ids": [5, 6, 7, 8], "ref_logps": [math.log(x) for x in p]}]
    values, note = effective_weights(rows, "ref_logps", "prior")
    assert values[0] == pytest.approx([4 * 0.5 / 1.8499, 4 * 0.25 / 1.8499, 4 * 0.1 / 1.8499, 4 * 0.9999 / 1.8499])
    assert sum(values[0]) == pytest.approx(4.0) and "PRIOR" in note
    squared, _ = effective_weights(rows, "ref_logps", "prior", prior_alpha=2.0)  # u = (1 - p)^2
    u2 = [(1 - x) ** 2 for x in p]
    assert squared[0] == pytest.approx([4 * u / sum(u2) for u in u2])
    page = Page(render_heatmap(rows, _Identity(), "ref_logps", values=values, values_note=note))
    assert page.legend["data-kind"] == "relative" and "PRIOR" in page.summary  # around 1, not a log-prob scale


def test_effective_weights_of_stored_weights_are_the_stored_values_and_bad_requests_are_named():
    assert effective_weights([], "rejected_weights")[0] is None
    with pytest.raises(ValueError, match="need weighting prior or rho1"):
        effective_weights([], "ref_logps")
    with pytest.raises(ValueError, match="defined for ref_logps"):
        effective_weights([], "score", "prior")
    with pytest.raises(ValueError, match="policy model"):
        effective_weights([{"ref_logps": [0.0]}], "ref_logps", "rho1")


def test_effective_rho1_selection_keeps_the_top_excess_loss_tokens(
    tiny_tokenizer, tiny_model_factory, pc_rows, one_thread
):
    import torch

    from tokentrain.data import tokenize_row
    from tokentrain.signals.ref_logps import score_ref_logps

    ref, policy = tiny_model_factory(0), tiny_model_factory(1)
    ids, ref_logps = score_ref_logps(Dataset.from_list(pc_rows), ref, tiny_tokenizer)
    scored = Dataset.from_list(
        [{**r, "completion_ids": i, "ref_logps": lp} for r, i, lp in zip(pc_rows, ids, ref_logps)]
    )
    values, note = effective_weights(
        scored, "ref_logps", "rho1", rows=[0, 3, 11], rho1_ratio=0.5, policy=policy, tokenizer=tiny_tokenizer
    )
    assert sorted(values) == [0, 3, 11] and "Rho-1" in note
    policy = policy.double()
    for i in (0, 3, 11):
        # naive reference: float64 forward, log-softmax, the policy's log-prob of each completion token
        row = tokenize_row(pc_rows[i], tiny_tokenizer)
        input_ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
        with torch.no_grad():
            logps = policy(input_ids).logits[0, :-1].log_softmax(-1)
        targets = [p for p in range(1, len(labels)) if labels[p] != -100]
        policy_logp = [logps[p - 1, labels[p]].item() for p in targets]
        excess = [-lp + r for lp, r in zip(policy_logp, scored[i]["ref_logps"])]
        n = math.ceil(0.5 * len(excess))
        top = sorted(range(len(excess)), key=lambda j: -excess[j])[:n]
        assert values[i] == [1.0 if j in top else 0.0 for j in range(len(excess))]
    bad = scored.to_list()
    bad[3]["completion_ids"] = [bad[3]["completion_ids"][0] + 1, *bad[3]["completion_ids"][1:]]
    with pytest.raises(ValueError, match="row 3: the policy's completion tokens differ .* at position 0"):
        effective_weights(bad, "ref_logps", "rho1", rows=[3], policy=tiny_model_factory(1), tokenizer=tiny_tokenizer)


# ------------------------------------------------------------------------------------ the page in a real browser


class _Chromium:
    """Headless Chromium driven through chromedriver's W3C WebDriver HTTP API (no client library needed)."""

    def __init__(self):
        import socket
        import subprocess

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            ["chromedriver", f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(200):
            try:
                self._call("GET", "/status")
                break
            except OSError:
                time.sleep(0.05)
        options = {
            "binary": shutil.which("chromium"),
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1200,900",
            ],
        }
        caps = {"browserName": "chrome", "goog:chromeOptions": options, "goog:loggingPrefs": {"browser": "ALL"}}
        self.session = (
            "/session/" + self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        )

    def _call(self, method, path, body=None):
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["value"]

    def open(self, path):
        self._call("POST", self.session + "/url", {"url": Path(path).resolve().as_uri()})

    def js(self, script):
        return self._call("POST", self.session + "/execute/sync", {"script": script, "args": []})

    def screenshot(self):
        import base64
        import io

        from PIL import Image

        return Image.open(io.BytesIO(base64.b64decode(self._call("GET", self.session + "/screenshot")))).convert("RGB")

    def errors(self):
        """The browser's SEVERE log entries since the last call: script errors, blocked loads, CSP violations."""
        return [
            e["message"]
            for e in self._call("POST", self.session + "/se/log", {"type": "browser"})
            if e["level"] == "SEVERE"
        ]

    def close(self):
        try:
            self._call("DELETE", self.session)
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
def test_the_page_renders_in_headless_chromium_without_script_errors(tok, tmp_path):
    eos = tok.convert_tokens_to_ids("</s>")
    rows = _pairs(tok, 4)
    for r in rows:  # the end token TRL appends, full weight by the contrastive EOS rule
        r["chosen_ids"].append(eos)
        r["rejected_ids"].append(eos)
        r["rejected_weights"].append(1.0)
    pairs = write_heatmap(rows, tok, "rejected_weights", tmp_path / "pairs.html", task="arithmetic", sort="max")
    ids = tok("a dog ran\nto the park.")["input_ids"]
    logps = write_heatmap(  # long legend labels at both ends of the bar
        [{"completion_ids": ids, "ref_logps": [-12.3456789 * (k % 2) for k in range(len(ids))]}],
        tok,
        "ref_logps",
        tmp_path / "logps.html",
    )
    broken = tmp_path / "broken.html"  # checks the check: a page with a script error must be caught
    broken.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefined_function()</script></body></html>")

    browser = _Chromium()
    try:
        browser.open(broken)
        assert any("undefined_function" in e for e in browser.errors())

        browser.open(pairs)
        assert browser.errors() == []  # no script error, nothing blocked or missing
        shot = browser.screenshot()
        colours = shot.getcolors(maxcolors=1 << 20)
        assert len(colours) > 50  # text, weights and legend, not a blank page
        red = sum(n for n, (r, g, b) in colours if r - g > 80)
        assert red > 1000  # the weighted tokens and the legend bar are drawn in the weights' reds
        layout = browser.js(
            """
            const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.right, r.top, r.bottom]; };
            const sides = document.querySelectorAll('#row-0 .side');
            return {
              width: document.documentElement.clientWidth,
              scroll: document.documentElement.scrollWidth,
              sides: [...sides].map(box),
              labels: [...document.querySelectorAll('.ends span')].map(box),
              ends: box(document.querySelector('.ends')),
              special: getComputedStyle(document.querySelector('.sp')).opacity,
              mark: getComputedStyle(document.querySelector('.div')).outlineStyle,
            };
            """
        )
        assert layout["scroll"] <= layout["width"]  # nothing sticks out sideways
        (cl, cr, ct, _), (rl, _, rt, _) = layout["sides"]
        assert cr <= rl and ct == rt  # chosen beside rejected, on one line
        assert float(layout["special"]) < 1 and layout["mark"] == "solid"

        browser.open(logps)
        assert browser.errors() == []
        layout = browser.js(
            """
            const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.right]; };
            return {labels: [...document.querySelectorAll('.ends span')].map(box),
                    ends: box(document.querySelector('.ends')), text: document.querySelector('.ends').innerText};
            """
        )
        left, right = layout["ends"]
        assert all(left - 0.5 <= a and b <= right + 0.5 for a, b in layout["labels"]), layout  # legend not clipped
        assert "-12.35" in layout["text"]
    finally:
        browser.close()


# ------------------------------------------------------------------------------------ tokentrain inspect


@pytest.fixture
def scored_folder(tmp_path, tiny_tokenizer, tiny_model_dir, pc_rows):
    """A saved dataset like a ref_logps score's output: completion_ids, ref_logps, and signal_meta naming the
    tokenizer."""
    from tokentrain.data import completion_ids_of, tokenize_row

    rows = []
    for i, r in enumerate(pc_rows[:4]):
        row = tokenize_row(r, tiny_tokenizer)
        ids = completion_ids_of(row["input_ids"], row["labels"])
        rows.append({**r, "completion_ids": ids, "ref_logps": [-0.1 * (i + 1) * (k % 3) for k in range(len(ids))]})
    folder = tmp_path / "scored"
    Dataset.from_list(rows).save_to_disk(str(folder))
    (folder / "signal_meta.json").write_text(json.dumps({"tokenizer": str(tiny_model_dir)}))
    return folder


def test_inspect_command_takes_rows_sort_and_effective_weights(scored_folder, tmp_path, tiny_model_dir, one_thread):
    from tokentrain.cli import main

    out = tmp_path / "prior.html"
    argv = ["inspect", str(scored_folder), "--column", "ref_logps", "--out", str(out)]
    assert main([*argv, "--rows", "0,3,2", "--sort", "max", "--weights", "effective", "--weighting", "prior"]) == 0
    page = Page(out.read_text(encoding="utf-8"))
    ds = Dataset.load_from_disk(str(scored_folder))

    def max_prior_weight(i):  # w = k u / sum(u), u = 1 - p_ref
        u = [1 - math.exp(r) for r in ds[i]["ref_logps"]]
        return max(len(u) * x / sum(u) for x in u)

    assert list(page.rows) == sorted([0, 3, 2], key=max_prior_weight, reverse=True)
    assert "PRIOR" in page.summary and page.legend["data-kind"] == "relative"
    weights = [float(s["title"].split(" · ")[0]) for s in page.rows[2]]
    assert sum(weights) == pytest.approx(len(weights), rel=1e-3)  # mean 1 per row
    rho1 = ["--weights", "effective", "--weighting", "rho1", "--model", str(tiny_model_dir), "--rows", "1"]
    assert main([*argv, *rho1, "--rho1_ratio", "0.5"]) == 0
    page = Page(out.read_text(encoding="utf-8"))
    assert page.legend["data-kind"] == "weight" and "Rho-1" in page.summary
    picked = [float(s["title"].split(" · ")[0]) for s in page.rows[1]]
    assert set(picked) == {0.0, 1.0} and sum(picked) == math.ceil(0.5 * len(picked))


def test_inspect_command_errors_name_the_problem(scored_folder, tmp_path, capsys):
    from tokentrain.cli import main

    argv = ["inspect", str(scored_folder), "--column", "ref_logps", "--out", str(tmp_path / "x.html")]
    with pytest.raises(SystemExit):
        main([*argv, "--rows", "3,x"])
    assert "--rows takes row indices separated by commas" in capsys.readouterr().err
    assert main([*argv, "--rows", "1,9"]) == 2
    assert "row 9 is out of range: the dataset has 4 rows" in capsys.readouterr().err
    assert main([*argv, "--weighting", "prior"]) == 2
    assert "belong to --weights effective" in capsys.readouterr().err
    assert main([*argv, "--weights", "effective"]) == 2
    assert "need weighting prior or rho1" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()
