"""E2E data-to-text: meaning representations, the slot matcher, the split and the synthetic rows (spec
`specs/weighted_ntp.md` sections 6 and 7).

An MR is `name[The Eagle], eatType[pub], area[riverside]`; a description realises a (slot, value) when the rules below
find it in the text. Text and values are normalised the same way: lower-case, "-" -> space, words = the regex
`[a-z0-9£']+`, s = the words joined by single spaces ("Café" -> "caf", "£20-25" -> "£20 25"). Phrases and numbers
match with `\\b...\\b` on s (so "£20" contains "20"); x* = a word starting with x; "A ≤3 B" = a word matching A within
3 words of one matching B, in either order.

| slot            | realised iff                                                                                    |
|-----------------|-------------------------------------------------------------------------------------------------|
| name, near      | the value's words (a leading "the" dropped) appear as a phrase                                  |
| eatType         | coffee shop(s) / coffeeshop; pub(s); restaurant(s)                                              |
| food            | the value as a phrase; English also "british", Fast food also "fastfood"                        |
| area            | city centre: "centre" or "center"; riverside: river*                                            |
| familyFriendly  | yes: an F word, none negated, no "adult(s) only"; no: a negated F word or "adult(s) only"       |
| priceRange      | less than £20: 20, no 25; £20-25: 20 and 25; more than £30: 30; cheap: cheap*, inexpensive,      |
|                 | affordable, low ≤3 pric*; moderate: moderate*, average ≤3 pric*; high: expensive, pricey,        |
|                 | costly, high* ≤3 pric*                                                                          |
| customer rating | k out of 5: "k out of 5", "k star(s)", one/three/five star(s); low/average/high: that word* ≤3 rat* |

F words: family, families, kid(s), child, children, childrens, children's; an F word is negated when one of the 4
words before it is not, no, non, never, nor, without, isnt, arent, or ends in n't. The matcher scores ~10k rows per
second: every regex is compiled once, every (slot, value) rule once (cached).
"""

from __future__ import annotations

import csv
import gzip
import random
import re
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

SLOTS = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")

_MR_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")
_WORD = re.compile(r"[a-z0-9£']+")
_F_WORDS = frozenset({"family", "families", "kid", "kids", "child", "children", "childrens", "children's"})
_NEGATIONS = frozenset({"not", "no", "non", "never", "nor", "without", "isnt", "arent"})
_ADULTS_ONLY = re.compile(r"\badults? only\b")
_PROXIMITY = 3  # "A ≤3 B"
_NEGATION_WINDOW = 4  # words before an F word that can negate it

# A rule reads the normalised text s and its words (the same words s joins) and says whether a value is realised.
Rule = Callable[[str, list[str]], bool]


# ---------------------------------------------------------------------------------------------------- parsing


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """'name[X], area[Y]' -> [('name', 'X'), ('area', 'Y')], in MR order. Raises ValueError on anything else."""
    pairs, end = [], 0
    for m in _MR_SLOT.finditer(mr):
        if m.start() != end:
            break
        pairs.append((m.group(1), m.group(2)))
        end = m.end()
    if end != len(mr) or not pairs:
        raise ValueError(f"not an E2E meaning representation (expected 'slot[value], ...'): {mr!r}")
    return pairs


def _words(text: str) -> list[str]:
    """'Family-friendly, £20-25!' -> ['family', 'friendly', '£20', '25']."""
    return _WORD.findall(text.lower().replace("-", " "))


# ------------------------------------------------------------------------------------------------------ rules


def _phrase(*phrases: str) -> Rule:
    """Realised when any of the phrases (regex fragments over normalised words) occurs in s between word boundaries."""
    pattern = re.compile("|".join(rf"\b{p}\b" for p in phrases))
    return lambda s, words: pattern.search(s) is not None


def _value_phrase(value: str, drop_the: bool = False) -> str:
    """A slot value as an escaped phrase of normalised words: 'The Rice Boat' -> 'rice boat' (drop_the)."""
    words = _words(value)
    if drop_the and len(words) > 1 and words[0] == "the":
        words = words[1:]
    return re.escape(" ".join(words))


