"""Tests for tokentrain/signals/anchors.py: the dictionary and its load-time errors, matching, translation, the exact
token alignment (spec specs/unlearning.md sections 2.2-2.4, 6 vector 3 and 9), the forget-row builder, and the shipped
Alice dictionary and familiarity prompts (checked against ../shared/data/text/alice.txt.gz when present)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tokentrain.signals.anchors import (
    AnchorTerms,
    AnchorTermsError,
    align_row,
    block_rows,
    check_match_counts,
    load_anchor_terms,
    match_counts,
    read_text,
    require_fast_tokenizer,
    term_first_tokens,
    text_blocks,
    tokenize_with_offsets,
)

REPO = Path(__file__).resolve().parents[1]
ALICE_TERMS = REPO / "recipes" / "unlearning" / "alice_terms.yaml"
ALICE_PROMPTS = REPO / "recipes" / "unlearning" / "familiarity_prompts.jsonl"
ALICE_TEXT = REPO.parent / "shared" / "data" / "text" / "alice.txt.gz"
if not ALICE_TEXT.exists():
    ALICE_TEXT = Path("/work/shared/data/text/alice.txt.gz")

# ---------------------------------------------------------------------------------------------- dictionary errors


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("empty_term.yaml", '"  ": hare\nAlice: Mary\n', r"entry '  ': the term is empty"),
        ("empty_translation.yaml", 'Alice: "   "\n', r"term 'Alice': the translation is empty"),
        ("same.yaml", "Alice: Alice\nRabbit: hare\n", r"term 'Alice': the translation equals the term"),
        ("same_spaces.yaml", '"White  Rabbit": "White Rabbit"\n', r"'White  Rabbit': the translation equals"),
        ("dup.yaml", "Alice: Mary\nRabbit: hare\nAlice: Jane\n", r"duplicate key 'Alice'"),
        ("dup_spaces.yaml", '"White Rabbit": hare\n"White  Rabbit": rat\n', r"duplicate key 'White  Rabbit'"),
        ("dup.json", '{"Alice": "Mary", "Alice": "Jane"}', r"duplicate key 'Alice'"),
        (
            "overlap.yaml",
            "Mock Turtle: old seal\nTurtle Soup: broth\n",
            r"keys 'Mock Turtle' and 'Turtle Soup' partially overlap on 'Turtle'",
        ),
        ("empty.yaml", "", r"no entry"),
        ("empty_map.yaml", "{}\n", r"no entry"),
        ("empty.json", "{}", r"no entry"),
        ("list.yaml", "- Alice\n- Rabbit\n", r"top level must be a mapping"),
        ("list.json", '["Alice"]', r"top level must be a mapping"),
        ("bool.yaml", "yes: no\n", r"must be strings"),
        ("number.json", '{"Alice": 3}', r"'Alice': 3: terms and translations must be strings"),
        ("nested.yaml", "Alice:\n  Mary: Jane\n", r"must be strings"),
        ("bad.yaml", "Alice: [Mary\n", r"not valid YAML"),
        ("bad.json", '{"Alice": ', r"not valid JSON"),
    ],
)
def test_dictionary_errors_name_the_keys(tmp_path, name, text, expected):
    path = write(tmp_path, name, text)
    with pytest.raises(AnchorTermsError, match=expected) as err:
        load_anchor_terms(path)
    assert str(path) in str(err.value)


def test_unreadable_dictionary(tmp_path):
    with pytest.raises(AnchorTermsError, match=r"missing\.yaml: cannot read"):
        load_anchor_terms(tmp_path / "missing.yaml")


def test_every_problem_is_listed_at_once(tmp_path):
    path = write(tmp_path, "many.yaml", "Alice: Alice\nRabbit: hare\nRabbit: rat\nMock Turtle: a\nTurtle Soup: b\n")
    with pytest.raises(AnchorTermsError) as err:
        load_anchor_terms(path)
    message = str(err.value)
    assert "'Alice'" in message and "duplicate key 'Rabbit'" in message and "'Turtle Soup'" in message


def test_partial_overlap_rule():
    """Suffix at a word start = prefix at a word end is an error; containment and within-word overlaps are not."""
    AnchorTerms.from_pairs([("White Rabbit", "grey hare"), ("Rabbit", "hare")])  # containment: allowed
    AnchorTerms.from_pairs([("Frog-Footman", "doorman"), ("Footman", "servant")])  # suffix = whole B: containment
    AnchorTerms.from_pairs([("Queen", "Countess"), ("Queenly", "grand")])  # a prefix, not an overlap
    AnchorTerms.from_pairs([("Hatter", "tailor"), ("terrible", "awful")])  # "ter" is inside words: no valid match
    with pytest.raises(AnchorTermsError, match=r"'Cheshire Cat' and 'Cat food' partially overlap on 'Cat'"):
        AnchorTerms.from_pairs([("Cheshire Cat", "striped cat"), ("Cat food", "kibble")])
    with pytest.raises(AnchorTermsError, match=r"'Fish-Footman' and 'Footman Jones' partially overlap on 'Footman'"):
        AnchorTerms.from_pairs([("Fish-Footman", "messenger"), ("Footman Jones", "servant")])


def test_yaml_and_json_load_the_same(tmp_path):
    y = load_anchor_terms(write(tmp_path, "d.yaml", '"White Rabbit": grey hare\nAlice: Mary\n'))
    j = load_anchor_terms(write(tmp_path, "d.json", json.dumps({"White Rabbit": "grey hare", "Alice": "Mary"})))
    assert y.terms == j.terms == {"White Rabbit": "grey hare", "Alice": "Mary"}


# ------------------------------------------------------------------------------------------------------ matching


def spans(anchors, text):
    return [(text[m.start : m.end], m.term) for m in anchors.find(text)]


def test_matching_rules():
    anchors = AnchorTerms.from_pairs(
        [("Alice", "Mary"), ("Rabbit", "hare"), ("White Rabbit", "grey hare"), ("Queen", "Countess"), ("-race", "x")]
    )
    # whole words: "Alice's" and "Rabbit-hole" match, "Queenly" and "Alicee" do not; case-sensitive
    assert spans(anchors, "Alice's Rabbit-hole, a Queenly queen; Alicee") == [("Alice", "Alice"), ("Rabbit", "Rabbit")]
    # the longest term at an offset wins; a space matches any whitespace run; the scan resumes after a match
    assert spans(anchors, "the White \n  Rabbit and the Rabbit") == [
        ("White \n  Rabbit", "White Rabbit"),
        ("Rabbit", "Rabbit"),
    ]
    # a term starting with a non-word character needs no boundary before it ("Caucus-race")
    assert spans(anchors, "a Caucus-race") == [("-race", "-race")]
    assert spans(anchors, "WhiteRabbit Rabbits") == []


def test_longest_first_backtracks_to_shorter_term():
    anchors = AnchorTerms.from_pairs([("Queen", "Countess"), ("Queen of Hearts", "red Countess")])
    assert spans(anchors, "the Queen of Heartsease") == [("Queen", "Queen")]  # the longer one fails on "Heartsease"
    assert spans(anchors, "the Queen of Hearts.") == [("Queen of Hearts", "Queen of Hearts")]


def test_translation():
    anchors = AnchorTerms.from_pairs([("White Rabbit", "hare"), ("Alice", "Mary Jane")])
    s = "the White Rabbit saw Alice and Alice ran"
    assert anchors.translate(s) == "the hare saw Mary Jane and Mary Jane ran"


def test_match_counts_warn_and_fail(caplog):
    anchors = AnchorTerms.from_pairs([("Alice", "Mary"), ("Dodo", "parrot")], source="d.yaml")
    counts = match_counts(anchors, ["Alice and Alice", "Alice"])
    assert counts == {"Alice": 3, "Dodo": 0}
    with caplog.at_level(logging.WARNING):
        table = check_match_counts(anchors, counts)
    assert "3 matches of 2 terms" in table and "Dodo" in caplog.text
    with pytest.raises(AnchorTermsError, match=r"d\.yaml: no term of the dictionary occurs"):
        check_match_counts(anchors, match_counts(anchors, ["nothing here"]))


# ------------------------------------------------------------------------------------------- alignment (vector 3)

WORDS = "the White Rabbit saw Alice and ran hare Mary Jane".split()


def word_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    """WordLevel over whitespace, ids 0..9 = WORDS, 10 = <bos>, 11 = <pad>; offsets are exact character spans."""
    vocab = {w: i for i, w in enumerate([*WORDS, "<bos>", "<pad>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 10)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>")


VECTOR3 = AnchorTerms.from_pairs([("White Rabbit", "hare"), ("Alice", "Mary Jane")])
S3 = "the White Rabbit saw Alice and Alice ran"


def test_vector3_alignment_from_offsets():
    tok = word_tokenizer(bos=False)
    s_ids, s_off = tokenize_with_offsets(tok, S3, True)
    z = VECTOR3.translate(S3)
    z_ids, z_off = tokenize_with_offsets(tok, z, True)
    assert [e for _, e in s_off] == [3, 9, 16, 20, 26, 30, 36, 40]  # d
    assert [e for _, e in z_off] == [3, 8, 12, 17, 22, 26, 31, 36, 40]  # d' (8 -> 9 tokens)
    align = align_row(s_off, z_off, z_ids, VECTOR3.find(S3), VECTOR3.terms)
    # q_j for j = 1..7: [1, -, 2, 3, 5, 6, 8] (baseline rows [0, -, 1, 2, 4, 5, 7]); j = 0 has no prefix
    assert align.q == [None, 1, None, 2, 3, 5, 6, 8]
    weights = [float(q is not None and not r) for q, r in zip(align.q, align.repeat)]
    assert weights == [0, 1, 0, 1, 1, 1, 0, 1]  # j=2 inside "White Rabbit"; j=6 the repeated "Alice" (rule (a))
    assert align.repeat == [False] * 6 + [True, False]
    assert align.term_first == [False, True, False, False, True, False, False, False]  # "White", first "Alice"
    assert align.in_match == [False, True, True, False, True, False, True, False]
    # rule (b): P_j = first z tokens of translations of terms whose first match ends at or before e_j
    hare, mary = WORDS.index("hare"), WORDS.index("Mary")
    assert align.penalty == [[], [], [], [hare], [hare], sorted([hare, mary]), sorted([hare, mary]), [hare, mary]]


def test_vector3_with_bos_shifts_by_one():
    tok = word_tokenizer(bos=True)
    s_ids, s_off = tokenize_with_offsets(tok, S3, True)
    z_ids, z_off = tokenize_with_offsets(tok, VECTOR3.translate(S3), True)
    assert s_off[0] == (0, 0) and s_ids[0] == 10
    align = align_row(s_off, z_off, z_ids, VECTOR3.find(S3), VECTOR3.terms)
    assert align.q == [None, 1, 2, None, 3, 4, 6, 7, 9]  # the first word now has a prefix (BOS): q = 1
    weights = [float(q is not None and not r) for q, r in zip(align.q, align.repeat)]
    assert weights == [0, 1, 1, 0, 1, 1, 1, 0, 1]


def test_phi_and_condition_one_on_split_characters():
    """Byte-level BPE can split one character over tokens that share its end offset: the position after the first
    piece is not aligned (condition (1), d_j > d_{j-1}, fails) and the one after the last piece counts every piece."""
    # s = "aé b": tokens "a" (0,1), two byte pieces of "é" both (1,2), " b" (2,4)
    s_off = [(0, 1), (1, 2), (1, 2), (2, 4)]
    align = align_row(s_off, s_off, [0, 1, 2, 3], [], {})
    # j=1: e=1, d_1=2 > 1, boundary in z at 1 (q=1); j=2: d_2 = d_1 = 2 -> not aligned; j=3: e=2, q = 3 (both pieces)
    assert align.q == [None, 1, None, 3]


def test_translation_with_fewer_and_more_tokens_keeps_prefixes():
    """The position predicting a term's first token keeps its prefix; the one after maps to the translation's end."""
    tok = word_tokenizer(bos=False)
    anchors = AnchorTerms.from_pairs([("Mary Jane", "Alice")])
    s = "the Mary Jane saw ran"  # 5 tokens -> z = "the Alice saw ran", 4 tokens
    s_ids, s_off = tokenize_with_offsets(tok, s, True)
    z_ids, z_off = tokenize_with_offsets(tok, anchors.translate(s), True)
    align = align_row(s_off, z_off, z_ids, anchors.find(s), anchors.terms)
    # j=1 ("Mary") conditions on "the" -> z row 0; j=2 ("Jane") inside the term; j=3 ("saw") after -> z row 1
    assert align.q == [None, 1, None, 2, 3]
    assert term_first_tokens(s_off, anchors.find(s)) == [1]


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match=r"need a fast tokenizer \(character offsets\): Slow"):
        require_fast_tokenizer(Slow())


# ------------------------------------------------------------------------------------------------ forget blocks


def test_text_blocks_pack_and_cut(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "one two\nthree\n\n\nfour  five\n\n" + " ".join(f"w{i}" for i in range(60)) + "\n\nend"
    blocks = text_blocks(text, tok, block_tokens=24)
    n = [len(tok(text=b, add_special_tokens=False)["input_ids"]) for b in blocks]
    assert max(n) <= 24
    assert blocks[0].startswith("one two three\n\nfour five")  # whitespace runs collapsed inside a paragraph
    # every word kept, in order; long paragraphs cut at spaces only
    assert " ".join(" ".join(blocks).split()) == " ".join(text.split())
    assert all(not b.startswith(" ") and not b.endswith(" ") for b in blocks)
    # greedy: paragraphs join while the block fits, and the next one starts a new block
    limit = len(tok(text="one two\n\nthree four", add_special_tokens=False)["input_ids"])
    assert text_blocks("one two\n\nthree four\n\nfive", tok, limit) == ["one two\n\nthree four", "five"]


def test_text_blocks_errors(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"book\.txt: the forget text yields no row"):
        text_blocks(" \n\n \n", tiny_tokenizer, 16, source="book.txt")
    with pytest.raises(ValueError, match=r"the word 'x{80}' alone has \d+ tokens, more than block_tokens \(8\)"):
        text_blocks("a " + "x" * 200 + " b", tiny_tokenizer, 8)
    path = tmp_path / "f.txt"
    path.write_text("Alice was here.\n\nThe Rabbit ran.\n")
    assert block_rows(path, tiny_tokenizer, 64) == [{"prompt": "", "completion": "Alice was here.\n\nThe Rabbit ran."}]


# ---------------------------------------------------------------------------------------- the shipped Alice files


def test_alice_dictionary_loads():
    anchors = load_anchor_terms(ALICE_TERMS)
    assert len(anchors) == 49
    assert anchors.terms["White Rabbit"] == "grey hare" and anchors.terms["Off with her head"] == "Take her away"


@pytest.mark.skipif(not ALICE_TEXT.exists(), reason="../shared/data/text/alice.txt.gz absent")
def test_alice_dictionary_matches_the_book_without_warning(caplog, tiny_tokenizer):
    anchors = load_anchor_terms(ALICE_TERMS)
    text = read_text(ALICE_TEXT)
    counts = match_counts(anchors, [text])
    with caplog.at_level(logging.WARNING):
        check_match_counts(anchors, counts)
    assert caplog.text == ""
    assert sum(counts.values()) == 1090 and min(counts.values()) > 0
    # whole paragraphs in blocks keep every match (whitespace runs collapsed). At 128 tokens the 300-token test
    # vocabulary cuts long paragraphs, and a cut between two words of a term loses that match.
    blocks = text_blocks(text, tiny_tokenizer, 2048)
    assert sum(match_counts(anchors, blocks).values()) == 1090


def test_familiarity_prompts_file():
    rows = [json.loads(line) for line in ALICE_PROMPTS.read_text().splitlines()]
    assert len(rows) == 25 and all(r["prompt"] and r["expect"] for r in rows)
    anchors = load_anchor_terms(ALICE_TERMS)
    for r in rows:
        for term in r["expect"]:
            # no prompt ends inside a term: WHP never trains positions inside a term
            cut = len(r["prompt"])
            text = r["prompt"] + " " + term
            assert not any(m.start < cut < m.end for m in anchors.find(text)), r


@pytest.mark.skipif(not ALICE_TEXT.exists(), reason="../shared/data/text/alice.txt.gz absent")
def test_familiarity_expected_terms_occur_in_the_book():
    from tokentrain.tasks.familiarity import mentions

    text = read_text(ALICE_TEXT)
    for line in ALICE_PROMPTS.read_text().splitlines():
        for term in json.loads(line)["expect"]:
            assert mentions(text, [term]), term
