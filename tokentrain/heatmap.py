"""`tokentrain inspect`: a self-contained HTML heat map of one per-token signal column over its decoded tokens.

A signal column (`token_weights`, `ref_logps`, `rejected_weights`, ...) holds one number per token of an ids column
(DESIGN.md, "Token-aligned signals"); `IDS_COLUMN` says which, `ids_column` overrides it. Each row becomes one block:
its index, the prompt (muted, when the rows have a `prompt` column), then one `<span>` per token, coloured by its
value, with value, token id and decoded text in the `title` (shown on hover). Tokens are decoded one at a time with
`tokenizer.decode([id])`, so a byte-level BPE token holding part of a UTF-8 character shows as U+FFFD.

The colour scale is chosen from the range of the finite values shown (and written in the legend with min/max):
- log-probs (all <= 0): sequential, white at 0 (certain) to dark purple at the minimum (most surprising);
- weights (all >= 0): diverging around the neutral weight 1.0 (white): blue below, darkest at 0 (token ignored),
  red above, darkest at the maximum; weight 1 everywhere is plain SFT/DPO and renders all white;
- anything signed (min < 0 < max: scores, log-ratios): diverging around 0, blue below, red above, symmetric.
NaN and inf are drawn grey with a dashed outline and left out of the statistics.

The page has no scripts and loads nothing (no external CSS, JS or fonts); every text is HTML-escaped. Newlines in a
token show as "⏎" followed by a line break, tabs as "⇥", other control characters as their Unicode control pictures;
spaces are kept as spaces (`white-space: pre-wrap`).
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

WHITE = (255, 255, 255)
BLUE = (33, 102, 172)  # ColorBrewer RdBu ends
RED = (178, 24, 43)
PURPLE = (84, 39, 143)  # ColorBrewer Purples, darkest


@dataclass
class Scale:
    """Maps a value to a background colour; `stops` are (value, rgb) pairs for the legend bar, low to high."""

    kind: str  # "logprob" | "weight" | "signed"
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
    if lo >= 0:
        stops = [(0.0, BLUE), (1.0, WHITE)]
        if hi > 1:
            stops.append((hi, RED))
        above = f", red above up to the maximum {_fmt(hi)}" if hi > 1 else ""
        return Scale(
            "weight", lo, hi, stops, f"diverging (weights): white at the neutral weight 1.0, blue below to 0{above}"
        )
    span = max(-lo, hi)
    return Scale(
        "signed",
        lo,
        hi,
        [(-span, BLUE), (0.0, WHITE), (span, RED)],
        f"diverging (signed): white at 0, blue to {_fmt(-span)}, red to {_fmt(span)}",
    )


def render_heatmap(
    dataset,
    tokenizer,
    column: str,
    ids_column: str | None = None,
    rows: list[int] | None = None,
    max_rows: int = 50,
    title: str | None = None,
) -> str:
    """The HTML page (one string) showing `column` over `ids_column` for `rows` (default: the first `max_rows`).

    `dataset` is a `datasets.Dataset` or a list of dicts. Raises KeyError for a missing column (listing those there
    are), IndexError for a row index out of range, ValueError for a row whose signal and ids differ in length or
    whose signal is not a flat list of numbers (each naming the row).
    """
    ids_column = ids_column or IDS_COLUMN.get(column, DEFAULT_IDS_COLUMN)
    names = _column_names(dataset)
    if column not in names:
        raise KeyError(f"dataset has no column {column!r}; its columns are {names}")
    if ids_column not in names:
        raise KeyError(
            f"dataset has no ids column {ids_column!r} for signal {column!r} (pass ids_column / --ids-column); "
            f"its columns are {names}"
        )
    n = len(dataset)
    if rows is None:
        rows = list(range(min(n, max_rows)))
    for i in rows:
        if not 0 <= i < n:
            raise IndexError(f"row {i} is out of range: the dataset has {n} rows (0..{n - 1})")

    # gather and check every row first: the scale depends on all values shown
    blocks = []  # (row, prompt text or None, ids, values)
    for i in rows:
        example = dataset[i]
        ids, values = example.get(ids_column), example.get(column)
        ids, values = (x.tolist() if hasattr(x, "tolist") else x for x in (ids, values))  # numpy/torch formats
        if not isinstance(values, (list, tuple)):
            raise ValueError(f"row {i}: {column!r} is not a per-token list (got {type(values).__name__})")
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"row {i}: {ids_column!r} is not a list of token ids (got {type(ids).__name__})")
        if len(values) != len(ids):
            raise ValueError(
                f"row {i}: {column!r} has {len(values)} values but {ids_column!r} has {len(ids)} ids; "
                "a signal must have one value per token"
            )
        try:
            values = [math.nan if v is None else float(v) for v in values]
        except (TypeError, ValueError) as e:
            raise ValueError(f"row {i}: {column!r} must hold numbers, one per token ({e})") from None
        prompt = _prompt_text(example["prompt"]) if "prompt" in names else None
        blocks.append((i, prompt, [int(t) for t in ids], values))

    all_values = [v for *_, values in blocks for v in values]
    finite = [v for v in all_values if math.isfinite(v)]
    scale = choose_scale(column, all_values)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoded: dict[int, str] = {}  # token id -> text, each id decoded once

    def token_span(tid: int, v: float) -> str:
        if tid not in decoded:
            decoded[tid] = tokenizer.decode([tid])
        text = decoded[tid]
        note = " (part of a UTF-8 character)" if "\ufffd" in text else ""
        tip = f"{_fmt(v)} · id {tid} · {json.dumps(text, ensure_ascii=False)}{note}"
        classes = "t" + (" sp" if tid in special else "")
        if math.isfinite(v):
            rgb, strength = scale.colour(v)
            fg = "#fff" if strength > 0.5 else "#000"
            style = f"background:{_hex(rgb)};color:{fg}"
        else:
            classes += " bad"
            style = "background:#bbb;color:#000"
        return f'<span class="{classes}" style="{style}" title="{_esc(tip)}">{_show(text)}</span>'

    title = title or f"{column} over {ids_column}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        _summary(column, ids_column, n, len(blocks), all_values, finite),
        _legend(scale, finite),
    ]
    for i, prompt, ids, values in blocks:
        row_finite = [v for v in values if math.isfinite(v)]
        mean = _fmt(sum(row_finite) / len(row_finite)) if row_finite else "n/a"
        out.append(f'<div class="row" id="row-{i}"><div class="hdr">row {i} · {len(ids)} tokens · mean {mean}</div>')
        if prompt is not None:
            out.append(f'<div class="prompt">{_esc(prompt)}</div>')
        spans = "".join(token_span(t, v) for t, v in zip(ids, values)) or '<span class="empty">(no tokens)</span>'
        out.append(f'<div class="toks">{spans}</div></div>')
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


# ---------------------------------------------------------------------------------------------------------- pieces

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.3em;margin:0 0 .5em}
.summary{margin-bottom:.6em}
.summary td{padding:0 1.2em 0 0}
.legend{margin:.4em 0 1.2em;font-size:.9em}
.bar{height:14px;width:360px;border:1px solid #999;margin:.3em 0}
.ends{position:relative;width:362px;height:1.3em;color:#555}
.ends span{position:absolute;transform:translateX(-50%)}
.row{border-top:1px solid #ddd;padding:.6em 0}
.hdr{font-size:.85em;color:#555;margin-bottom:.2em}
.prompt{color:#888;white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;
  margin-bottom:.3em}
.toks{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;line-height:1.7;word-break:break-all}
.t{border-right:1px solid rgba(0,0,0,.08)}
.t:hover{outline:2px solid #000}
.sp{outline:1px dashed #666}
.bad{outline:1px dashed #c00}
.empty{color:#999}
"""


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