def _near(a: str, b: str) -> Rule:
    """Realised when a word matching regex `a` is within 3 words (either side) of a word matching regex `b`.

    Patterns are matched at the start of a word: 'pric' is pric*, 'low$' is exactly 'low'.
    """
    pa, pb = re.compile(a), re.compile(b)

    def rule(s: str, words: list[str]) -> bool:
        ia = [i for i, w in enumerate(words) if pa.match(w)]
        if not ia:
            return False
        ib = [j for j, w in enumerate(words) if pb.match(w)]
        return any(0 < abs(i - j) <= _PROXIMITY for i in ia for j in ib)

    return rule


def _numbers(*present: str, absent: str | None = None) -> Rule:
    """Realised when every number of `present` occurs in s as a whole word or after "£", and `absent` does not."""
    need = [re.compile(rf"\b{n}\b") for n in present]
    avoid = re.compile(rf"\b{absent}\b") if absent else None
    return lambda s, words: all(p.search(s) for p in need) and not (avoid and avoid.search(s))


def _any(*rules: Rule) -> Rule:
    return lambda s, words: any(rule(s, words) for rule in rules)


def _family(s: str, words: list[str]) -> tuple[bool, bool]:
    """(some F word is not negated, some F word is negated) for the familyFriendly rules."""
    plain = negated = False
    for i, w in enumerate(words):
        if w in _F_WORDS:
            window = words[max(0, i - _NEGATION_WINDOW) : i]
            if any(v in _NEGATIONS or v.endswith("n't") for v in window):
                negated = True
            else:
                plain = True
    return plain, negated


def _family_yes(s: str, words: list[str]) -> bool:
    plain, negated = _family(s, words)
    return plain and not negated and not _ADULTS_ONLY.search(s)


def _family_no(s: str, words: list[str]) -> bool:
    return _family(s, words)[1] or _ADULTS_ONLY.search(s) is not None


_NUMBER_WORDS = {"1": "one", "3": "three", "5": "five"}

_FIXED_RULES: dict[tuple[str, str], Rule] = {
    ("eatType", "coffee shop"): _phrase("coffee shops?", "coffeeshop"),
    ("eatType", "pub"): _phrase("pubs?"),
    ("eatType", "restaurant"): _phrase("restaurants?"),
    ("area", "city centre"): _phrase("centre", "center"),
    ("area", "riverside"): _phrase(r"river\S*"),
    ("familyFriendly", "yes"): _family_yes,
    ("familyFriendly", "no"): _family_no,
    ("priceRange", "less than £20"): _numbers("20", absent="25"),
    ("priceRange", "£20-25"): _numbers("20", "25"),
    ("priceRange", "more than £30"): _numbers("30"),
    ("priceRange", "cheap"): _any(_phrase(r"cheap\S*", "inexpensive", "affordable"), _near("low$", "pric")),
    ("priceRange", "moderate"): _any(_phrase(r"moderate\S*"), _near("average$", "pric")),
    ("priceRange", "high"): _any(_phrase("expensive", "pricey", "costly"), _near("high", "pric")),
    **{("customer rating", level): _near(level, "rat") for level in ("low", "average", "high")},
    **{
        ("customer rating", f"{k} out of 5"): _phrase(f"{k} out of 5", f"{k} stars?", f"{_NUMBER_WORDS[k]} stars?")
        for k in _NUMBER_WORDS
    },
}


@cache
def _rule(slot: str, value: str) -> Rule:
    """The compiled rule of one (slot, value); ValueError for a slot or a fixed-vocabulary value the table lacks."""
    if slot in ("name", "near"):
        return _phrase(_value_phrase(value, drop_the=True))
    if slot == "food":
        extra = {"english": ("british",), "fast food": ("fastfood",)}.get(value.lower(), ())
        return _phrase(_value_phrase(value), *extra)
    if (slot, value) in _FIXED_RULES:
        return _FIXED_RULES[(slot, value)]
    raise ValueError(f"no E2E matching rule for slot {slot!r} with value {value!r} (slots: {', '.join(SLOTS)})")


