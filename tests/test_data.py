"""Tests of data.py: tokenisation equal to TRL 1.16 SFTTrainer's, the signal contract (alignment check, value checks,
expansion to full rows, truncation, padding, padding-free, bfd packing), loading and atomic stage output.
Spec: specs/weighted_ntp.md sections 2, 6 (P4, P10) and 9."""

from __future__ import annotations

import gzip
import json
import logging
import math
from collections import Counter

import pytest
import torch
from datasets import Dataset

from tokentrain.data import (
    SignalAlignmentError,
    SignalCollator,
    completion_ids_of,
    load_rows,
    prepare_sft_dataset,
    tokenize_row,
)
from tokentrain.stages.base import DONE_FILE, atomic_output, is_complete

IGNORE = -100

pytestmark = pytest.mark.usefixtures("one_thread")


def scored(rows, tok, column="token_weights", value=None):
    """Rows plus `completion_ids` (as the trainer tokenises them) and one signal column.

    Default values encode (row, position) so that any misplacement shows: row i, completion token j -> i + (j+1)/1000
    for weights (>= 0), the negative of that for `ref_logps` (<= 0). Exact in float64.
    """
    value = value or (lambda i, j: (i + (j + 1) / 1000) * (-1 if column == "ref_logps" else 1))
    out = []
    for i, row in enumerate(rows):
        o = tokenize_row(row, tok)
        ids = completion_ids_of(o["input_ids"], o["labels"])
        out.append({**row, "completion_ids": ids, column: [value(i, j) for j in range(len(ids))]})
    return out


def prompt_len(row, tok):
    # The pc_rows prompts end with the special token <sep>, so the prompt's tokens are a prefix of the row's tokens.
    return len(tok(row["prompt"])["input_ids"])


# ------------------------------------------------------------------------------------ tokenisation = TRL SFTTrainer