def _summary(column: str, ids_column: str, n: int, shown: int, values: list[float], finite: list[float]) -> str:
    stats = (
        f"mean {_fmt(sum(finite) / len(finite))} · min {_fmt(min(finite))} · max {_fmt(max(finite))}"
        if finite
        else "no finite values"
    )
    bad = len(values) - len(finite)
    cells = [
        ("signal", f"{column} (one value per token of {ids_column})"),
        ("rows shown", f"{shown} of {n}"),
        ("tokens", str(len(values))),
        ("values", stats + (f" · {bad} non-finite (grey)" if bad else "")),
    ]
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in cells)
    return f'<table class="summary" id="summary">{body}</table>'


def _legend(scale: Scale, finite: list[float]) -> str:
    v0, vn = scale.stops[0][0], scale.stops[-1][0]
    gradient = ",".join(f"{_hex(c)} {100 * (v - v0) / (vn - v0):.1f}%" for v, c in scale.stops)
    ends = "".join(  # each stop's label under its place on the bar
        f'<span style="left:{100 * (v - v0) / (vn - v0):.1f}%">{_esc(_fmt(v))}</span>' for v, _ in scale.stops
    )
    data = f"data min {_fmt(min(finite))} · max {_fmt(max(finite))}" if finite else "no finite values"
    return (
        f'<div class="legend" id="legend" data-min="{_fmt(scale.lo)}" data-max="{_fmt(scale.hi)}">'
        f"<div>scale: {_esc(scale.description)}</div>"
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