def realised_slots(mr: str, text: str) -> list[bool]:
    """One bool per (slot, value) of `mr`, in MR order: does `text` realise it under the rules of the table above?"""
    words = _words(text)
    s = " ".join(words)
    return [_rule(slot, value)(s, words) for slot, value in parse_mr(mr)]


def slot_accuracy(mrs: Sequence[str], texts: Sequence[str]) -> tuple[int, int]:
    """(realised slot mentions, total slot mentions) over paired MRs and texts; accuracy = realised / total."""
    if len(mrs) != len(texts):
        raise ValueError(f"slot_accuracy: {len(mrs)} MRs but {len(texts)} texts")
    realised = total = 0
    for mr, text in zip(mrs, texts):
        flags = realised_slots(mr, text)
        realised += sum(flags)
        total += len(flags)
    return realised, total


def contradicted_slots(mr: str, text: str) -> list[bool]:
    """One bool per (slot, value) of `mr`, in MR order: does `text` realise another value of that slot from the
    synthetic rows' vocabulary (an invented or habitual value; slot accuracy counts only the MR's own values)?"""
    words = _words(text)
    s = " ".join(words)
    return [any(_rule(slot, v)(s, words) for v in _VALUES.get(slot, ()) if v != value) for slot, value in parse_mr(mr)]


def is_clean(mr: str, ref: str) -> bool:
    """A 'clean' row realises every slot of its MR (the rows Rho-1's reference model is trained on)."""
    return all(realised_slots(mr, ref))


# ------------------------------------------------------------------------------------------------------- data