def _rows_of_kind(kind, pc_rows):
    if kind == "prompt_completion":
        return [
            *pc_rows,
            # The prompt ends inside a word: " se" + "rves" merges into " serves", so the completion starts where the
            # two tokenisations diverge (TRL's common_prefix_length), not after the prompt's own tokens.
            {"prompt": "<s>name[Aromi] se", "completion": "rves Italian food."},
            {"prompt": "<s>name[Zizzi]<sep>", "completion": "Zizzi is cheap.</s>"},  # EOS present: not doubled
        ]
    if kind == "text":
        return [{"text": r["prompt"] + r["completion"]} for r in pc_rows[:6]] + [{"text": "<s>Aromi.</s>"}]
    if kind == "conversational_prompt_completion":
        return [
            {
                "prompt": [{"role": "user", "content": r["prompt"][3:-5]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in pc_rows[:6]
        ]
    assert kind == "messages"
    return [
        {
            "messages": [
                {"role": "system", "content": "Describe the restaurant."},
                {"role": "user", "content": r["prompt"][3:-5]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in pc_rows[:6]
    ]


@pytest.mark.parametrize("kind", ["prompt_completion", "text", "conversational_prompt_completion", "messages"])
def test_tokenize_row_equals_sft_trainer_preparation(kind, pc_rows, tiny_tokenizer, tiny_model_factory, tmp_path):
    from trl import SFTConfig, SFTTrainer

    rows = _rows_of_kind(kind, pc_rows)
    args = SFTConfig(output_dir=str(tmp_path), bf16=False, report_to="none", max_length=None)
    trainer = SFTTrainer(
        tiny_model_factory(0), args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer
    )
    prepared = trainer.train_dataset
    assert len(prepared) == len(rows)
    for i, row in enumerate(rows):
        ours = tokenize_row(row, tiny_tokenizer)
        assert ours["input_ids"] == prepared[i]["input_ids"], f"row {i}"
        assert ours["labels"] == prepared[i]["labels"], f"row {i}"
    if kind == "prompt_completion":
        ids = tokenize_row(rows[-1], tiny_tokenizer)["input_ids"]
        assert ids[-1] == tiny_tokenizer.eos_token_id and ids[-2] != tiny_tokenizer.eos_token_id
        merged = tokenize_row(rows[-2], tiny_tokenizer)
        # The first target is the merged " serves": one token that starts inside the prompt's text.
        first = next(p for p, lab in enumerate(merged["labels"]) if lab != IGNORE)
        assert tiny_tokenizer.decode(merged["input_ids"][first]) == " serves"
    if kind in ("text", "messages"):
        assert all(tokenize_row(r, tiny_tokenizer)["labels"] == prepared[i]["input_ids"] for i, r in enumerate(rows))


def test_completion_ids_of():
    # Prompt [1, 5, 6], completion [7, 8, 2]: the targets are the positions p >= 1 with a label.
    assert completion_ids_of([1, 5, 6, 7, 8, 2], [IGNORE, IGNORE, IGNORE, 7, 8, 2]) == [7, 8, 2]
    # Language modelling (labels = input_ids): position 0 is never a target (nothing predicts it).
    assert completion_ids_of([1, 5, 6], [1, 5, 6]) == [5, 6]
    # Masked turns in the middle (multi-turn chat) are skipped, the order kept.
    assert completion_ids_of([1, 5, 6, 7, 8], [IGNORE, 5, IGNORE, 7, IGNORE]) == [5, 7]
    assert completion_ids_of([1, 5], [IGNORE, IGNORE]) == []


def test_completion_ids_of_tokenized_row(pc_rows, tiny_tokenizer):
    row = pc_rows[-1]  # "<s>name[Aromi]<sep>" -> "Aromi." + "</s>"
    out = tokenize_row(row, tiny_tokenizer)
    ids = completion_ids_of(out["input_ids"], out["labels"])
    assert ids == tiny_tokenizer("Aromi.</s>")["input_ids"]
    assert ids[-1] == tiny_tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------- signal expansion (section 2)


@pytest.mark.parametrize("column", ["token_weights", "ref_logps"])
def test_prepare_expands_signal_to_full_rows(column, pc_rows, tiny_tokenizer):
    rows = scored(pc_rows, tiny_tokenizer, column)
    ds = prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=(column,))
    assert ds.column_names == ["input_ids", "labels", column]
    assert len(ds) == len(rows)
    for i, (row, out) in enumerate(zip(rows, ds)):
        n, k = len(out["input_ids"]), len(row["completion_ids"])
        # e.g. row 11: prompt "<s>name[Aromi]<sep>" (P tokens), completion "Aromi.</s>" (k tokens) ->
        # S = [0.0] * P + [11.001, 11.002, ...] (P + k = n): the prompt gets 0.0, the completion its values in order.
        assert len(out[column]) == n == prompt_len(row, tiny_tokenizer) + k
        assert out[column] == [0.0] * prompt_len(row, tiny_tokenizer) + row[column], f"row {i}"
        assert out["input_ids"][n - k :] == row["completion_ids"]


def test_prepare_expands_signal_on_text_rows(tiny_tokenizer):
    # Language modelling: every position but the first is a target, so S = [0.0, w_0, w_1, ...].
    rows = scored([{"text": "<s>Aromi serves food."}, {"text": "<s>Zizzi."}], tiny_tokenizer)
    ds = prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=("token_weights",))
    for row, out in zip(rows, ds):
        assert out["token_weights"] == [0.0] + row["token_weights"]
        assert out["labels"] == out["input_ids"]


def test_prepare_without_signals_is_tokenize_row(pc_rows, tiny_tokenizer):
    ds = prepare_sft_dataset(Dataset.from_list(pc_rows), tiny_tokenizer)
    assert ds.column_names == ["input_ids", "labels"]
    assert ds.to_list() == [tokenize_row(r, tiny_tokenizer) for r in pc_rows]


# -------------------------------------------------------------------------------------------- P10 and bad inputs (§9)


def test_p10_mutated_stored_id_names_row_and_position(pc_rows, tiny_tokenizer):
    rows = scored(pc_rows, tiny_tokenizer)
    stored = rows[3]["completion_ids"]
    trainer_id = stored[5]
    stored[5] = (trainer_id + 7) % len(tiny_tokenizer)
    with pytest.raises(SignalAlignmentError) as err:
        prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=("token_weights",))
    msg = str(err.value)
    assert "row 3:" in msg and "position 5 " in msg and "'completion_ids'" in msg
    # Both ids with their decoded tokens.
    assert f"stored {stored[5]} {tiny_tokenizer.decode([stored[5]])!r}" in msg
    assert f"trainer {trainer_id} {tiny_tokenizer.decode([trainer_id])!r}" in msg


def test_p10_stored_ids_of_another_length(pc_rows, tiny_tokenizer):
    # Stored ids one short (e.g. scored without the EOS): the first difference is the end of the stored ids.
    rows = scored(pc_rows, tiny_tokenizer)
    k = len(rows[2]["completion_ids"])
    rows[2]["completion_ids"] = rows[2]["completion_ids"][:-1]
    rows[2]["token_weights"] = rows[2]["token_weights"][:-1]
    with pytest.raises(SignalAlignmentError, match=rf"row 2: .* position {k - 1} \(stored <end>.* {k - 1} vs {k}\)"):
        prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=("token_weights",))


@pytest.mark.parametrize("column", ["token_weights", "ref_logps"])
def test_signal_length_differs_from_ids(column, pc_rows, tiny_tokenizer):
    rows = scored(pc_rows, tiny_tokenizer, column)
    k = len(rows[2]["completion_ids"])
    rows[2][column] = rows[2][column][:-1]
    with pytest.raises(ValueError) as err:
        prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=(column,))
    msg = str(err.value)
    assert "row 2" in msg and repr(column) in msg and f"{k - 1} values" in msg and f"has {k}" in msg


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -0.5])
def test_bad_token_weights_name_row_and_position(bad, pc_rows, tiny_tokenizer):
    rows = scored(pc_rows, tiny_tokenizer)
    rows[4]["token_weights"][2] = bad
    with pytest.raises(ValueError, match=r"row 4, column 'token_weights', position 2: weight"):
        prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=("token_weights",))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1.1e-6, 0.5])
