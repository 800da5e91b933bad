"""`tokentrain inspect`: a self-contained HTML heat map of one per-token signal column over its decoded tokens.

A signal column (`token_weights`, `ref_logps`, `rejected_weights`, ...) holds one number per token of an ids column
(DESIGN.md, "Token-aligned signals"); `IDS_COLUMN` says which, `ids_column` overrides it. Each row becomes one block:
its index, the prompt (muted, when the rows have a `prompt` column), then one `<span>` per token, coloured by its
value, with value, token id and decoded text in the `title` (shown on hover). Tokens are decoded one at a time with
`tokenizer.decode([id])`, so a byte-level BPE token holding part of a UTF-8 character shows as U+FFFD. Special tokens
(`</s>`, `<pad>`, ...) are drawn small and faded: they keep their colour but do not compete with the text.

Preference rows (`chosen_ids` and `rejected_ids`, e.g. a contrastive score's output) show the chosen response beside
the rejected one, with the first token where they differ outlined on both sides; the side of the shown column is
coloured by it, the other side by its own weights column when the rows have one. A row's gold answer (`gold`) is
shown, and with `task` each response's extracted answer and the task grader's verdict.

The colour scale is chosen from the range of the finite values shown (and written in the legend with min/max):
- weights in [0, 1] (importance weights, selections): sequential, white at 0 (token ignored) to dark red at 1, fixed
  to [0, 1] so that pages compare, and high weights stand out;
- weights reaching above 1 (PRIOR's weights, normalised to mean 1 per sequence): diverging around the neutral 1.0
  (white): blue below, darkest at 0, red above, darkest at the maximum;
- log-probs (all <= 0): sequential, white at 0 (certain) to dark purple at the minimum (most surprising);
- anything signed (min < 0 < max: excess losses, log-ratios): diverging around 0, blue below, red above, symmetric.
NaN and inf are drawn grey with a dashed outline and left out of the statistics.

`effective_weights` turns a stored signal into what the trainer multiplies each token's loss by, with the trainer's
own functions: PRIOR's per-sequence normalised weights from `ref_logps`, Rho-1's selection from `ref_logps` and a
policy's log-probs.

The page has no scripts and loads nothing: a Content-Security-Policy forbids both, and every text is HTML-escaped.
Newlines in a token show as "⏎" followed by a line break, tabs as "⇥", other control characters as their Unicode
control pictures; spaces are kept as spaces (`white-space: pre-wrap`).
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IDS_COLUMN = {
    "token_weights": "completion_ids",
    "ref_logps": "completion_ids",
    "chosen_weights": "chosen_ids",
    "rejected_weights": "rejected_ids",
}
DEFAULT_IDS_COLUMN = "completion_ids"  # for any other signal column
PAIR_IDS = ("chosen_ids", "rejected_ids")
SORTS = ("index", "max", "mean")
# columns the trainers multiply the loss by as stored (weighted_ntp `column`, critical_dpo `chosen`/`rejected`)
DIRECT_WEIGHTS = ("token_weights", "chosen_weights", "rejected_weights")
WEIGHTINGS = ("prior", "rho1")  # what `ref_logps` become in training (WeightedNTPConfig.weighting)

WHITE = (255, 255, 255)
BLUE = (33, 102, 172)  # ColorBrewer RdBu ends
RED = (178, 24, 43)
PURPLE = (84, 39, 143)  # ColorBrewer Purples, darkest
REDS = ((251, 106, 74), (165, 15, 21))  # ColorBrewer Reds: middle, darkest


@dataclass
class Scale:
    """Maps a value to a background colour; `stops` are (value, rgb) pairs for the legend bar, low to high."""

    kind: str  # "weight" | "relative" | "logprob" | "signed"
    lo: float  # data min over the rows shown
    hi: float  # data max
    stops: list[tuple[float, tuple[int, int, int]]]
    description: str

    def colour(self, v: float) -> tuple[tuple[int, int, int], float]:
        """(rgb, intensity in [0, 1]) of value v, piecewise linear between the stops, clamped at the ends."""
        (v0, c0), (vn, cn) = self.stops[0], self.stops[-1]
        if v <= v0:
            return c0, _intensity(c0)
        if v >= vn:
            return cn, _intensity(cn)
        for (a, ca), (b, cb) in zip(self.stops, self.stops[1:]):
            if a <= v <= b:
                t = 0.0 if b == a else (v - a) / (b - a)
                rgb = tuple(round(x + (y - x) * t) for x, y in zip(ca, cb))
                return rgb, _intensity(rgb)
        return WHITE, 0.0  # unreachable: the stops cover [v0, vn]


def choose_scale(column: str, values: Sequence[float]) -> Scale:
    """Pick the colour scale from the finite values' range (see the module docstring)."""
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    if hi <= 0 and (lo < 0 or column.endswith("logps")):
        bottom = lo if lo < 0 else -1.0
        return Scale(
            "logprob",
            lo,
            hi,
            [(bottom, PURPLE), (0.0, WHITE)],
            f"sequential (log-probs): white at 0, darkest at the minimum {_fmt(bottom)}",
        )
    if lo >= 0 and hi <= 1:
        return Scale(
            "weight",
            lo,
            hi,
            [(0.0, WHITE), (0.5, REDS[0]), (1.0, REDS[1])],
            "sequential (weights in [0, 1]): white at 0 (token ignored), darkest red at 1 (full weight)",
        )
    if lo >= 0:
        return Scale(
            "relative",
            lo,
            hi,
            [(0.0, BLUE), (1.0, WHITE), (hi, RED)],
            f"diverging (weights around 1): white at the neutral weight 1.0, blue below to 0, red above up to the "
            f"maximum {_fmt(hi)}",
        )
    span = max(-lo, hi)
    return Scale(
        "signed",
        lo,
        hi,
        [(-span, BLUE), (0.0, WHITE), (span, RED)],
        f"diverging (signed): white at 0, blue to {_fmt(-span)}, red to {_fmt(span)}",
    )


