"""Anchored terms of WHP unlearning: the user's dictionary, matching, translation and the exact token alignment.

Spec: specs/unlearning.md sections 2.2-2.4 and 9. Also the `format: blocks` forget-row builder of section 2.2 (plain
text -> {prompt: "", completion: block}): it lives here, beside the matcher it feeds, because data.py is shared.

Dictionary. A YAML or JSON file holding one mapping `term: translation` (strings). Load-time errors name the keys:
unreadable file, a top level that is not a mapping of strings, an empty or whitespace-only term or translation, a
term equal to its translation, a duplicate key (the loaders here see duplicates; `yaml.safe_load` and `json.load`
keep the last silently), no entry, and two keys that partially overlap (a proper suffix of A starting at a word start
equals a proper prefix of B ending at a word end: "Mock Turtle" + "Turtle Soup"). Containment ("Rabbit" inside
"White Rabbit") is allowed. Inside a term, every whitespace run is one space and matches any whitespace run.

Matching, on the whole string s the trainer tokenises: case-sensitive; whole words (a match [a, b) is invalid when
s[a-1], s[a] are both word characters, `\\w`, or s[b-1], s[b] are); left to right, the longest valid term at each
offset, no overlap, the scan resumes at b. One regular expression built from a trie of the terms does exactly this:
at each offset it tries the longer continuation first and backtracks to the shorter term.

Alignment (section 2.4). With x_0..x_{n-1} the tokens of s (end offsets d_i) and u_0..u_{m-1} those of the translated
z (end offsets d'_i), position j >= 1 is aligned iff d_j > d_{j-1}, e_j = d_{j-1} is not strictly inside a match, and
z has a token boundary at phi(e_j); then the baseline predicts x_j's counterpart from its logits row q_j - 1 on z.
"""

from __future__ import annotations

import bisect
import gzip
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\w")


def _is_word(ch: str) -> bool:
    return bool(_WORD.match(ch))


def _normalise(term: str) -> str:
    """Every whitespace run -> one space, ends stripped: the form terms are compared and looked up in."""
    return " ".join(term.split())


class AnchorTermsError(ValueError):
    """A dictionary of anchored terms that cannot be used; the message names the file and the keys."""


@dataclass(frozen=True)
class Match:
    """One match [start, end) of `term` (the dictionary key) in a text."""

    start: int
    end: int
    term: str


# -------------------------------------------------------------------------------------------------- dictionary


class AnchorTerms:
    """A validated dictionary `term -> translation` with its matcher. Build it with `load_anchor_terms(path)` or
    `AnchorTerms.from_pairs([(term, translation), ...])`; both run every check of spec section 9."""

    def __init__(self, terms: dict[str, str], source: str):
        self.terms = terms  # normalised term -> translation (verbatim)
        self.source = source
        self._pattern = compile_terms(list(terms))

    @classmethod
    def from_pairs(cls, pairs: list[tuple[Any, Any]], source: str = "<anchor terms>") -> AnchorTerms:
        if not pairs:
            raise AnchorTermsError(f"{source}: the dictionary has no entry; write one `term: translation` per line")
        problems, terms, original = [], {}, {}
        for key, value in pairs:
            if not isinstance(key, str) or not isinstance(value, str):
                problems.append(
                    f"entry {key!r}: {value!r}: terms and translations must be strings (quote YAML words such as "
                    "yes/no/on/off and numbers)"
                )
                continue
            term = _normalise(key)
            if not term:
                problems.append(f"entry {key!r}: the term is empty or whitespace only")
                continue
            if not value.strip():
                problems.append(f"term {key!r}: the translation is empty or whitespace only")
                continue
            if _normalise(value) == term:
                problems.append(f"term {key!r}: the translation equals the term (nothing to replace)")
                continue
            if term in terms:
                problems.append(f"duplicate key {key!r} (also given as {original[term]!r})")
                continue
            terms[term], original[term] = value, key
        for a, b, shared in _partial_overlaps(list(terms)):
            problems.append(
                f"keys {original[a]!r} and {original[b]!r} partially overlap on {shared!r}: in "
                f"{a + b[len(shared) :]!r} the match would depend on the scan order; merge them into one term or "
                "drop one"
            )
        if problems:
            raise AnchorTermsError(f"{source}: invalid anchored-term dictionary:\n- " + "\n- ".join(problems))
        return cls(terms, source)

    def __len__(self) -> int:
        return len(self.terms)

    def find(self, text: str) -> list[Match]:
        """Every match in `text`, left to right, longest first at each offset, never overlapping."""
        return [Match(m.start(), m.end(), _normalise(m.group())) for m in self._pattern.finditer(text)]

    def translate(self, text: str, matches: list[Match] | None = None) -> str:
        """z: `text` with every match replaced by its translation."""
        matches = self.find(text) if matches is None else matches
        parts, pos = [], 0
        for m in matches:
            parts += [text[pos : m.start], self.terms[m.term]]
            pos = m.end
        parts.append(text[pos:])
        return "".join(parts)