def test_bad_ref_logps_name_row_and_position(bad, pc_rows, tiny_tokenizer):
    rows = scored(pc_rows, tiny_tokenizer, "ref_logps")
    rows[4]["ref_logps"][2] = bad
    with pytest.raises(ValueError, match=r"row 4, column 'ref_logps', position 2: .* not a log-probability"):
        prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=("ref_logps",))


def test_ref_logps_rounding_above_zero_is_clamped(pc_rows, tiny_tokenizer):
    # log P = 1e-6 or 3e-7 is float rounding of log 1 = 0: stored as 0.0, not an error; -0.0 and 0.0 pass unchanged.
    rows = scored(pc_rows[:2], tiny_tokenizer, "ref_logps")
    rows[1]["ref_logps"][:4] = [1e-6, 3e-7, 0.0, -0.0]
    ds = prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=("ref_logps",))
    p = prompt_len(rows[1], tiny_tokenizer)
    assert ds[1]["ref_logps"][p : p + 5] == [0.0, 0.0, 0.0, 0.0, rows[1]["ref_logps"][4]]
    assert max(ds[1]["ref_logps"]) == 0.0


@pytest.mark.parametrize("missing", ["ref_logps", "completion_ids"])
def test_missing_signal_column_names_column_and_stage(missing, pc_rows, tiny_tokenizer):
    rows = [{k: v for k, v in r.items() if k != missing} for r in scored(pc_rows, tiny_tokenizer, "ref_logps")]
    with pytest.raises(KeyError) as err:
        prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=("ref_logps",))
    msg = str(err.value)
    assert f"['{missing}']" in msg and "tokentrain score" in msg


def test_all_zero_weight_rows_are_reported_once(pc_rows, tiny_tokenizer, caplog):
    rows = scored(pc_rows, tiny_tokenizer, value=lambda i, j: 0.0 if i in (2, 7) else 1.0)
    with caplog.at_level(logging.WARNING, logger="tokentrain.data"):
        ds = prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=("token_weights",))
    assert len(ds) == len(rows)  # kept: they are legal, only useless
    warnings = [r.getMessage() for r in caplog.records if "token weights 0" in r.getMessage()]
    assert warnings == ["train: 2 rows have all token weights 0 (they contribute nothing); first: [2, 7]"]