@dataclass
class _Side:
    """One token sequence of a row block: a response of a pair ("chosen"/"rejected") or the row's only one ("")."""

    label: str
    ids: list[int]
    values: list[float] | None  # None: drawn uncoloured (the other side of a pair, without its own weights)
    text: str | None = None  # the response's text, graded when a task is given


def render_heatmap(
    dataset,
    tokenizer,
    column: str,
    ids_column: str | None = None,
    rows: list[int] | None = None,
    max_rows: int = 50,
    sort: str = "index",
    title: str | None = None,
    values: dict[int, list[float]] | None = None,
    values_note: str | None = None,
    task: str | None = None,
    gold_column: str = "gold",
) -> str:
    """The HTML page (one string) showing `column` over `ids_column`.

    Rows: `rows` (default: every row), ordered by `sort` (`index`: as given; `max`/`mean`: the row's largest / mean
    finite value first, special tokens left out), the first `max_rows` of them. `values` (row -> per-token list, e.g. `effective_weights`)
    replaces the column's values, described by `values_note`. `task` (a grader: arithmetic, gsm8k, math) grades each
    response against the row's `gold_column`.

    `dataset` is a `datasets.Dataset` or a list of dicts. Raises KeyError for a missing column (listing those there
    are), IndexError for a row index out of range, ValueError for a bad `sort` or `task`, or for a row whose signal and
    ids differ in length or whose signal is not a flat list of numbers (each naming the row).
    """
    ids_column = ids_column or IDS_COLUMN.get(column, DEFAULT_IDS_COLUMN)
    names = _column_names(dataset)
    if column not in names:
        raise KeyError(f"dataset has no column {column!r}; its columns are {names}")
    if ids_column not in names:
        raise KeyError(
            f"dataset has no ids column {ids_column!r} for signal {column!r} (pass ids_column / --ids_column); "
            f"its columns are {names}"
        )
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {list(SORTS)}, got {sort!r}")
    grade = _grader(task, gold_column, names)
    n = len(dataset)
    candidates = list(range(n)) if rows is None else list(rows)
    for i in candidates:
        if not 0 <= i < n:
            raise IndexError(f"row {i} is out of range: the dataset has {n} rows (0..{n - 1})")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pair = ids_column in PAIR_IDS and all(c in names for c in PAIR_IDS)
    other = None
    if pair:
        other = PAIR_IDS[1 - PAIR_IDS.index(ids_column)]

    # gather and check every candidate first: the order and the scale depend on the values
    blocks = []  # (row, example, [sides], divergence position or None, the shown values)
    keys = {}  # row -> its sort key
    for i in candidates:
        example = dataset[i]
        shown = _Side(ids_column.removesuffix("_ids") if pair else "", *_signal(example, i, column, ids_column, values))
        sides = [shown]
        if pair:
            other_column = other.removesuffix("_ids") + "_weights"
            if other_column in names:
                other_ids, other_values = _signal(example, i, other_column, other)
            else:
                other_ids, other_values = _ids(example, i, other), None
            sides.append(_Side(other.removesuffix("_ids"), other_ids, other_values))
            sides.sort(key=lambda s: s.label != "chosen")  # chosen on the left
        for side in sides:
            text = example.get(side.label or "completion")
            side.text = text if isinstance(text, str) else None  # conversational responses are not graded
        diverge = _first_difference(sides[0].ids, sides[1].ids) if pair else None
        blocks.append((i, example, sides, diverge, shown.values))
        keys[i] = _row_key([v for t, v in zip(shown.ids, shown.values) if t not in special], sort)
    if sort != "index":  # special tokens do not count: their values follow rules (the EOS weight 1, ...)
        blocks.sort(key=lambda b: keys[b[0]], reverse=True)  # stable: ties keep their order
    blocks = blocks[:max_rows]

    coloured = [v for *_, sides, _, _ in blocks for s in sides if s.values is not None for v in s.values]
    all_values = [v for *_, shown in blocks for v in shown]
    finite = [v for v in all_values if math.isfinite(v)]
    scale = choose_scale(column, coloured)
    decoded: dict[int, str] = {}  # token id -> text, each id decoded once

    def token_span(tid: int, v: float | None, mark: bool) -> str:
        if tid not in decoded:
            decoded[tid] = tokenizer.decode([tid])
        text = decoded[tid]
        note = " (part of a UTF-8 character)" if "\ufffd" in text else ""
        note += " (special token)" if tid in special else ""
        note += " (first token where the responses differ)" if mark else ""
        shown_value = "not scored" if v is None else _fmt(v)
        tip = f"{shown_value} · id {tid} · {json.dumps(text, ensure_ascii=False)}{note}"
        classes = "t" + (" sp" if tid in special else "") + (" div" if mark else "")
        if v is None:
            style = "background:#fff;color:#000"
        elif math.isfinite(v):
            rgb, strength = scale.colour(v)
            fg = "#fff" if strength > 0.5 else "#000"
            style = f"background:{_hex(rgb)};color:{fg}"
        else:
            classes += " bad"
            style = "background:#bbb;color:#000"
        return f'<span class="{classes}" style="{style}" title="{_esc(tip)}">{_show(text)}</span>'

    def side_html(side: _Side, example, diverge: int | None) -> str:
        values = side.values if side.values is not None else [None] * len(side.ids)
        spans = "".join(token_span(t, v, k == diverge) for k, (t, v) in enumerate(zip(side.ids, values)))
        toks = f'<div class="toks">{spans or "<span class=empty>(no tokens)</span>"}</div>'
        head = [side.label] if side.label else []
        if side.label and side.values is None:
            head.append("not scored")
        if grade is not None and side.text is not None:
            answer, verdict = grade(side.text, example[gold_column])
            head.append(f"answer {answer or '(none)'}: {verdict}")
        label = f'<div class="lab">{_esc(" · ".join(head))}</div>' if head else ""
        return f'<div class="side">{label}{toks}</div>'

    title = title or f"{column} over {ids_column}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        _summary(column, ids_column, n, len(blocks), all_values, finite, sort, values_note),
        _legend(scale, finite),
    ]
    for i, example, sides, diverge, shown in blocks:
        row_finite = [v for v in shown if math.isfinite(v)]
        mean = _fmt(sum(row_finite) / len(row_finite)) if row_finite else "n/a"
        facts = [f"row {i}", f"{len(shown)} tokens", f"mean {mean}"]
        if diverge is not None:
            facts.append(f"first divergent token: position {diverge}")
        if gold_column in example and example[gold_column] is not None:
            facts.append(f"gold answer {example[gold_column]}")
        out.append(f'<div class="row" id="row-{i}"><div class="hdr">{_esc(" · ".join(facts))}</div>')
        if "prompt" in names:
            out.append(f'<div class="prompt">{_esc(_prompt_text(example["prompt"]))}</div>')
        body = "".join(side_html(s, example, diverge) for s in sides)
        out.append(f'<div class="pair">{body}</div></div>' if pair else f"{body}</div>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_heatmap(dataset, tokenizer, column: str, out_path: str | Path, **kw) -> Path:
    """Render (see `render_heatmap`, which takes `**kw`) and write the page to `out_path`; returns the path.

    The page is rendered before anything is written, and written to a temporary file that is then renamed, so an
    error never leaves a half-written or clobbered file.
    """
    page = render_heatmap(dataset, tokenizer, column, **kw)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out_path)
    return out_path