def load_e2e(data_dir: str | Path) -> list[dict]:
    """Rows {'mr', 'ref'} of devset.csv.gz then testset_w_refs.csv.gz, pooled in file order (4,672 + 4,693 rows)."""
    rows = []
    for name in ("devset.csv.gz", "testset_w_refs.csv.gz"):
        path = Path(data_dir) / name
        if not path.exists():
            raise FileNotFoundError(f"E2E file not found: {path}")
        with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not {"mr", "ref"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{path}: expected columns 'mr' and 'ref', got {reader.fieldnames}")
            rows += [{"mr": r["mr"], "ref": r["ref"]} for r in reader]
    return rows


def split_e2e(rows: Sequence[dict], num_test: int = 150) -> tuple[list[dict], list[dict]]:
    """(train, test) by MR: the first `num_test` of the sorted distinct MRs after random.Random(0).shuffle are test.

    Every row of an MR goes to the same side, so every test MR is an unseen combination; rows keep their input order.
    """
    mrs = sorted({r["mr"] for r in rows})
    random.Random(0).shuffle(mrs)
    test_mrs = set(mrs[:num_test])
    train = [r for r in rows if r["mr"] not in test_mrs]
    test = [r for r in rows if r["mr"] in test_mrs]
    return train, test


def format_row(mr: str, ref: str) -> dict:
    """Prompt = '<s>' + MR + '<sep>'; completion = description + '</s>' (spec section 7)."""
    return {"prompt": f"<s>{mr}<sep>", "completion": f"{ref}</s>"}


# -------------------------------------------------------------------------------------------- synthetic rows

# Values of the real data set, so that synthetic and real MRs look alike.
_VALUES = {
    "name": ["Alimentum", "Aromi", "Blue Spice", "Browns Cambridge", "Clowns", "Cocum", "Cotto", "Fitzbillies",
             "Giraffe", "Green Man", "Loch Fyne", "Midsummer House", "Strada", "Taste of Cambridge",
             "The Cambridge Blue", "The Cricketers", "The Eagle", "The Golden Palace", "The Mill", "The Phoenix",
             "The Plough", "The Punter", "The Vaults", "The Waterman", "The Wrestlers", "Wildwood", "Zizzi"],
    "eatType": ["coffee shop", "pub", "restaurant"],
    "food": ["Chinese", "English", "Fast food", "French", "Indian", "Italian", "Japanese"],
    "priceRange": ["cheap", "high", "less than £20", "moderate", "more than £30", "£20-25"],
    "customer rating": ["1 out of 5", "3 out of 5", "5 out of 5", "average", "high", "low"],
    "area": ["city centre", "riverside"],
    "familyFriendly": ["no", "yes"],
    "near": ["All Bar One", "Avalon", "Burger King", "Café Brazil", "Café Rouge", "Café Sicilia", "Clare Hall",
             "Crowne Plaza Hotel", "Express by Holiday Inn", "Rainbow Vegetarian Café", "Ranch", "The Bakers",
             "The Portland Arms", "The Sorrento"],
}  # fmt: skip

# Phrasings of each value as a clause completing "It ..." / "{name} ..." ({v} = the value as written in the MR).
_CLAUSES = {
    "food": ["serves {v} food", "offers {v} cuisine", "has a menu of {v} dishes", "specialises in {v} food"],
    "fast food": ["serves fast food", "offers fast food", "is a fast food place", "specialises in fast food"],
    "area": {
        "city centre": ["is in the city centre", "is located in the centre of town", "sits in the center of the city"],
        "riverside": ["is by the riverside", "is on the river", "is in the riverside area", "overlooks the river"],
    },
    "near": ["is near {v}", "is close to {v}", "is not far from {v}", "can be found next to {v}"],
    "priceRange": {
        "cheap": ["is cheap", "has low prices", "is inexpensive", "is affordable"],
        "moderate": ["is moderately priced", "has average prices", "has moderate prices"],
        "high": ["is expensive", "has high prices", "is pricey", "is in the high price range"],
        "less than £20": ["costs less than £20", "has prices under £20", "is in the under £20 price range"],
        "£20-25": ["costs £20-25", "has prices of £20-25", "is in the £20-25 price range"],
        "more than £30": ["costs more than £30", "has prices over £30", "is in the more than £30 price range"],
    },
    "customer rating": {
        "low": ["has a low customer rating", "is rated low by customers", "has a low rating"],
        "average": ["has an average customer rating", "is rated average", "has an average rating"],
        "high": ["has a high customer rating", "is highly rated", "has a high rating"],
        "1 out of 5": ["is rated 1 out of 5", "has a customer rating of 1 out of 5", "has one star"],
        "3 out of 5": ["is rated 3 out of 5", "has a customer rating of 3 out of 5", "has three stars"],
        "5 out of 5": ["is rated 5 out of 5", "has a customer rating of 5 out of 5", "has five stars"],
    },
    "familyFriendly": {
        "yes": ["is family friendly", "is kid-friendly", "welcomes families", "is a good place for children"],
        "no": ["is not family friendly", "is adults only", "does not welcome kids", "is not suitable for children"],
    },
}
_EAT_NOUNS = {"coffee shop": ["coffee shop"], "pub": ["pub"], "restaurant": ["restaurant"], None: ["place", "venue"]}
_OPENINGS = [
    "{name} is {a} {noun}.",
    "There is {a} {noun} called {name}.",
    "{name} is {a} {noun} worth a visit.",
    "Try {name}, {a} {noun}.",
]


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


# A careless writer's habit: the value a noisy description states for a slot whatever its MR says. It is text that a
# text-only LM learns to expect (PRIOR's reference finds it easy) and that the clean-row RM finds unlikely given the MR.
HABITS = {
    "eatType": "restaurant",
    "food": "English",
    "priceRange": "moderate",
    "customer rating": "average",
    "area": "city centre",
    "familyFriendly": "yes",
    "near": "Café Rouge",
}


def make_synthetic_e2e(n: int, seed: int, other_slots: tuple[int, int] = (2, 7), noise: float = 0.0) -> list[dict]:
    """`n` rows {'mr', 'ref'} made from templates: random slot subsets (name always present, `other_slots` others),
    MR in the E2E slot order, several phrasings per value, clauses in random order. Deterministic per seed.

    With `noise` = 0 every description realises every slot of its MR under the matcher (the quickstart's data when
    ../shared is absent). With `noise` = q each other slot's description states, with probability q, the writer's
    habit `HABITS[slot]` instead of the MR's value: MR-independent text that NTP learns as it learns the truth, and
    the row is no longer clean unless every such value happens to equal the MR's (like real E2E references, which miss
    or misstate about a tenth of their slots).
    """
    lo, hi = other_slots
    if not 0 <= lo <= hi <= len(SLOTS) - 1:
        raise ValueError(f"other_slots must be [lo, hi] with 0 <= lo <= hi <= {len(SLOTS) - 1}, got {other_slots}")
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        others = rng.sample(SLOTS[1:], rng.randint(lo, hi))
        mr_slots = {"name": rng.choice(_VALUES["name"])}
        mr_slots.update({slot: rng.choice(_VALUES[slot]) for slot in others})
        mr = ", ".join(f"{slot}[{mr_slots[slot]}]" for slot in SLOTS if slot in mr_slots)
        said = dict(mr_slots)  # the values the description states
        if noise:
            for slot in SLOTS[1:]:
                if slot in said and rng.random() < noise:
                    said[slot] = HABITS[slot]

        # Opening sentence: name + eatType (the noun), with the food as an adjective half of the time.
        noun = rng.choice(_EAT_NOUNS[said.get("eatType")])
        clause_slots = [slot for slot in SLOTS[2:] if slot in said]
        if "food" in said and rng.random() < 0.5:
            noun = f"{said['food'].replace('Fast', 'fast')} {noun}"
            clause_slots.remove("food")
        name = said["name"]
        opening = rng.choice(_OPENINGS).format(name=name, a=_article(noun), noun=noun)

        # One clause per remaining slot, in random order, joined in sentences of one or two clauses.
        rng.shuffle(clause_slots)
        clauses = []
        for slot in clause_slots:
            value = said[slot]
            options = _CLAUSES["fast food" if value == "Fast food" else slot]
            options = options[value] if isinstance(options, dict) else options
            clauses.append(rng.choice(options).format(v=value))
        sentences = [opening]
        subject = ("It", name)
        while clauses:
            take = clauses[:2] if len(clauses) > 1 and rng.random() < 0.5 else clauses[:1]
            clauses = clauses[len(take) :]
            sentences.append(f"{rng.choice(subject)} {' and '.join(take)}.")
        rows.append({"mr": mr, "ref": " ".join(sentences)})
    return rows


# ---------------------------------------------------------------------------------------------- PRIOR diagnostic

DIAGNOSTIC_SLOTS = ("name", "near", "food", "eatType", "area")


def prior_weight_diagnostic(rows, tokenizer, weights_per_row) -> dict[str, float]:
    """Mean PRIOR weight on the first token of each value mention, on the mention's other tokens, on all other
    tokens, and on `</s>` (spec section 7). `rows` are prompt/completion/mr rows; `weights_per_row` the per-sequence
    normalised weights aligned to each row's completion tokens (as the trainer computes them)."""
    sums = {"value_first": [0.0, 0], "value_rest": [0.0, 0], "other": [0.0, 0], "eos": [0.0, 0]}
    for row, weights in zip(rows, weights_per_row):
        prompt, completion = row["prompt"], row["completion"]
        if not completion.endswith(tokenizer.eos_token):
            completion += tokenizer.eos_token
        enc = tokenizer(prompt + completion, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        start = len(prompt)
        # completion tokens: those starting at or after the prompt end (the trainer's completion ids, in order)
        spans = [(s - start, e - start) for s, e in offsets if s >= start][-len(weights) :]
        text = completion.lower()
        kind = ["other"] * len(spans)
        for slot, value in parse_mr(row["mr"]):
            if slot not in DIAGNOSTIC_SLOTS:
                continue
            for m in re.finditer(re.escape(value.lower()), text):
                touched = [i for i, (s, e) in enumerate(spans) if s < m.end() and e > m.start()]
                for n, i in enumerate(touched):
                    kind[i] = "value_first" if n == 0 else ("value_rest" if kind[i] != "value_first" else kind[i])
        kind[-1] = "eos"
        for k, w in zip(kind, weights):
            sums[k][0] += w
            sums[k][1] += 1
    return {k: (s / n if n else float("nan")) for k, (s, n) in sums.items()}