# ------------------------------------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_cuts_signal_with_tokens(mode, pc_rows, tiny_tokenizer):
    rows = scored(pc_rows, tiny_tokenizer, "ref_logps")
    full = prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=("ref_logps",))
    L = 32  # prompts are ~23-25 tokens, rows 40-80: most rows are cut, none loses its whole completion
    cut = prepare_sft_dataset(
        Dataset.from_list(rows), tiny_tokenizer, ("ref_logps",), max_length=L, truncation_mode=mode
    )
    assert len(cut) == len(full)
    sl = slice(None, L) if mode == "keep_start" else slice(-L, None)
    n_cut = 0
    for a, b in zip(full, cut):
        n_cut += len(a["input_ids"]) > L
        for col in ("input_ids", "labels", "ref_logps"):
            assert b[col] == a[col][sl]
    assert n_cut >= len(rows) - 1
    # keep_start keeps the first completion values (e.g. row 0: [-0.001, -0.002, ...]); keep_end the last, EOS's too.
    p0 = prompt_len(rows[0], tiny_tokenizer)
    if mode == "keep_start":
        assert cut[0]["ref_logps"][p0:] == rows[0]["ref_logps"][: L - p0]
    else:
        assert cut[0]["ref_logps"] == rows[0]["ref_logps"][-L:]
        assert cut[0]["input_ids"][-1] == tiny_tokenizer.eos_token_id


@pytest.mark.parametrize("packing", [False, True])
def test_fully_truncated_completion_is_dropped_and_counted(packing, pc_rows, tiny_tokenizer, caplog):
    # A prompt of more than L tokens: keep_start (and bfd packing, which always keeps the start) leaves no completion.
    long_prompt = {"prompt": "<s>" + ", ".join(f"name[X{i}]" for i in range(12)) + "<sep>", "completion": "Aromi."}
    rows = scored([*pc_rows[:4], long_prompt, *pc_rows[4:6]], tiny_tokenizer)
    L = 40
    assert prompt_len(long_prompt, tiny_tokenizer) > L
    with caplog.at_level(logging.WARNING, logger="tokentrain.data"):
        ds = prepare_sft_dataset(
            Dataset.from_list(rows), tiny_tokenizer, ("token_weights",), max_length=L, packing=packing
        )
    warnings = [r.getMessage() for r in caplog.records if "no completion token left" in r.getMessage()]
    assert warnings == [
        "train: 1 of 7 rows have no completion token left (empty or fully truncated) and are dropped; first: [4]"
    ]
    # The other rows are kept, cut to their first L tokens with their signal; nothing of row 4 (4.001, ...) is left.
    full = prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, ("token_weights",)).to_list()
    expected = Counter(
        tuple(tuple(ex[c][:L]) for c in ("input_ids", "labels", "token_weights")) for i, ex in enumerate(full) if i != 4
    )
    if packing:
        got = Counter(seg for ex in ds for seg in _segments(ex, "token_weights"))
    else:
        got = Counter(tuple(tuple(ex[c]) for c in ("input_ids", "labels", "token_weights")) for ex in ds)
    assert got == expected