# ------------------------------------------------------------------------------------------------ effective weights


def effective_weights(
    dataset,
    column: str,
    weighting: str | None = None,
    rows: list[int] | None = None,
    prior_alpha: float = 1.0,
    rho1_ratio: float = 0.6,
    policy=None,
    tokenizer=None,
) -> tuple[dict[int, list[float]] | None, str]:
    """(values per row or None, description): what the trainer multiplies each token's loss by.

    - `token_weights`, `chosen_weights`, `rejected_weights`: the stored values themselves (weighted_ntp `column`,
      critical_dpo), returned as None ("show the column as it is").
    - `ref_logps` with `weighting="prior"`: `losses.weighted_ntp.prior_weights` over each row's completion tokens,
      (1 - P_ref)^alpha normalised to mean 1, exactly as `WeightedNTPTrainer` computes them for an unpacked row.
    - `ref_logps` with `weighting="rho1"`: 1 on the tokens `rho1_select` keeps, 0 elsewhere, from the excess loss
      -log p_policy + ref_logp with `policy`'s log-probs (scored like `ref_logps`, through the fused head). The
      selection ranks each row's tokens alone, keeping ceil(rho1_ratio * k) of its k tokens; the trainer ranks a
      micro-batch, where a row with more excess loss keeps more of its tokens.
    """
    if column in DIRECT_WEIGHTS:
        return None, f"effective weights: the trainer multiplies by {column} as stored"
    if column != "ref_logps":
        raise ValueError(
            f"effective weights are defined for ref_logps (with weighting {' or '.join(WEIGHTINGS)}) and for "
            f"{', '.join(DIRECT_WEIGHTS)}; got column {column!r}"
        )
    if weighting not in WEIGHTINGS:
        raise ValueError(f"effective weights of ref_logps need weighting {' or '.join(WEIGHTINGS)}, got {weighting!r}")
    import torch

    from .losses.weighted_ntp import prior_weights, rho1_num_selected, rho1_select

    rows = list(range(len(dataset))) if rows is None else list(rows)
    ref = {i: [float(v) for v in dataset[i]["ref_logps"]] for i in rows}
    if weighting == "prior":
        out = {}
        for i, r in ref.items():
            t = torch.tensor([r], dtype=torch.float64)  # (1, k): one sequence, every token a target
            mask, segments = torch.ones_like(t, dtype=torch.bool), torch.zeros_like(t, dtype=torch.long)
            out[i] = prior_weights(t, mask, segments, prior_alpha)[0].tolist()
        return out, f"effective weights: PRIOR, (1 - P_ref)^{prior_alpha:g} normalised to mean 1 per row"
    if policy is None or tokenizer is None:
        raise ValueError("effective Rho-1 weights need the policy model (--model) whose excess loss selects tokens")
    from .signals.ref_logps import score_ref_logps

    subset = dataset.select(rows) if hasattr(dataset, "select") else [dataset[i] for i in rows]
    ids, logps = score_ref_logps(subset, policy, tokenizer)
    out = {}
    for i, row_ids, lp in zip(rows, ids, logps):
        stored = list(dataset[i]["completion_ids"])
        if row_ids != stored:
            k = _first_difference(row_ids, stored)
            raise ValueError(
                f"row {i}: the policy's completion tokens differ from the stored completion_ids at position {k}: "
                "score and inspect with the same tokenizer"
            )
        excess = -torch.tensor([lp], dtype=torch.float64) + torch.tensor([ref[i]], dtype=torch.float64)  # (1, k)
        mask = torch.ones_like(excess, dtype=torch.bool)
        out[i] = rho1_select(excess, mask, rho1_num_selected(rho1_ratio, len(lp)))[0].double().tolist()
    return out, f"effective weights: Rho-1 selection (1 = trained on), top {rho1_ratio:g} of each row by excess loss"


