"""E2E slot matcher, split and synthetic rows (spec `specs/weighted_ntp.md` sections 6 and 7).

The counts over the real data were hand-checked in the spec; the tests that need ../shared/data/e2e skip without it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tokentrain.tasks.e2e import (
    format_row,
    is_clean,
    load_e2e,
    make_synthetic_e2e,
    parse_mr,
    realised_slots,
    slot_accuracy,
    split_e2e,
)


def shared_e2e_dir() -> Path:
    """../shared/data/e2e beside the checkout, or $TOKENTRAIN_SHARED_DATA/e2e; skips the test when absent."""
    root = os.environ.get("TOKENTRAIN_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
    path = Path(root) / "e2e"
    if not (path / "devset.csv.gz").exists() or not (path / "testset_w_refs.csv.gz").exists():
        pytest.skip(f"E2E data not found at {path} (set TOKENTRAIN_SHARED_DATA to the folder holding e2e/)")
    return path


@pytest.fixture(scope="module")
def e2e_rows():
    return load_e2e(shared_e2e_dir())


def realised(slot: str, value: str, text: str) -> bool:
    """Is one (slot, value) realised in `text`? (an MR with a name first, as every E2E MR has)"""
    flags = realised_slots(f"name[Zizzi], {slot}[{value}]", text)
    return flags[1]


# ------------------------------------------------------------------------------------------------------ parse


def test_parse_mr():
    mr = "name[The Eagle], eatType[coffee shop], priceRange[£20-25], customer rating[3 out of 5]"
    assert parse_mr(mr) == [
        ("name", "The Eagle"),
        ("eatType", "coffee shop"),
        ("priceRange", "£20-25"),
        ("customer rating", "3 out of 5"),
    ]
    assert parse_mr("name[X],area[Y]") == [("name", "X"), ("area", "Y")]
    for bad in ("", "name X", "name[X] area[Y]", "name[X], garbage"):
        with pytest.raises(ValueError, match="meaning representation"):
            parse_mr(bad)


def test_unknown_value_is_an_error():
    with pytest.raises(ValueError, match="eatType.*bistro"):
        realised_slots("name[X], eatType[bistro]", "X is a bistro.")


# ------------------------------------------------------------------------------------------ the spec's sentences


def test_spec_worked_sentences():
    # The negation "not" is 1 word before "family": a negated F word -> no, never yes.
    assert realised("familyFriendly", "no", "It is not family-friendly.")
    assert not realised("familyFriendly", "yes", "It is not family-friendly.")
    # "high" is 1 word before "prices" (high* ≤3 pric*); "low" is 1 word before "rating"; "high" is 5 words from
    # "rating", too far for customer rating[high].
    mr = "name[X], priceRange[high], customer rating[low], customer rating[high]"
    assert realised_slots(mr, "high prices and a low rating") == [False, True, True, False]
    # "£20-25" -> words "£20", "25": 20 and 25 -> £20-25; "less than £20" needs 20 and no 25.
    assert realised("priceRange", "£20-25", "a price range of £20-25")
    assert not realised("priceRange", "less than £20", "a price range of £20-25")
    # "1-star" -> "1 star" -> `1 stars?` -> 1 out of 5.
    assert realised("customer rating", "1 out of 5", "a 1-star pub")


# ---------------------------------------------------------------------------------------------- one rule each

RULE_CASES = [
    # name / near: the value's words as a phrase, a leading "the" dropped, case and hyphens ignored.
    ("name", "The Eagle", "Eagle is a pub.", True),
    ("name", "The Eagle", "the eagle's menu", True),  # "eagle's" is one word, but \b splits before the "'"
    ("name", "The Eagle", "Eagles fly here.", False),  # "eagles" is another word
    ("name", "Loch Fyne", "Loch-Fyne serves fish.", True),  # "-" -> space
    ("near", "Café Rouge", "It is near Café Rouge.", True),  # "é" is no word character: "caf rouge" on both sides
    ("near", "Café Rouge", "It is near Cafe Rouge.", False),  # "cafe rouge" is not "caf rouge"
    ("near", "Express by Holiday Inn", "next to the Holiday Inn", False),  # the whole phrase is needed
    # eatType
    ("eatType", "coffee shop", "a coffee-shop", True),
    ("eatType", "coffee shop", "one of the coffeeshops", False),  # only `coffeeshop`, no plural
    ("eatType", "coffee shop", "They serve coffee.", False),
    ("eatType", "pub", "two pubs", True),
    ("eatType", "pub", "a public house", False),
    ("eatType", "restaurant", "restaurants nearby", True),
    # food
    ("food", "English", "British breakfasts", True),
    ("food", "English", "English-style", True),
    ("food", "Fast food", "a fastfood place", True),
    ("food", "Fast food", "it is fast", False),
    ("food", "Italian", "Italy", False),
    # area
    ("area", "city centre", "downtown, in the center", True),
    ("area", "city centre", "in the city", False),
    ("area", "riverside", "on the river bank", True),
    ("area", "riverside", "by the Riverside", True),
    ("area", "riverside", "by the water", False),
    # familyFriendly: F words, a negation among the 4 words before one, or "adult(s) only".
    ("familyFriendly", "yes", "Kids are welcome.", True),
    ("familyFriendly", "yes", "a children's menu", True),  # "children's" is an F word
    ("familyFriendly", "yes", "It welcomes families.", True),
    ("familyFriendly", "yes", "It is adults only, no kids.", False),
    ("familyFriendly", "no", "It isn't kid friendly.", True),  # "isn't" ends in n't
    ("familyFriendly", "no", "It is not a place for children.", True),  # "not" is 4 words before "children"
    ("familyFriendly", "no", "It is not the best place for children.", False),  # "not" is 5 words before
    ("familyFriendly", "yes", "It is not the best place for children.", True),  # ... so the F word counts as yes
    ("familyFriendly", "no", "An adult only venue.", True),
    ("familyFriendly", "no", "Children are not welcome.", False),  # the negation comes after the F word
    ("familyFriendly", "yes", "Families love it, though it is not kid friendly.", False),  # one negated F word: not yes
    ("familyFriendly", "no", "Families love it, though it is not kid friendly.", True),
    # priceRange: numbers match at word boundaries ("£20" contains "20"), words by prefix or proximity.
    ("priceRange", "less than £20", "under 20 pounds", True),
    ("priceRange", "less than £20", "£20 to £25", False),  # 25 present -> £20-25
    ("priceRange", "less than £20", "£200", False),  # "200" is not "20"
    ("priceRange", "£20-25", "between £20 and £25", True),
    ("priceRange", "more than £30", "over £30 a head", True),
    ("priceRange", "more than £30", "over thirty pounds", False),
    ("priceRange", "cheap", "cheaply", True),  # cheap*
    ("priceRange", "cheap", "low-priced food", True),  # low ≤3 pric*
    ("priceRange", "cheap", "prices are quite low", True),  # either order: "low" 3 words after "prices"
    ("priceRange", "cheap", "prices are really quite low", False),  # 4 words after: too far
    ("priceRange", "cheap", "low prices", True),
    ("priceRange", "cheap", "lower prices", False),  # low is a whole word, not a prefix
    ("priceRange", "moderate", "moderately priced", True),
    ("priceRange", "moderate", "average pricing", True),
    ("priceRange", "moderate", "an average place", False),
    ("priceRange", "high", "pricey", True),
    ("priceRange", "high", "highly priced", True),  # high* ≤3 pric*
    ("priceRange", "high", "inexpensive", False),  # \bexpensive\b does not match inside "inexpensive"
    ("priceRange", "high", "high quality food at fair prices", False),  # "high" is 5 words from "prices"
    # customer rating
    ("customer rating", "5 out of 5", "rated 5 out of 5", True),
    ("customer rating", "5 out of 5", "five stars", True),
    ("customer rating", "5 out of 5", "a 5 star place", True),
    ("customer rating", "3 out of 5", "three-star", True),
    ("customer rating", "3 out of 5", "3 out of 10", False),
    ("customer rating", "1 out of 5", "one out of five", False),  # only digits in "k out of 5"
    ("customer rating", "high", "highly rated", True),  # high* ≤3 rat*
    ("customer rating", "average", "rated as being average", True),  # rat* 3 words before
    ("customer rating", "low", "a low customer satisfaction rating", True),  # "low" 3 words before "rating"
    ("customer rating", "low", "low prices, a great rating", False),  # "low" 4 words from "rating"
]


@pytest.mark.parametrize(("slot", "value", "text", "expected"), RULE_CASES)
def test_slot_rules(slot, value, text, expected):
    assert realised(slot, value, text) is expected


def test_slot_accuracy_and_is_clean():
    mrs = ["name[Aromi], eatType[pub], area[riverside]", "name[The Mill], familyFriendly[no]"]
    texts = ["Aromi is a pub in the city centre.", "The Mill is not for families."]
    assert realised_slots(mrs[0], texts[0]) == [True, True, False]
    assert slot_accuracy(mrs, texts) == (4, 5)
    assert not is_clean(mrs[0], texts[0])
    assert is_clean(mrs[1], texts[1])
    with pytest.raises(ValueError, match="2 MRs but 1 texts"):
        slot_accuracy(mrs, texts[:1])


def test_format_row():
    # Spec section 7: prompt = <s> + MR + <sep>; completion = description + </s>.
    assert format_row("name[Aromi]", "Aromi is nice.") == {
        "prompt": "<s>name[Aromi]<sep>",
        "completion": "Aromi is nice.</s>",
    }


# ------------------------------------------------------------------------------------------ real data (spec)


def test_human_references(e2e_rows):
    # Spec section 6: 9,365 references realise 53,519 of 60,091 slots (0.890633).
    assert len(e2e_rows) == 9365
    assert e2e_rows[0]["mr"] == "name[Alimentum], area[city centre], familyFriendly[no]"  # devset first
    realised_, total = slot_accuracy([r["mr"] for r in e2e_rows], [r["ref"] for r in e2e_rows])
    assert (realised_, total) == (53519, 60091)
    assert round(realised_ / total, 6) == 0.890633


def test_split(e2e_rows):
    train, test = split_e2e(e2e_rows)
    train_mrs, test_mrs = {r["mr"] for r in train}, {r["mr"] for r in test}
    assert (len(test_mrs), len(test)) == (150, 1106)
    assert (len(train_mrs), len(train)) == (1027, 8259)
    assert not train_mrs & test_mrs
    # Rows keep their input order on each side.
    index = {id(r): i for i, r in enumerate(e2e_rows)}
    assert [index[id(r)] for r in test] == sorted(index[id(r)] for r in test)
    assert [index[id(r)] for r in train] == sorted(index[id(r)] for r in train)
    # "The first test MR" of the spec is the first of the shuffled MR list (not the first test row, a devset MR).
    mrs = sorted({r["mr"] for r in e2e_rows})
    random.Random(0).shuffle(mrs)
    assert set(mrs[:150]) == test_mrs
    assert mrs[0] == (
        "name[Browns Cambridge], eatType[coffee shop], food[English], customer rating[high], area[riverside], "
        "familyFriendly[yes], near[Crowne Plaza Hotel]"
    )
    # 1,015 slot mentions in the 150 test MRs; every test (slot, value) occurs in train.
    test_slots = [pair for mr in test_mrs for pair in parse_mr(mr)]
    assert len(test_slots) == 1015
    assert set(test_slots) <= {pair for mr in train_mrs for pair in parse_mr(mr)}
    # Rho-1's RM trains on the clean rows: 4,853 of 8,259.
    assert sum(is_clean(r["mr"], r["ref"]) for r in train) == 4853
    # The human references of the test rows: 6,448 of 7,121 slot mentions (0.9055).
    realised_, total = slot_accuracy([r["mr"] for r in test], [r["ref"] for r in test])
    assert (realised_, total) == (6448, 7121)
    assert round(realised_ / total, 4) == 0.9055


def test_load_e2e_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="devset.csv.gz"):
        load_e2e(tmp_path)


# ------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_clean():
    rows = make_synthetic_e2e(500, seed=0)
    assert rows == make_synthetic_e2e(500, seed=0)
    assert rows != make_synthetic_e2e(500, seed=1)
    assert len(rows) == 500 and all(set(r) == {"mr", "ref"} for r in rows)
    for seed in range(5):  # every generated description realises every slot of its MR
        for r in make_synthetic_e2e(1000, seed=seed):
            assert is_clean(r["mr"], r["ref"]), r
    # Varied: name always first, 3-8 slots, many distinct MRs and descriptions.
    sizes = {len(parse_mr(r["mr"])) for r in rows}
    assert all(parse_mr(r["mr"])[0][0] == "name" for r in rows)
    assert min(sizes) == 3 and max(sizes) == 8
    assert len({r["mr"] for r in rows}) > 400 and len({r["ref"] for r in rows}) > 450


def test_synthetic_split_for_quickstart():
    # The quickstart splits synthetic rows like the real ones, with a tenth of the MRs as test.
    rows = make_synthetic_e2e(200, seed=3)
    num_test = max(10, len({r["mr"] for r in rows}) // 10)
    train, test = split_e2e(rows, num_test=num_test)
    assert len({r["mr"] for r in test}) == num_test
    assert len(train) + len(test) == 200


def test_prior_weight_diagnostic_buckets(tiny_tokenizer):
    from tokentrain.tasks.e2e import prior_weight_diagnostic

    row = {"mr": "name[Aromi], area[riverside]", "prompt": "<s>name[Aromi], area[riverside]<sep>"}
    row["completion"] = "Aromi is by the riverside.</s>"
    full = tiny_tokenizer(row["prompt"] + row["completion"], return_offsets_mapping=True)
    start = len(row["prompt"])
    spans = [(s - start, e - start) for s, e in full["offset_mapping"] if s >= start]
    weights = [float(i + 1) for i in range(len(spans))]  # weight i+1 on completion token i
    out = prior_weight_diagnostic([row], tiny_tokenizer, [weights])
    # "Aromi" starts the completion: its first token has weight 1; "</s>" is the last token
    assert out["value_first"] > 0 and out["eos"] == len(spans)
    first_aromi = 1.0
    first_river = 1.0 + next(i for i, (s, e) in enumerate(spans) if s <= row["completion"].index("riverside") < e)
    assert out["value_first"] == pytest.approx((first_aromi + first_river) / 2)


def test_synthetic_noise_states_habits_and_other_slots_bound_the_mr():
    from tokentrain.tasks.e2e import HABITS

    assert make_synthetic_e2e(300, seed=4, other_slots=(2, 7), noise=0.0) == make_synthetic_e2e(300, seed=4)
    rows = make_synthetic_e2e(2000, seed=0, other_slots=(1, 3), noise=0.3)
    assert {len(parse_mr(r["mr"])) for r in rows} == {2, 3, 4}
    slips = mentions = 0
    for r in rows:
        pairs = parse_mr(r["mr"])
        said = ", ".join(
            f"{s}[{v if ok else HABITS[s]}]" for (s, v), ok in zip(pairs, realised_slots(r["mr"], r["ref"]))
        )
        # every slot the description misses is one where it states the habit instead (and the name is never missed)
        assert all(realised_slots(said, r["ref"])), r
        assert realised_slots(r["mr"], r["ref"])[0]
        mentions += sum(v != HABITS[s] for s, v in pairs[1:])
        slips += sum(not ok for ok in realised_slots(r["mr"], r["ref"]))
    assert 0.25 < slips / mentions < 0.35  # each non-habit value slips with probability 0.3
    clean = sum(is_clean(r["mr"], r["ref"]) for r in rows) / len(rows)
    assert 0.5 < clean < 0.8, clean
    with pytest.raises(ValueError, match="noise"):
        make_synthetic_e2e(5, seed=0, noise=1.0)
    with pytest.raises(ValueError, match="other_slots"):
        make_synthetic_e2e(5, seed=0, other_slots=(3, 8))


def test_contradicted_slots_flags_another_value_of_the_slot():
    from tokentrain.tasks.e2e import contradicted_slots

    mr = "name[Aromi], eatType[pub], priceRange[£20-25], area[riverside]"
    # "a restaurant" states another eatType, "in the city centre" another area; £20-25 is not "less than £20"
    text = "Aromi is a restaurant. It costs £20-25 and is in the city centre."
    assert contradicted_slots(mr, text) == [False, True, False, True]
    assert realised_slots(mr, text) == [True, False, True, False]
    assert contradicted_slots(mr, "Aromi is a pub by the river. It costs £20-25.") == [False] * 4
    assert contradicted_slots(mr, "Zizzi is a pub.")[0]  # another name