@pytest.mark.parametrize(
    "empty",
    [
        {"prompt": "<s>name[Aromi]<sep>", "completion": ""},  # TRL would train on the appended EOS alone
        {"prompt": "<s>name[Aromi]<sep>", "completion": "</s>"},
        {"text": ""},  # -> "</s>": one token, nothing predicts it
        {"prompt": [{"role": "user", "content": "Aromi?"}], "completion": [{"role": "assistant", "content": ""}]},
    ],
)
def test_empty_completion_is_dropped_and_counted(empty, tiny_tokenizer, caplog):
    if "text" in empty:
        rows = [empty, {"text": "<s>Zizzi.</s>"}]
    elif isinstance(empty["prompt"], list):
        rows = [empty, {**empty, "completion": [{"role": "assistant", "content": "Zizzi."}]}]
    else:
        rows = [empty, {"prompt": "<s>name[Zizzi]<sep>", "completion": "Zizzi."}]
    with caplog.at_level(logging.WARNING, logger="tokentrain.data"):
        ds = prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer)
    assert ds.to_list() == [tokenize_row(rows[1], tiny_tokenizer)]
    assert any("1 of 2 rows have no completion token left" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------------------------------------- collation


def _examples(rows, tok, column="token_weights"):
    ds = prepare_sft_dataset(Dataset.from_list(scored(rows, tok, column)), tok, signal_columns=(column,))
    return ds.to_list()


def test_collator_padded_pads_signal_with_zero(pc_rows, tiny_tokenizer):
    examples = _examples(pc_rows[9:12], tiny_tokenizer)
    collator = SignalCollator(pad_token_id=tiny_tokenizer.pad_token_id, signal_columns=("token_weights",))
    batch = collator(examples)
    S = batch["token_weights"]
    assert S.dtype == torch.float32 and S.shape == batch["input_ids"].shape  # (3, T)
    T = S.shape[1]
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        expected = torch.tensor(ex["token_weights"] + [0.0] * (T - n), dtype=torch.float32)
        torch.testing.assert_close(S[b], expected, atol=0, rtol=0)
        assert (batch["labels"][b, n:] == IGNORE).all()
    # Every nonzero signal sits on a valid label; prompt and padding are 0.0.
    assert ((S != 0) <= (batch["labels"] != IGNORE)).all()


def test_collator_padding_free_concatenates_like_input_ids(pc_rows, tiny_tokenizer):
    examples = _examples(pc_rows[8:12], tiny_tokenizer, "ref_logps")
    collator = SignalCollator(
        pad_token_id=tiny_tokenizer.pad_token_id,
        padding_free=True,
        pad_to_multiple_of=16,
        signal_columns=("ref_logps",),
    )
    batch = collator(examples)
    n = sum(len(ex["input_ids"]) for ex in examples)
    flat_ids = torch.tensor([t for ex in examples for t in ex["input_ids"]])
    flat_sig = torch.tensor([v for ex in examples for v in ex["ref_logps"]], dtype=torch.float32)
    T = batch["input_ids"].shape[1]
    assert batch["ref_logps"].shape == (1, T) and T % 16 == 0 and T >= n
    assert torch.equal(batch["input_ids"][0, :n], flat_ids)
    assert torch.equal(batch["ref_logps"][0, :n], flat_sig)
    assert (batch["ref_logps"][0, n:] == 0).all()
    # TRL masks the first token of every segment; those positions are prompt tokens here, whose signal is 0.0.
    starts = (batch["position_ids"][0, :n] == 0).nonzero().flatten()
    assert len(starts) == len(examples) and (batch["ref_logps"][0, starts] == 0).all()


def _segments(ex, column):
    """Split a packed row into its sequences by `seq_lengths`: tuples of (input_ids, labels, signal)."""
    out, start = [], 0
    for n in ex["seq_lengths"]:
        out.append(tuple(tuple(ex[c][start : start + n]) for c in ("input_ids", "labels", column)))
        start += n
    assert start == len(ex["input_ids"])
    return out


def test_bfd_packing_keeps_every_value_next_to_its_token(pc_rows, tiny_tokenizer):
    rows = scored(pc_rows, tiny_tokenizer, "ref_logps")
    unpacked = prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, ("ref_logps",)).to_list()
    L = 128
    packed = prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, ("ref_logps",), packing=True, max_length=L)
    assert set(packed.column_names) == {"input_ids", "labels", "ref_logps", "seq_lengths"}
    assert len(packed) < len(rows)  # something was actually packed
    # (row, position) -> (token, value) before; the same triples, segment by segment, after.
    before = Counter(tuple(tuple(ex[c]) for c in ("input_ids", "labels", "ref_logps")) for ex in unpacked)
    after = Counter(seg for ex in packed for seg in _segments(ex, "ref_logps"))
    assert after == before
    for ex in packed:
        assert len(ex["input_ids"]) == len(ex["ref_logps"]) == len(ex["labels"]) <= L

    # Collated padding-free (TRL's layout for packed rows): each token keeps its value in the flat batch.
    collator = SignalCollator(pad_token_id=0, padding_free=True, signal_columns=("ref_logps",))
    batch = collator(packed.to_list())
    ids, sig = batch["input_ids"][0].tolist(), batch["ref_logps"][0]
    value_of = {}  # value -> token: every completion value is unique (row + position), so it names its token
    for ex in unpacked:
        for t, v in zip(ex["input_ids"], ex["ref_logps"]):
            if v != 0.0:
                value_of[torch.tensor(v, dtype=torch.float32).item()] = t
    nonzero = (sig != 0).nonzero().flatten().tolist()
    assert len(nonzero) == len(value_of)
    assert all(value_of[sig[p].item()] == ids[p] for p in nonzero)


# ---------------------------------------------------------------------------------------------------------- loading


