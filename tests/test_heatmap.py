"""The `tokentrain inspect` heat map: one span per token with its value on hover, escaping, scales, clear errors.

The pages are parsed back with the standard library's HTMLParser, so the checks see what a browser sees (titles and
texts unescaped) rather than matching raw markup.
"""

from __future__ import annotations

import math
from html.parser import HTMLParser

import pytest
from datasets import Dataset

from tokentrain.heatmap import BLUE, PURPLE, RED, choose_scale, render_heatmap, write_heatmap
from tokentrain.models import train_tokenizer

TEXTS = ["the cat sat on the mat.", "a dog ran\nto the park.", "<b>bold</b> & 'quotes'\tand tabs"] * 4


@pytest.fixture(scope="module")
def tok():
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    tokenizer.add_tokens(["<script>"])  # one token whose text is markup
    return tokenizer


class Page(HTMLParser):
    """Collects, per row block, the token spans as (classes, title, text), plus the legend's attributes."""

    def __init__(self, page: str):
        super().__init__()
        self.rows: dict[int, list[dict]] = {}
        self.legend: dict = {}
        self.summary = ""
        self._row, self._span, self._in_summary = None, None, False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("id", "").startswith("row-"):
            self._row = int(a["id"][4:])
            self.rows[self._row] = []
        elif tag == "div" and a.get("id") == "legend":
            self.legend = a
        elif tag == "table" and a.get("id") == "summary":
            self._in_summary = True
        elif tag == "span" and "t" in a.get("class", "").split():
            self._span = {"classes": a["class"].split(), "title": a["title"], "style": a["style"], "text": ""}
            self.rows[self._row].append(self._span)

    def handle_endtag(self, tag):
        if tag == "span" and self._span is not None:
            self._span = None
        elif tag == "table":
            self._in_summary = False

    def handle_data(self, data):
        if self._span is not None:
            self._span["text"] += data
        if self._in_summary:
            self.summary += data + " "


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


def test_rejected_weights_default_to_rejected_ids(tok):
    rej = [tok("the dog sat.")["input_ids"], tok("a cat.")["input_ids"]]
    ds = Dataset.from_list(
        [
            {"prompt": "p", "chosen_ids": [5], "rejected_ids": r, "rejected_weights": [0.9] * (len(r) - 1) + [1.0]}
            for r in rej
        ]
    )
    page = Page(render_heatmap(ds, tok, "rejected_weights"))
    assert [len(page.rows[i]) for i in (0, 1)] == [len(r) for r in rej]
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