class _Pairs(list):
    """A mapping read as its (key, value) pairs, in file order, duplicates kept."""


class _PairsLoader(yaml.SafeLoader):
    """SafeLoader that returns every mapping as `_Pairs`, so that duplicate keys are seen, not overwritten."""


def _construct_pairs(loader, node):
    loader.flatten_mapping(node)
    return _Pairs((loader.construct_object(k, deep=True), loader.construct_object(v, deep=True)) for k, v in node.value)


_PairsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_pairs)


def load_anchor_terms(path: str | Path) -> AnchorTerms:
    """Read and validate a YAML (.yaml/.yml) or JSON (.json) dictionary `term: translation`."""
    path = Path(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AnchorTermsError(f"{path}: cannot read the anchored-term dictionary ({e})") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_Pairs) if text.strip() else None
        else:
            data = yaml.load(text, Loader=_PairsLoader)  # noqa: S506 - a SafeLoader subclass
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise AnchorTermsError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if data is None:
        raise AnchorTermsError(f"{path}: the dictionary has no entry; write one `term: translation` per line")
    if not isinstance(data, _Pairs):
        raise AnchorTermsError(
            f"{path}: the top level must be a mapping `term: translation` of strings, got {type(data).__name__}"
        )
    return AnchorTerms.from_pairs(list(data), source=str(path))


def _partial_overlaps(terms: list[str]) -> list[tuple[str, str, str]]:
    """(A, B, shared) for every proper suffix of A starting at a word start equal to a proper prefix of B ending at a
    word end. Linear in the total length of the terms: B's valid prefixes are indexed once."""
    prefixes: dict[str, list[str]] = defaultdict(list)
    for b in terms:
        for k in range(1, len(b)):
            if not b[k - 1].isspace() and not (_is_word(b[k - 1]) and _is_word(b[k])):
                prefixes[b[:k]].append(b)
    found = []
    for a in terms:
        for i in range(1, len(a)):
            if not a[i].isspace() and not (_is_word(a[i - 1]) and _is_word(a[i])):
                found += [(a, b, a[i:]) for b in prefixes.get(a[i:], ()) if b != a]
    return found


def compile_terms(terms: list[str]) -> re.Pattern:
    """One regex matching any of `terms` (normalised) under the whole-word, case-sensitive rule, longest first.

    Built from a trie: at each node the continuations come before the end of a shorter term, so the regex engine's
    first success at an offset is the longest valid term there. A space matches any whitespace run; a term that starts
    (ends) with a word character must not be preceded (followed) by one.
    """
    trie: dict[str, Any] = {}
    for term in terms:
        node = trie
        for ch in term:
            node = node.setdefault(ch, {})
        node[""] = True  # end of a term

    def branch(node: dict[str, Any], last: str) -> str:
        alternatives = [
            (r"\s+" if ch == " " else re.escape(ch)) + branch(node[ch], ch) for ch in sorted(k for k in node if k)
        ]
        if "" in node:
            alternatives.append(r"(?!\w)" if _is_word(last) else "")
        return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"

    top = [(r"(?<!\w)" if _is_word(ch) else "") + re.escape(ch) + branch(trie[ch], ch) for ch in sorted(trie)]
    if not top:
        return re.compile(r"(?!)")
    # a lookahead on the terms' first characters rejects most offsets before any branch is tried (4x faster on Alice)
    firsts = "".join(re.escape(ch) for ch in sorted(trie))
    return re.compile(f"(?=[{firsts}])(?:{'|'.join(top)})")


def contains_term(text: str, pattern: re.Pattern) -> bool:
    """Whether `text` holds any term of `pattern` (from `compile_terms`) as a whole word."""
    return pattern.search(text) is not None


def match_counts(anchors: AnchorTerms, texts) -> dict[str, int]:
    """Matches of every term over `texts`, in dictionary order."""
    counts = dict.fromkeys(anchors.terms, 0)
    for text in texts:
        for m in anchors.find(text):
            counts[m.term] += 1
    return counts


def check_match_counts(anchors: AnchorTerms, counts: dict[str, int], where: str = "the forget rows") -> str:
    """A table of every term's match count; warns naming the terms without a match, raises when none matched."""
    total = sum(counts.values())
    width = max(len(t) for t in counts)
    table = "\n".join(f"  {t:<{width}}  {n}" for t, n in counts.items())
    summary = f"anchored terms ({anchors.source}): {total} matches of {len(counts)} terms in {where}\n{table}"
    if total == 0:
        raise AnchorTermsError(
            f"{anchors.source}: no term of the dictionary occurs in {where} (matching is case-sensitive and whole-word)"
            f"\n{table}"
        )
    missing = [t for t, n in counts.items() if n == 0]
    if missing:
        logger.warning("%d of %d anchored terms never match in %s: %s", len(missing), len(counts), where, missing)
    return summary