def _write(path, rows, fmt):
    if fmt == "csv":
        text = "prompt,completion\n" + "".join(f'"{r["prompt"]}","{r["completion"]}"\n' for r in rows)
    elif fmt == "json":
        text = json.dumps(rows)
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz", "rows.csv", "rows.csv.gz", "rows.json"])
def test_load_rows_files(name, pc_rows, tmp_path):
    path = tmp_path / name
    _write(path, pc_rows, name.split(".")[1])
    ds = load_rows(path)
    assert ds.to_list() == pc_rows
    assert load_rows(str(path)).to_list() == pc_rows


def test_load_rows_saved_folder_and_folder_of_files(pc_rows, tmp_path):
    Dataset.from_list(pc_rows).save_to_disk(str(tmp_path / "saved"))
    assert load_rows(tmp_path / "saved").to_list() == pc_rows
    (tmp_path / "shards").mkdir()
    _write(tmp_path / "shards" / "a.jsonl", pc_rows[:5], "jsonl")
    _write(tmp_path / "shards" / "b.jsonl", pc_rows[5:], "jsonl")
    assert load_rows(tmp_path / "shards").to_list() == pc_rows


def test_load_rows_folder_of_split_files_reads_the_split(pc_rows, tmp_path):
    """A local copy of a hub dataset (../shared/data/gsm8k: train/test files beside others) reads like the hub one."""
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    _write(folder / "train.jsonl.gz", pc_rows[:8], "jsonl")
    _write(folder / "test.jsonl.gz", pc_rows[8:], "jsonl")
    _write(folder / "example_model_solutions.jsonl.gz", pc_rows[:2], "jsonl")
    assert load_rows(folder).to_list() == pc_rows[:8]  # split "train" by default
    assert load_rows(folder, split="test").to_list() == pc_rows[8:]
    assert load_rows(folder, split="train[:3]").to_list() == pc_rows[:3]  # slices as on the hub
    assert load_rows(folder / "train.jsonl.gz", split="train[2:4]").to_list() == pc_rows[2:4]
    with pytest.raises(FileNotFoundError, match="no file for split 'validation'"):
        load_rows(folder, split="validation")


def test_load_rows_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope" / "rows.jsonl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_rows(missing)
    with pytest.raises(FileNotFoundError, match="data/rows.csv.gz"):
        load_rows("data/rows.csv.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no dataset"):
        load_rows(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------- atomic output


def test_atomic_output_appears_only_when_complete(tmp_path):
    out, tmp = tmp_path / "scored", tmp_path / "scored.tmp"
    with atomic_output(out) as work:
        assert work == tmp and tmp.is_dir()
        (work / "data.txt").write_text("x")
        assert not out.exists()
    assert not tmp.exists()
    assert (out / "data.txt").read_text() == "x" and (out / DONE_FILE).exists() and is_complete(out)


def test_atomic_output_exception_leaves_only_tmp(tmp_path):
    out, tmp = tmp_path / "scored", tmp_path / "scored.tmp"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_output(out) as work:
            (work / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert not out.exists() and not is_complete(out)
    assert sorted(p.name for p in tmp.iterdir()) == ["half.txt"]  # no _COMPLETE marker
    # The next attempt starts from an empty folder.
    with atomic_output(out) as work:
        assert list(work.iterdir()) == []


def test_atomic_output_refuses_finished_output_unless_overwrite(tmp_path):
    out = tmp_path / "scored"
    with atomic_output(out) as work:
        (work / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match=str(out)):
        with atomic_output(out):
            pass
    # Overwrite: the old output survives until the new one is complete, also when the new run fails.
    with pytest.raises(RuntimeError):
        with atomic_output(out, overwrite=True) as work:
            assert (out / "old.txt").exists()
            raise RuntimeError("killed")
    assert (out / "old.txt").read_text() == "old" and is_complete(out)
    with atomic_output(out, overwrite=True) as work:
        (work / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [DONE_FILE, "new.txt"]


def test_atomic_output_keep_partial(tmp_path):
    out, tmp = tmp_path / "policy", tmp_path / "policy.tmp"
    with pytest.raises(RuntimeError):
        with atomic_output(out, keep_partial=True) as work:
            (work / "checkpoint-10").mkdir()
            raise RuntimeError("killed")
    with atomic_output(out, keep_partial=True) as work:
        assert (work / "checkpoint-10").is_dir()  # training resumes from it
        (work / "model.txt").write_text("m")
    assert sorted(p.name for p in out.iterdir()) == [DONE_FILE, "checkpoint-10", "model.txt"]
    assert not tmp.exists()