# ---------------------------------------------------------------------------------------------------------- pieces

_CSP = "default-src 'none'; style-src 'unsafe-inline'"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.3em;margin:0 0 .5em}
.summary{margin-bottom:.6em}
.summary th{text-align:left;padding:0 1em 0 0;font-weight:600}
.summary td{padding:0 1.2em 0 0}
.legend{margin:.4em 0 1.2em;font-size:.9em;max-width:100%}
.bar{height:14px;width:360px;max-width:100%;border:1px solid #999;margin:.3em 0}
.ends{position:relative;width:362px;max-width:100%;height:1.3em;color:#555}
.ends span{position:absolute;white-space:nowrap;transform:translateX(-50%)}
.ends span.first{transform:none}
.ends span.last{transform:translateX(-100%)}
.row{border-top:1px solid #ddd;padding:.6em 0}
.hdr{font-size:.85em;color:#555;margin-bottom:.2em}
.prompt{color:#888;white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;
  margin-bottom:.3em}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1.5em}
.lab{font-size:.8em;color:#555;margin-bottom:.15em}
.toks{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;line-height:1.7;word-break:break-all}
.t{border-right:1px solid rgba(0,0,0,.08)}
.t:hover{outline:2px solid #000}
.sp{opacity:.45;font-size:.75em}
.div{outline:2px solid #000;outline-offset:1px}
.bad{outline:1px dashed #c00}
.empty{color:#999}
"""


def _signal(example, row: int, column: str, ids_column: str, values: dict | None = None):
    """(ids, values) of one row, checked: a flat list of numbers, one per token."""
    ids = _ids(example, row, ids_column)
    vals = values[row] if values is not None else example.get(column)
    vals = vals.tolist() if hasattr(vals, "tolist") else vals  # numpy/torch formats
    if not isinstance(vals, (list, tuple)):
        raise ValueError(f"row {row}: {column!r} is not a per-token list (got {type(vals).__name__})")
    if len(vals) != len(ids):
        raise ValueError(
            f"row {row}: {column!r} has {len(vals)} values but {ids_column!r} has {len(ids)} ids; "
            "a signal must have one value per token"
        )
    try:
        vals = [math.nan if v is None else float(v) for v in vals]
    except (TypeError, ValueError) as e:
        raise ValueError(f"row {row}: {column!r} must hold numbers, one per token ({e})") from None
    return ids, vals


def _ids(example, row: int, ids_column: str) -> list[int]:
    ids = example.get(ids_column)
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"row {row}: {ids_column!r} is not a list of token ids (got {type(ids).__name__})")
    return [int(t) for t in ids]


def _first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences differ (the shorter one's length if one is a prefix)."""
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


def _row_key(values: list[float], sort: str) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return -math.inf
    return max(finite) if sort == "max" else sum(finite) / len(finite)


def _grader(task: str | None, gold_column: str, names: list[str]):
    """callable(text, gold) -> (extracted answer, verdict) of `task`'s grader, or None without a task."""
    if task is None:
        return None
    from .tasks.grading import TASKS

    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    if gold_column not in names:
        raise KeyError(f"task {task!r} grades against the gold answers: dataset has no column {gold_column!r}")
    module = TASKS[task]

    def grade(text: str, gold) -> tuple[str | None, str]:
        return module.extract_answer(text), module.grade(text, str(gold))

    return grade


def _column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    seen: dict[str, None] = {}  # list of dicts: the union of the keys, in first-seen order
    for example in dataset:
        seen.update(dict.fromkeys(example))
    return list(seen)


def _prompt_text(prompt) -> str:
    """A plain prompt as is; a conversational one (list of messages) as `role: content` lines."""
    if isinstance(prompt, list):
        return "\n".join(
            f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m) for m in prompt
        )
    return "" if prompt is None else str(prompt)


def _summary(
    column: str,
    ids_column: str,
    n: int,
    shown: int,
    values: list[float],
    finite: list[float],
    sort: str,
    values_note: str | None,
) -> str:
    stats = (
        f"mean {_fmt(sum(finite) / len(finite))} · min {_fmt(min(finite))} · max {_fmt(max(finite))}"
        if finite
        else "no finite values"
    )
    bad = len(values) - len(finite)
    order = {"index": "row order", "max": "largest value first", "mean": "largest mean first"}[sort]
    cells = [
        ("signal", f"{column} (one value per token of {ids_column})"),
        ("rows shown", f"{shown} of {n} ({order})"),
        ("tokens", str(len(values))),
        ("values", stats + (f" · {bad} non-finite (grey)" if bad else "")),
    ]
    if values_note:
        cells.append(("shown", values_note))
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in cells)
    return f'<table class="summary" id="summary">{body}</table>'


def _legend(scale: Scale, finite: list[float]) -> str:
    v0, vn = scale.stops[0][0], scale.stops[-1][0]
    gradient = ",".join(f"{_hex(c)} {100 * (v - v0) / (vn - v0):.1f}%" for v, c in scale.stops)
    last = len(scale.stops) - 1
    ends = "".join(  # each stop's label under its place on the bar; the end labels stay inside the bar's width
        f'<span class="{"first" if k == 0 else "last" if k == last else "mid"}" '
        f'style="left:{100 * (v - v0) / (vn - v0):.1f}%">{_esc(_fmt(v))}</span>'
        for k, (v, _) in enumerate(scale.stops)
    )
    data = f"data min {_fmt(min(finite))} · max {_fmt(max(finite))}" if finite else "no finite values"
    return (
        f'<div class="legend" id="legend" data-kind="{scale.kind}" data-min="{_fmt(scale.lo)}" '
        f'data-max="{_fmt(scale.hi)}"><div>scale: {_esc(scale.description)}</div>'
        f'<div class="bar" style="background:linear-gradient(to right,{gradient})"></div>'
        f'<div class="ends">{ends}</div><div>{_esc(data)}</div></div>'
    )


_VISIBLE = {"\t": "⇥\t", "\r": "␍", "\x7f": "␡"}


def _show(text: str) -> str:
    """A token's text, HTML-escaped, with whitespace and control characters visible but kept in place."""
    if text == "":
        return '<span class="empty">∅</span>'
    out = []
    for line in text.split("\n"):
        chars = (_VISIBLE.get(c, chr(0x2400 + ord(c)) if ord(c) < 0x20 else c) for c in line)
        out.append(_esc("".join(chars)))
    return "⏎<br>".join(out)


def _intensity(rgb: tuple[int, int, int]) -> float:
    """0 for white, towards 1 for dark: picks white text on dark backgrounds."""
    r, g, b = rgb
    return 1 - (0.299 * r + 0.587 * g + 0.114 * b) / 255


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)