# --------------------------------------------------------------------------------------------------- alignment


@dataclass
class RowAlignment:
    """Per token x_j of s (j = 0..n-1): what the scoring pass and `inspect` need.

    q[j]: baseline logits row + 1 on z (q_j of section 2.4) when position j is aligned, else None (x_0 never).
    repeat[j]: x_j's span intersects a later match of the same key (rule (a): weight 0).
    term_first[j]: x_j is the first token of a key's first match in the row.
    in_match[j]: x_j's span intersects some match.
    penalty[j]: rule (b)'s P_j, the first token ids in z of the translations of terms whose first match ends at or
        before e_j (empty where not aligned).
    """

    q: list[int | None]
    repeat: list[bool]
    term_first: list[bool]
    in_match: list[bool]
    penalty: list[list[int]]


def _monotone(values: list[int]) -> list[int]:
    """Running maximum: special tokens a tokenizer adds (offset 0) after text keep the order of end offsets."""
    out, high = [], 0
    for v in values:
        high = max(high, v)
        out.append(high)
    return out


def align_row(
    s_offsets: list[tuple[int, int]],
    z_offsets: list[tuple[int, int]],
    z_ids: list[int],
    matches: list[Match],
    translations: dict[str, str],
) -> RowAlignment:
    """The exact token alignment of section 2.4, rules (a) and (b), from character offsets alone.

    Args:
        s_offsets: (start, end) of each token of s; special tokens added by the tokenizer are (0, 0).
        z_offsets: the same for the translated z.
        z_ids: the token ids of z (for rule (b)'s first translation tokens).
        matches: the matches in s, left to right (`AnchorTerms.find`).
        translations: term -> translation.

    Returns:
        a `RowAlignment` over the tokens of s.
    """
    d = _monotone([e for _, e in s_offsets])
    d_z = _monotone([e for _, e in z_offsets])
    starts = [m.start for m in matches]
    # cumulative length change after the k-th match: shift[k] = sum_{i <= k} (len D - (b - a))
    shift, total = [], 0
    for m in matches:
        total += len(translations[m.term]) - (m.end - m.start)
        shift.append(total)
    ends = [m.end for m in matches]

    def phi(o: int) -> int:
        k = bisect.bisect_right(ends, o)  # matches with b_k <= o
        return o + (shift[k - 1] if k else 0)

    def inside(o: int) -> bool:
        k = bisect.bisect_right(starts, o) - 1  # the last match starting at or before o
        return k >= 0 and starts[k] < o < ends[k]

    # rule (b): first token of each key's first translation in z, keyed by the end of that match in s
    first_of_key: dict[str, Match] = {}
    for m in matches:
        first_of_key.setdefault(m.term, m)
    firsts = sorted(first_of_key.values(), key=lambda m: m.end)
    first_ends = [m.end for m in firsts]
    first_ids = []
    for m in firsts:
        start_z = phi(m.start)
        i = bisect.bisect_right(d_z, start_z)  # the first token of z ending after the translation's start
        first_ids.append(z_ids[i] if i < len(z_ids) else None)

    n = len(d)
    q: list[int | None] = [None] * n
    penalty: list[list[int]] = [[] for _ in range(n)]
    for j in range(1, n):
        e = d[j - 1]
        if d[j] <= e or inside(e):
            continue
        target = phi(e)
        count = bisect.bisect_right(d_z, target)  # q_j = |{i : d'_i <= phi(e_j)}|
        if count >= 1 and d_z[count - 1] == target:
            q[j] = count
            k = bisect.bisect_right(first_ends, e)
            penalty[j] = sorted({t for t in first_ids[:k] if t is not None})

    repeat, term_first, in_match = [False] * n, [False] * n, [False] * n
    for j in term_first_tokens(s_offsets, matches):
        term_first[j] = True
    first_starts = {m.start for m in first_of_key.values()}  # matches never share a start
    for m in matches:
        j = bisect.bisect_right(d, m.start)  # tokens whose span intersects [a, b) start at the first ending after a
        while j < n and s_offsets[j][0] < m.end:
            if s_offsets[j][1] > m.start:
                in_match[j] = True
                if m.start not in first_starts:
                    repeat[j] = True
            j += 1
    return RowAlignment(q=q, repeat=repeat, term_first=term_first, in_match=in_match, penalty=penalty)


def term_first_tokens(s_offsets: list[tuple[int, int]], matches: list[Match]) -> list[int]:
    """Indices of the tokens that start each key's first match in the row: the first token ending after its start.
    The positions predicting them are section 2.6's `term_first` positions and `anchor_prob`'s."""
    d = _monotone([e for _, e in s_offsets])
    seen, out = set(), []
    for m in matches:
        if m.term in seen:
            continue
        seen.add(m.term)
        j = bisect.bisect_right(d, m.start)
        if j < len(d):
            out.append(j)
    return sorted(out)


# --------------------------------------------------------------------------------------- tokenisation with offsets


def require_fast_tokenizer(tokenizer, what: str = "anchored terms") -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{what} need a fast tokenizer (character offsets): {type(tokenizer).__name__} is a slow tokenizer; load "
            "it with use_fast=True or convert it with `tokenizers`"
        )


def row_text(example: dict[str, Any], tokenizer, chat_template: str | None = None) -> tuple[str, bool]:
    """(s, add_special_tokens): the whole string the trainer tokenises for this row, and how it tokenises it.

    Plain rows: prompt + completion + EOS (unless present), or text + EOS, as TRL 1.16 builds them, through the
    tokenizer's own call (its special tokens added). Chat rows: the rendered chat template, tokenised without adding
    special tokens (the template writes them).
    """
    from ..data import row_kind

    kind = row_kind(example)
    eos = tokenizer.eos_token
    if kind == "prompt_completion" and isinstance(example["prompt"], str):
        completion = example["completion"]
        return example["prompt"] + (completion if completion.endswith(eos) else completion + eos), True
    if kind == "text":
        text = example["text"]
        return (text if text.endswith(eos) else text + eos), True
    messages = example["messages"] if kind == "messages" else example["prompt"] + example["completion"]
    tools = example.get("tools")
    kwargs = {
        "tools": json.loads(tools) if isinstance(tools, str) else tools,
        **(example.get("chat_template_kwargs") or {}),
    }
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template, **kwargs), False


def tokenize_with_offsets(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) from the fast tokenizer's Rust backend (what its `__call__` runs, without the
    BatchEncoding wrapper: a third faster). Callers compare the ids with `data.tokenize_row`'s."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:  # the call resets them
        enc = tokenizer(text=text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    enc = backend.encode(text, add_special_tokens=add_special_tokens)
    return enc.ids, enc.offsets


# ------------------------------------------------------------------------------------ forget rows (format: blocks)


def read_text(path: str | Path) -> str:
    """A .txt or .txt.gz file as text (UTF-8)."""
    path = Path(str(path))
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def text_blocks(text: str, tokenizer, block_tokens: int, source: str = "text") -> list[str]:
    """Plain text -> blocks of at most `block_tokens` tokens (spec section 2.2).

    Paragraphs are split at blank lines; inside one, every whitespace run becomes one space (names wrapped across
    lines then match). Paragraphs are packed greedily, in order, joined by "\\n\\n"; the count is the trainer
    tokenizer's on the block text, special tokens not counted. A paragraph that does not fit the open block starts a
    new one; a paragraph longer than a block is cut at the last space that fits, its head filling whole blocks and
    its tail left open for the next paragraphs. A single word longer than `block_tokens` is an error.
    """
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")

    def n_tokens(s: str) -> int:
        return len(tokenizer(text=s, add_special_tokens=False)["input_ids"])

    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    paragraphs = [p for p in paragraphs if p]
    blocks, current = [], ""
    for para in paragraphs:
        if current and n_tokens(current + "\n\n" + para) <= block_tokens:
            current += "\n\n" + para
            continue
        if current:
            blocks.append(current)
        while n_tokens(para) > block_tokens:
            spaces = [i for i, ch in enumerate(para) if ch == " "]
            lo, hi, cut = 0, len(spaces) - 1, None  # the last space whose prefix fits (binary search)
            while lo <= hi:
                mid = (lo + hi) // 2
                if n_tokens(para[: spaces[mid]]) <= block_tokens:
                    cut, lo = spaces[mid], mid + 1
                else:
                    hi = mid - 1
            if cut is None:
                word = para.split(" ", 1)[0]
                raise ValueError(
                    f"{source}: the word {word[:80]!r} alone has {n_tokens(word)} tokens, more than block_tokens "
                    f"({block_tokens}); raise block_tokens"
                )
            blocks.append(para[:cut])
            para = para[cut + 1 :]
        current = para
    if current:
        blocks.append(current)
    if not blocks:
        raise ValueError(f"{source}: the forget text yields no row (it is empty or whitespace only)")
    return blocks


def block_rows(path: str | Path, tokenizer, block_tokens: int) -> list[dict[str, str]]:
    """Forget rows {prompt: "", completion: block} of a .txt / .txt.gz file (`format: blocks`)."""
    return [{"prompt": "", "completion": b} for b in text_blocks(read_text(path), tokenizer, block_tokens, str(path))]
