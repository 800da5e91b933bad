"""The unlearning pipeline's stages through the CLI (spec specs/unlearning.md sections 2.2, 4, 7, 9): the prepare tasks,
the `whp_labels` score stage (its columns equal the pass's, then train every loss on them), the `familiarity` and
`tofu` evaluate tasks (equal to the task functions, forget_quality against a retain model of the same stage), a recipe
killed inside a training stage that resumes from its checkpoint and then skips finished work, the mini report's
tables and plot, the per-token rows `tokentrain inspect` shows, and the bad inputs of section 9 that these stages
own. Tiny settings: a 1-layer Llama (hidden 16) on the quickstart's synthetic book."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

from tokentrain.cli import main
from tokentrain.data import load_rows
from tokentrain.models import load_model, load_tokenizer, tiny_llama
from tokentrain.signals.anchors import block_rows, load_anchor_terms
from tokentrain.signals.whp_labels import label_token_rows, score_whp_labels
from tokentrain.stages.prepare_unlearning import ENDOFTEXT, SYNTHETIC_TERMS, bpe_tokenizer
from tokentrain.tasks import tofu as tofu_task
from tokentrain.tasks.familiarity import evaluate_book, load_prompts

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "tiny_model:\n  hidden_size: 16\n  num_layers: 1\n  num_heads: 2\n  intermediate_size: 32\n  max_positions: 256\n"
)
TRAIN_KEYS = (
    "per_device_train_batch_size: 8\nlearning_rate: 1.0e-3\nlogging_steps: 1\nbf16: false\n"
    "gradient_checkpointing: false\nreport_to: none\n"
)

pytestmark = pytest.mark.usefixtures("one_thread")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


PREPARE = "stage: prepare\ntask: unlearning_synthetic\noutput_dir: {out}\nseed: 0\nvocab_size: 300\nblock_tokens: 64\n"
PREPARE += "synthetic_tokens: 2000\n" + TINY


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The quickstart's data at a tiny size, prepared through the CLI; and a second model (seed 1) on its tokenizer
    standing in for the reinforced one."""
    root = tmp_path_factory.mktemp("unl")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["prepare", str(write(root / "p.yaml", PREPARE.format(out=root / "data")))]) == 0
        tokenizer = load_tokenizer(root / "data" / "init")
        other = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=1)
        other.save_pretrained(root / "reinforced")
        tokenizer.save_pretrained(root / "reinforced")
    finally:
        torch.set_num_threads(threads)
    return root


# ------------------------------------------------------------------------------------------------------- prepare


def test_prepare_synthetic_writes_book_dictionary_prompts_and_model(synth):
    data = synth / "data"
    tokenizer = load_tokenizer(data / "init")
    # one special token, BOS = EOS = PAD, prepended to every encoded text (a block row's first word has a prefix)
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.pad_token == ENDOFTEXT
    assert tokenizer("Oswin")["input_ids"][0] == tokenizer.bos_token_id == 0
    anchors = load_anchor_terms(data / "terms.yaml")
    assert anchors.terms == SYNTHETIC_TERMS
    assert [p["prompt"] for p in load_prompts(data / "prompts.jsonl")][0] == "Every evening the talking toad named"
    book = read_jsonl(data / "book.jsonl")
    assert all(r["prompt"] == "" for r in book)
    assert all(len(tokenizer(text=r["completion"], add_special_tokens=False)["input_ids"]) <= 64 for r in book)
    counts = {t: sum(m.term == t for r in book for m in anchors.find(r["completion"])) for t in SYNTHETIC_TERMS}
    assert min(counts.values()) >= 2  # every term occurs, more than once
    train, heldout = read_jsonl(data / "text_train.jsonl"), read_jsonl(data / "text_heldout.jsonl")
    assert len(heldout) == round(0.1 * (len(train) + len(heldout)))
    assert len(read_jsonl(data / "checkpoint_train.jsonl")) == len(train) + 3 * len(book)
    summary = json.loads((data / "prepare_summary.json").read_text())
    assert summary["book_rows"] == len(book) and summary["parameters"] == sum(
        p.numel() for p in load_model(data / "init", trainable=False).parameters()
    )


def test_prepare_text_blocks_matches_block_rows_and_holds_out_the_tail(synth, tmp_path):
    forget = write(tmp_path / "book.txt", "Alice met the\nWhite Rabbit.\n\n" + "Down the hole she went. " * 30)
    retain = write(tmp_path / "general.txt", "\n\n".join(f"Paragraph {i} of plain text here." for i in range(40)))
    stage = f"stage: prepare\ntask: text_blocks\ntokenizer: {synth / 'data' / 'init'}\nforget_text: {forget}\n"
    stage += f"retain_text: {retain}\nblock_tokens: 32\nheldout_share: 0.25\noutput_dir: {tmp_path / 'out'}\n"
    assert main(["prepare", str(write(tmp_path / "s.yaml", stage))]) == 0
    tokenizer = load_tokenizer(synth / "data" / "init")
    assert read_jsonl(tmp_path / "out" / "forget.jsonl") == block_rows(forget, tokenizer, 32)
    assert read_jsonl(tmp_path / "out" / "forget.jsonl")[0]["completion"].startswith("Alice met the White Rabbit.")
    blocks = block_rows(retain, tokenizer, 32)
    n = len(blocks) - round(0.25 * len(blocks))
    assert read_jsonl(tmp_path / "out" / "retain.jsonl") == blocks[:n]
    assert read_jsonl(tmp_path / "out" / "retain_heldout.jsonl") == blocks[n:]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("task: text_blocks\ntokenizer: x\n", "needs forget_text"),
        ("task: text_blocks\ntokenizer: {init}\nforget_text: {tmp}/nope.txt\n", "forget_text"),
        ("task: text_blocks\ntokenizer: {init}\nforget_text: {tmp}/b.txt\nheldout_share: 1.0\n", "heldout_share"),
        ("task: text_blocks\ntokenizer: {init}\nforget_text: {tmp}/b.txt\nblock_tokens: 1\n", "block_tokens (1)"),
        ("task: text_blocks\ntokenizer: {init}\nforget_text: {tmp}/empty.txt\n", "yields no row"),
        ("task: tofu\nforget_data: {tmp}/b.txt\n", "needs retain_data"),
        ("task: unlearning_synthetic\ntiny_model:\n  hidden: 8\n", "tiny_model has unknown keys ['hidden']"),
        ("task: unlearning_mini\ndata_dir: {tmp}/nowhere\n", "alice.txt.gz"),
        ("task: nope\n", "task must be one of"),
    ],
)
def test_prepare_bad_inputs_name_the_key(synth, tmp_path, capsys, extra, message):
    write(tmp_path / "b.txt", "Supercalifragilisticexpialidocious words here.")
    write(tmp_path / "empty.txt", "\n  \n\n")
    text = extra.format(init=synth / "data" / "init", tmp=tmp_path)
    stage = write(tmp_path / "s.yaml", f"stage: prepare\noutput_dir: {tmp_path / 'o'}\n{text}")
    assert main(["prepare", str(stage)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


TOFU_FORGET = [
    {
        "question": f"Who wrote book {i}?",
        "answer": f"Author {i} wrote it.",
        "paraphrased_answer": f"It was written by author {i}.",
        "perturbed_answer": [f"Author {i + k} wrote it." for k in (1, 2, 3)],
        "paraphrased_question": "ignored",
    }
    for i in range(4)
]
TOFU_RETAIN = [{"question": f"Where was author {i} born?", "answer": f"In town {i}."} for i in range(10)]


def test_prepare_tofu_base_and_chat_rows(tmp_path):
    forget = write(tmp_path / "forget.json", json.dumps(TOFU_FORGET))  # a JSON array, as the shared files
    retain = write_jsonl(tmp_path / "retain.jsonl", TOFU_RETAIN)
    for chat in (False, True):
        out = tmp_path / f"out{chat}"
        stage = f"stage: prepare\ntask: tofu\nforget_data: {forget}\nretain_data: {retain}\nretain_rows: 8\n"
        stage += f"retain_eval_rows: 3\nchat: {str(chat).lower()}\noutput_dir: {out}\n"
        assert main(["prepare", str(write(tmp_path / f"s{chat}.yaml", stage))]) == 0
        rows = read_jsonl(out / "forget.jsonl")
        assert [r["question"] for r in rows] == [r["question"] for r in TOFU_FORGET]
        assert (
            rows[1]["perturbed_answer"] == TOFU_FORGET[1]["perturbed_answer"] and "paraphrased_question" not in rows[1]
        )
        expected = tofu_task.qa_row(TOFU_FORGET[0]["question"], TOFU_FORGET[0]["answer"], chat)
        assert {k: rows[0][k] for k in ("prompt", "completion")} == expected
        assert len(read_jsonl(out / "retain.jsonl")) == 8 and len(read_jsonl(out / "retain_eval.jsonl")) == 3
    assert rows[0]["prompt"] == [{"role": "user", "content": "Who wrote book 0?"}]

    bad = write_jsonl(tmp_path / "bad.jsonl", [TOFU_RETAIN[0], {"question": "Q?"}])
    stage = f"stage: prepare\ntask: tofu\nforget_data: {forget}\nretain_data: {bad}\noutput_dir: {tmp_path / 'b'}\n"
    assert main(["prepare", str(write(tmp_path / "bad.yaml", stage))]) == 2


# ---------------------------------------------------------------------------------------------------- whp_labels


def labels_stage(synth: Path, out: Path, **keys) -> str:
    values = {
        "baseline": synth / "data" / "init",
        "reinforced": synth / "reinforced",
        "anchor_terms": synth / "data" / "terms.yaml",
        "dataset": synth / "data" / "book.jsonl",
        "alpha": 5.0,
        "batch_size": 4,
        "chunk_size": 64,
        "output_dir": out,
        **keys,
    }
    return "stage: score\nsignal: whp_labels\n" + "".join(f"{k}: {v}\n" for k, v in values.items())


@pytest.fixture(scope="module")
def labels(synth):
    """The whp_labels stage's output on the synthetic book (the second model as the reinforced one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["score", str(write(synth / "labels.yaml", labels_stage(synth, synth / "labels")))]) == 0
    finally:
        torch.set_num_threads(threads)
    return synth / "labels"


def test_whp_labels_stage_writes_the_pass_columns_stats_and_meta(synth, labels):
    out = load_from_disk(str(labels))
    rows = read_jsonl(synth / "data" / "book.jsonl")
    tokenizer = load_tokenizer(synth / "data" / "init")
    baseline = load_model(synth / "data" / "init", trainable=False)
    reinforced = load_model(synth / "reinforced", trainable=False)
    anchors = load_anchor_terms(synth / "data" / "terms.yaml")
    columns, stats = score_whp_labels(rows, baseline, reinforced, tokenizer, anchors, 5.0, batch_size=3)
    for name in ("completion_ids", "target_ids", "token_weights", "prompt_ids", "n_anchor_matches"):
        assert out[name] == columns[name], name
    assert out["completion"] == [r["completion"] for r in rows]  # the input columns are kept
    assert json.loads((labels / "stats.json").read_text()) == stats
    assert 0.0 < stats["changed"] <= 1.0 and stats["term_first"] > 0
    meta = json.loads((labels / "signal_meta.json").read_text())
    assert meta["signal"] == "whp_labels" and Path(meta["tokenizer"]).is_absolute()
    assert meta["anchor_terms"] == str((synth / "data" / "terms.yaml").resolve()) and meta["alpha"] == 5.0
    assert meta["vocab_size"] == len(tokenizer) and meta["weighted"] == stats["weighted"]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"alpha": -1.0}, "alpha must be a finite number >= 0"),
        ({"alpha": "nan"}, "alpha must be a finite number >= 0"),
        ({"repeat_penalty": -0.5}, "repeat_penalty must be a finite number >= 0"),
        ({"reinforced": "''"}, "needs reinforced"),
        ({"batch_size": 0}, "batch_size and chunk_size must be >= 1"),
    ],
)
def test_whp_labels_bad_settings_name_the_key(synth, tmp_path, capsys, keys, message):
    assert main(["score", str(write(tmp_path / "s.yaml", labels_stage(synth, tmp_path / "o", **keys)))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_whp_labels_bad_dictionary_and_models_name_the_file(synth, tmp_path, capsys):
    terms = write(tmp_path / "terms.yaml", '"Oswin": "Tom"\n"Oswin": "Ned"\n')
    assert (
        main(["score", str(write(tmp_path / "a.yaml", labels_stage(synth, tmp_path / "o", anchor_terms=terms)))]) == 2
    )
    err = capsys.readouterr().err
    assert str(terms) in err and "duplicate key 'Oswin'" in err

    nomatch = write(tmp_path / "none.yaml", '"Zebediah": "Tom"\n')
    stage = labels_stage(synth, tmp_path / "o", anchor_terms=nomatch)
    assert main(["score", str(write(tmp_path / "b.yaml", stage))]) == 2
    assert "no term of the dictionary occurs" in capsys.readouterr().err

    other = tmp_path / "other_vocab"  # a reinforced model of another vocabulary
    tok = bpe_tokenizer(["completely different text for another vocabulary"], 280)
    tiny_llama(tok, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32).save_pretrained(other)
    tok.save_pretrained(other)
    assert main(["score", str(write(tmp_path / "c.yaml", labels_stage(synth, tmp_path / "o", reinforced=other)))]) == 2
    err = capsys.readouterr().err
    assert str(synth / "data" / "init") in err and str(other) in err
    assert not (tmp_path / "o").exists()


def test_every_loss_trains_on_the_stage_outputs(synth, labels, tmp_path):
    """WHP on the labels, NPO on a ref_logps stage's output, GA and SimNPO (with the retain term) on plain rows."""
    init, book = synth / "data" / "init", synth / "data" / "book.jsonl"
    ref = f"stage: score\nsignal: ref_logps\nmodel: {init}\ndataset: {book}\noutput_dir: {tmp_path / 'ref'}\n"
    assert main(["score", str(write(tmp_path / "ref.yaml", ref))]) == 0
    runs = {
        "whp": f"dataset: {labels}\n",
        "npo": f"dataset: {tmp_path / 'ref'}\nnpo_beta: 0.1\n",
        "ga": f"dataset: {book}\nretain_weight: 1.0\nretain_dataset: {synth / 'data' / 'text_heldout.jsonl'}\n",
        "simnpo": f"dataset: {book}\nretain_weight: 1.0\nretain_dataset: {synth / 'data' / 'text_heldout.jsonl'}\n",
    }
    for loss, keys in runs.items():
        stage = f"stage: train\nobjective: unlearning\nunlearning_loss: {loss}\nmodel: {init}\nmax_steps: 2\n{keys}"
        stage += TRAIN_KEYS + f"output_dir: {tmp_path / loss}\n"
        assert main(["train", str(write(tmp_path / f"{loss}.yaml", stage))]) == 0, loss
        summary = json.loads((tmp_path / loss / "train_summary.json").read_text())
        assert summary["log_history"][-1]["step"] == 2 and math.isfinite(summary["train_loss"])
    logged = json.loads((tmp_path / "whp" / "train_summary.json").read_text())["log_history"]
    assert any("unlearning/changed" in entry for entry in logged)
    assert any(
        "unlearning/retain_nll" in e
        for e in json.loads((tmp_path / "ga" / "train_summary.json").read_text())["log_history"]
    )


def test_npo_on_plain_rows_names_the_stage_that_writes_ref_logps(synth, tmp_path, capsys):
    stage = f"stage: train\nobjective: unlearning\nunlearning_loss: npo\nmodel: {synth / 'data' / 'init'}\n"
    stage += (
        f"dataset: {synth / 'data' / 'book.jsonl'}\nmax_steps: 1\n" + TRAIN_KEYS + f"output_dir: {tmp_path / 'o'}\n"
    )
    assert main(["train", str(write(tmp_path / "s.yaml", stage))]) == 2
    err = capsys.readouterr().err
    assert "ref_logps" in err and "03_ref_logps" in err


# ------------------------------------------------------------------------------------------------------- inspect


def test_label_token_rows_show_original_target_weight_and_match(synth, labels):
    dataset = load_from_disk(str(labels))
    tokenizer = load_tokenizer(synth / "data" / "init")
    anchors = load_anchor_terms(synth / "data" / "terms.yaml")
    picked = [i for i, n in enumerate(dataset["n_anchor_matches"]) if n >= 2][:2]
    rows = label_token_rows(dataset, tokenizer, anchors, rows=picked)
    assert len(rows) == 2
    for k, row in zip(picked, rows):
        assert [t["id"] for t in row] == dataset[k]["completion_ids"]
        assert [t["target_id"] for t in row] == dataset[k]["target_ids"]
        assert [t["weight"] for t in row] == dataset[k]["token_weights"]
        for t in row:
            assert t["token"] == tokenizer.decode([t["id"]]) and t["changed"] == (t["target_id"] != t["id"])
            if t["where"] == "repeat":  # rule (a): a later match of a term already seen is never trained
                assert t["weight"] == 0.0 and t["term"] in SYNTHETIC_TERMS
            if t["weight"] == 0.0:
                assert t["target_id"] == t["id"]
        firsts = [t["term"] for t in row if t["where"] == "first"]
        assert len(firsts) == len(set(firsts)) > 0  # one first token per term in the row
        text = "".join(t["token"] for t in row)
        assert sorted(firsts) == sorted({m.term for m in anchors.find(text)})
        assert any(t["where"] == "after" for t in row)
    assert all(t["where"] == "" for t in label_token_rows(dataset, tokenizer, None, rows=[0])[0])

    other = bpe_tokenizer(["a different tokenizer altogether"], 270)
    with pytest.raises(ValueError, match="row 0: the tokenizer does not give the stored completion_ids"):
        label_token_rows(dataset, other, None, rows=[0])
    with pytest.raises(KeyError, match="target_ids"):
        label_token_rows(dataset.remove_columns("target_ids"), tokenizer)


# ------------------------------------------------------------------------------------------------------ evaluate


def familiarity_stage(synth: Path, out: Path, **keys) -> str:
    data = synth / "data"
    values = {
        "models": json.dumps({"original": str(data / "init"), "other": str(synth / "reinforced")}),
        "prompts": data / "prompts.jsonl",
        "anchor_terms": data / "terms.yaml",
        "dataset": data / "book.jsonl",
        "retain_dataset": data / "text_heldout.jsonl",
        "max_new_tokens": 6,
        "batch_size": 8,
        "output_dir": out,
        **keys,
    }
    return "stage: evaluate\ntask: familiarity\n" + "".join(f"{k}: {v}\n" for k, v in values.items())


def test_evaluate_familiarity_stage_equals_evaluate_book(synth, tmp_path, capsys):
    assert main(["evaluate", str(write(tmp_path / "e.yaml", familiarity_stage(synth, tmp_path / "o")))]) == 0
    assert "| model | familiarity ↓ | anchor_prob ↓ | forget_ppl ↑ | retain_ppl ↓ |" in capsys.readouterr().out
    results = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert list(results) == ["original", "other"]
    data = synth / "data"
    tokenizer = load_tokenizer(data / "init")
    prompts = load_prompts(data / "prompts.jsonl")
    forget, retain = load_rows(data / "book.jsonl"), load_rows(data / "text_heldout.jsonl")
    anchors = load_anchor_terms(data / "terms.yaml")
    for name, path in (("original", data / "init"), ("other", synth / "reinforced")):
        model = load_model(path, trainable=False)
        metrics, completions = evaluate_book(model, tokenizer, prompts, forget, retain, anchors, 6, 8)
        assert results[name] == pytest.approx(metrics, rel=1e-6)
        written = read_jsonl(tmp_path / "o" / f"completions_{name}.jsonl")
        assert [r["completion"] for r in written] == completions
        assert [r["expect"] for r in written] == [p["expect"] for p in prompts]
    assert (tmp_path / "o" / "table.md").read_text().startswith("| model | familiarity")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"prompts": "''"}, "needs prompts"),
        ({"models": "{}"}, "needs models"),
        ({"max_new_tokens": 0}, "max_new_tokens and batch_size must be >= 1"),
        ({"prompts": "{bad}"}, "line 2: `expect` must be a non-empty list"),
        ({"prompts": "{noprompt}"}, "line 1: needs a non-empty string `prompt`"),
    ],
)
def test_evaluate_familiarity_bad_inputs(synth, tmp_path, capsys, keys, message):
    bad = write(tmp_path / "bad.jsonl", '{"prompt": "a", "expect": ["b"]}\n{"prompt": "c", "expect": []}\n')
    noprompt = write(tmp_path / "noprompt.jsonl", '{"expect": ["b"]}\n')
    keys = {k: str(v).replace("{bad}", str(bad)).replace("{noprompt}", str(noprompt)) for k, v in keys.items()}
    assert main(["evaluate", str(write(tmp_path / "e.yaml", familiarity_stage(synth, tmp_path / "o", **keys)))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def tofu_stage(synth: Path, tmp_path: Path, **keys) -> str:
    values = {
        "models": json.dumps({"unlearned": str(synth / "reinforced"), "retain": str(synth / "data" / "init")}),
        "dataset": write(tmp_path / "forget.json", json.dumps(TOFU_FORGET)),
        "retain_dataset": write_jsonl(tmp_path / "retain.jsonl", TOFU_RETAIN[:3]),
        "batch_size": 4,
        "output_dir": tmp_path / "o",
        **keys,
    }
    return "stage: evaluate\ntask: tofu\n" + "".join(f"{k}: {v}\n" for k, v in values.items())


def test_evaluate_tofu_stage_with_forget_quality_against_a_retain_model(synth, tmp_path, capsys):
    stage = tofu_stage(synth, tmp_path, forget_quality="true", retain_model="retain")
    assert main(["evaluate", str(write(tmp_path / "e.yaml", stage))]) == 0
    assert (
        "| model | forget_prob ↓ | forget_truth_ratio ↑ | retain_prob ↑ | forget_quality ↑ |" in capsys.readouterr().out
    )
    out = tmp_path / "o"
    summary = json.loads((out / "eval.json").read_text())
    assert list(summary) == ["unlearned", "retain"]  # the stage file's order, though the retain model ran first
    tokenizer = load_tokenizer(synth / "data" / "init")
    values = {}
    for name, path in (("unlearned", synth / "reinforced"), ("retain", synth / "data" / "init")):
        metrics = tofu_task.evaluate_tofu(load_model(path, trainable=False), tokenizer, TOFU_FORGET, TOFU_RETAIN[:3])
        full = json.loads((out / f"metrics_{name}.json").read_text())
        assert full[tofu_task.TRUTH_RATIO_VALUES] == pytest.approx(metrics[tofu_task.TRUTH_RATIO_VALUES], rel=1e-6)
        for key in ("forget_prob", "forget_truth_ratio", "retain_prob"):
            assert summary[name][key] == pytest.approx(metrics[key], rel=1e-6)
        values[name] = metrics[tofu_task.TRUTH_RATIO_VALUES]
        assert tofu_task.TRUTH_RATIO_VALUES not in summary[name]
    assert summary["unlearned"]["forget_quality"] == pytest.approx(
        tofu_task.ks_pvalue(values["unlearned"], values["retain"])
    )
    assert "forget_quality" not in summary["retain"]

    # a later stage reads the retain model's metrics file (retain_model_eval), as for a model evaluated elsewhere
    models = json.dumps({"unlearned": str(synth / "reinforced")})
    stage = tofu_stage(
        synth, tmp_path, models=models, forget_quality="true", retain_model_eval=out / "metrics_retain.json"
    )
    stage = stage.replace(f"output_dir: {out}", f"output_dir: {tmp_path / 'o2'}")
    assert main(["evaluate", str(write(tmp_path / "e2.yaml", stage))]) == 0
    again = json.loads((tmp_path / "o2" / "eval.json").read_text())["unlearned"]
    assert again["forget_quality"] == pytest.approx(summary["unlearned"]["forget_quality"])


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"forget_quality": "true"}, "forget_quality needs exactly one of retain_model"),
        ({"forget_quality": "true", "retain_model": "r", "retain_model_eval": "x.json"}, "exactly one of"),
        ({"retain_model": "nope"}, "retain_model 'nope' is not one of models"),
        ({"dataset": "{plain}"}, "forget row 0 lacks ['paraphrased_answer', 'perturbed_answer']"),
        ({"forget_quality": "true", "retain_model_eval": "{plain}"}, "cannot read a metrics JSON"),
    ],
)
def test_evaluate_tofu_bad_inputs(synth, tmp_path, capsys, keys, message):
    plain = write_jsonl(tmp_path / "plain.jsonl", TOFU_RETAIN)
    keys = {k: str(v).replace("{plain}", str(plain)) for k, v in keys.items()}
    assert main(["evaluate", str(write(tmp_path / "e.yaml", tofu_stage(synth, tmp_path, **keys)))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------------- a recipe, resumed


def small_recipe(folder: Path) -> Path:
    """prepare -> reinforce -> labels -> ref_logps -> whp (4 steps, checkpoint every 2) -> npo -> evaluate."""
    write(folder / "00_prepare.yaml", "# data\n" + PREPARE.format(out="data"))
    common = TRAIN_KEYS + "seed: 0\n"
    write(
        folder / "01_reinforce.yaml",
        '# reinforce\nstage: sft\nmodel: "{run_dir}/data/init"\ndataset: "{run_dir}/data/book.jsonl"\n'
        f"output_dir: reinforced\nmax_steps: 2\n{common}",
    )
    write(
        folder / "02_labels.yaml",
        '# labels\nstage: score\nsignal: whp_labels\nbaseline: "{run_dir}/data/init"\n'
        'reinforced: "{run_dir}/reinforced"\nanchor_terms: "{run_dir}/data/terms.yaml"\n'
        'dataset: "{run_dir}/data/book.jsonl"\nalpha: 5.0\noutput_dir: labels\n',
    )
    write(
        folder / "03_ref_logps.yaml",
        '# ref\nstage: score\nsignal: ref_logps\nmodel: "{run_dir}/data/init"\n'
        'dataset: "{run_dir}/data/book.jsonl"\noutput_dir: ref_logps\n',
    )
    write(
        folder / "04_whp.yaml",
        '# whp\nstage: train\nobjective: unlearning\nunlearning_loss: whp\nmodel: "{run_dir}/data/init"\n'
        f'dataset: "{{run_dir}}/labels"\noutput_dir: whp\nmax_steps: 4\nsave_steps: 2\n{common}',
    )
    write(
        folder / "05_npo.yaml",
        '# npo\nstage: train\nobjective: unlearning\nunlearning_loss: npo\nmodel: "{run_dir}/data/init"\n'
        f'dataset: "{{run_dir}}/ref_logps"\noutput_dir: npo\nmax_steps: 2\n{common}',
    )
    write(
        folder / "06_evaluate.yaml",
        '# eval\nstage: evaluate\ntask: familiarity\nmodels:\n  whp: "{run_dir}/whp"\n  npo: "{run_dir}/npo"\n'
        'prompts: "{run_dir}/data/prompts.jsonl"\nanchor_terms: "{run_dir}/data/terms.yaml"\n'
        'dataset: "{run_dir}/data/book.jsonl"\nmax_new_tokens: 4\noutput_dir: eval\n',
    )
    return folder


def test_recipe_killed_in_training_resumes_from_its_checkpoint_then_skips(tmp_path, monkeypatch, capsys):
    from tokentrain.trainers.unlearning import UnlearningTrainer

    recipe, run = small_recipe(tmp_path / "recipe"), tmp_path / "run"
    real = UnlearningTrainer.training_step

    def crash_at_step_3(self, *args, **kwargs):
        if self.args.unlearning_loss == "whp" and self.state.global_step == 2:
            raise RuntimeError("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(UnlearningTrainer, "training_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        main(["run", str(recipe), "--run_dir", str(run)])
    assert (run / "whp.tmp" / "checkpoint-2" / "trainer_state.json").exists() and not (run / "whp").exists()
    assert (run / "labels" / "_COMPLETE").exists()
    monkeypatch.undo()

    capsys.readouterr()
    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0
    err = capsys.readouterr().err
    assert err.count("is complete and unchanged, skipped") == 4  # prepare, reinforce, labels, ref_logps
    assert "resuming from" in err and "checkpoint-2" in err
    summary = json.loads((run / "whp" / "train_summary.json").read_text())
    assert summary["log_history"][-1]["step"] == 4
    assert json.loads((run / "eval" / "eval.json").read_text()).keys() == {"whp", "npo"}

    assert main(["run", str(recipe), "--run_dir", str(run)]) == 0  # everything finished: all skipped
    assert capsys.readouterr().err.count("is complete and unchanged, skipped") == 7

    # a changed setting stops, naming it; redone alone (--only), its consumers rerun as stale, the others are kept
    assert main(["run", str(recipe), "--run_dir", str(run), "--02_labels.alpha", "2.0"]) == 2
    assert "alpha: 5.0 then, 2.0 now" in capsys.readouterr().err
    assert main(["run", str(recipe), "--run_dir", str(run), "--only", "02_labels", "--02_labels.alpha", "2.0"]) == 0
    assert json.loads((run / "labels" / "stats.json").read_text())["alpha"] == 2.0
    npo = (run / "npo" / "stage.json").read_text()
    capsys.readouterr()
    assert main(["run", str(recipe), "--run_dir", str(run), "--02_labels.alpha", "2.0"]) == 0
    err = capsys.readouterr().err
    assert err.count("stale, rerunning") == 2  # 04_whp read the labels, 06_evaluate read whp
    assert (run / "npo" / "stage.json").read_text() == npo  # 05_npo read neither


# -------------------------------------------------------------------------------------------------------- report


def fake_mini(run: Path) -> None:
    """The folders the mini's report reads, 2 seeds, 2 TOFU learning rates, 1 split, with chosen numbers."""

    def alice(seed):
        return {"familiarity": 0.2 + 0.04 * seed, "anchor_prob": 0.1, "forget_ppl": 20.0 + seed, "retain_ppl": 65.0}

    write(run / "eval_alice_original" / "eval.json", json.dumps({"original": alice(0)}))
    for seed in (0, 1):
        models = {m: alice(seed) for m in ("reinforced", "whp", "ga", "npo", "simnpo")}
        models["ga"] = {**models["ga"], "forget_ppl": 1000.0 * (seed + 1)}
        write(run / "alice" / f"seed{seed}" / "eval" / "eval.json", json.dumps(models))
        stats = {"changed": 0.8, "flipped": 0.1 * (seed + 1), "leak": 0.12}
        write(run / "alice" / f"seed{seed}" / "labels" / "stats.json", json.dumps(stats))
        write(run / "tofu" / f"forget05_seed{seed}" / "labels" / "stats.json", json.dumps({"changed": 0.9}))
        for lr in ("0.0001", "0.0003"):
            methods = {
                m: {"forget_prob": 0.2 - 0.05 * seed, "forget_truth_ratio": 0.6, "retain_prob": 0.25}
                for m in ("whp", "ga", "npo", "simnpo")
            }
            folder = run / "tofu" / f"forget05_seed{seed}" / "lrs" / f"lr{lr}" / "eval" / "eval.json"
            write(folder, json.dumps(methods))
    originals = {
        "original": {"forget_prob": 0.3, "forget_truth_ratio": 0.6, "retain_prob": 0.3},
        "checkpoint": {"forget_prob": 0.003, "forget_truth_ratio": 0.9, "retain_prob": 0.003},
    }
    write(run / "eval_tofu_original_forget05" / "eval.json", json.dumps(originals))


def test_report_tables_and_plot(tmp_path, capsys):
    run = tmp_path / "mini"
    fake_mini(run)
    stage = f"stage: report\nreport: unlearning_mini\ninputs: {run}\noutput_dir: {tmp_path / 'report'}\n"
    assert main(["report", str(write(tmp_path / "r.yaml", stage))]) == 0
    out = capsys.readouterr().out
    # ga over seeds 0, 1: familiarity [0.20, 0.24] -> 0.220 ± 0.028; forget_ppl [1000, 2000] -> 1500.0 ± 707.1
    assert "| ga | 0.220 ± 0.028 | 0.100 ± 0.000 | 1500.0 ± 707.1 | 65.0 ± 0.0 |" in out
    assert "| original | 0.200 | 0.100 | 20.0 | 65.0 |" in out
    assert f"flipped (target ≠ baseline argmax) 0.150 ± {statistics.stdev([0.1, 0.2]):.3f}" in out
    # TOFU: forget_prob over seeds [0.2, 0.15]; retain cost (0.30 - 0.25) / (0.30 - 0.175) = 0.40
    assert "| whp | 0.0001 | 0.175 ± 0.035 | 0.600 ± 0.000 | 0.250 ± 0.000 | 0.40 |" in out
    assert "| checkpoint (before TOFU) | - | 0.003 | 0.900 | 0.003 | - |" in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["alice"]["models"]["ga"]["forget_ppl"]["values"] == [1000.0, 2000.0]
    assert report["tofu"]["forget05"]["lrs"] == ["0.0001", "0.0003"]
    png = tmp_path / "report" / "forget_retain.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

    (run / "alice" / "seed1" / "labels" / "stats.json").unlink()
    stage = stage.replace(str(tmp_path / "report"), str(tmp_path / "report2"))
    assert main(["report", str(write(tmp_path / "r2.yaml", stage))]) == 2
    assert "seed1/labels/stats.json is missing" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- the recipes

RECIPE_FILES = sorted((ROOT / "recipes" / "unlearning").rglob("[0-9]*.yaml")) + sorted(
    (ROOT / "tokentrain" / "shipped" / "quickstart" / "unlearning").glob("[0-9]*.yaml")
)


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_stage_parses_and_says_what_it_does(path):
    """Each stage file of the book, tofu, mini and quickstart recipes: a `# comment` first line, valid keys for its
    kind and trainer config, and no CPU recipe with gradient checkpointing on."""
    from tokentrain.config import load_stage, recipe_variables

    assert path.read_text().startswith("# "), path
    recipe = path.parent
    variables = {"run_dir": "/r", "top_dir": "/r", "parent_dir": "/r", "data_dir": "/d", "seed": "0", "lr": "1e-4"}
    variables["forget"] = "01"
    for folder in (recipe, recipe.parent):  # a grid sub-recipe reads its parent recipe's variables
        variables = {**recipe_variables(folder), **variables}
    stage = load_stage(path, {}, variables)
    assert stage.config.output_dir.startswith("/r/")
    real_scale = path.parent in (ROOT / "recipes" / "unlearning" / "book", ROOT / "recipes" / "unlearning" / "tofu")
    cpu = not real_scale
    if stage.config.stage in ("sft", "train") and cpu:
        kw = stage.trainer_kwargs
        assert kw.get("activation_checkpointing", kw.get("gradient_checkpointing")) is False, path
        assert stage.trainer_kwargs.get("bf16") is False, path


# ---------------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_quickstart_unlearning(tmp_path):
    """`tokentrain quickstart unlearning` in its own process (about 1.5 minutes on 2 cores), its log in a file."""
    log = tmp_path / "quickstart.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "tokentrain.cli", "quickstart", "unlearning", "--run_dir", str(tmp_path / "qs")],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
            timeout=900,
            check=False,
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "quickstart unlearning finished" in text and text.count("| whp |") == 1 and "\r" not in text
    results = json.loads((tmp_path / "qs" / "eval" / "eval.json").read_text())
    assert list(results) == ["original", "reinforced", "whp", "ga", "npo", "simnpo"]
    assert results["original"]["familiarity"] >= 0.75  # the checkpoint knows the book
    for r in results.values():
        assert 0.0 <= r["familiarity"] <= 1.0 and 0.0 < r["anchor_prob"] < 1.0 and r["retain_ppl"] > 1.0
    assert results["ga"]["forget_ppl"] > results["original"]["forget_ppl"]


@pytest.mark.slow
def test_mini_recipe_runs_end_to_end_on_two_steps(tmp_path, capsys):
    """recipes/unlearning/mini with every training stage cut to 2 steps: every stage, grid and the report run (the
    measured experiment: /work/notes/unlearning_results.md). Needs ../shared/data."""
    from tokentrain.config import default_data_dir

    if not (Path(default_data_dir()) / "text" / "alice.txt.gz").exists():
        pytest.skip("../shared/data is absent")
    run = tmp_path / "mini"
    argv = ["run", str(ROOT / "recipes" / "unlearning" / "mini"), "--run_dir", str(run), "--max_steps", "2"]
    cwd = os.getcwd()
    os.chdir(ROOT)  # the recipe names the dictionary and prompts from the repository root
    try:
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["alice"]["seeds"] == ["seed0", "seed1", "seed2"]
    assert set(report["tofu"]) == {"forget01", "forget05"} and report["tofu"]["forget05"]["lrs"] == ["0.0001", "0.0003"]
    assert (run / "report" / "forget_retain.png").exists()
    summary = json.loads((run / "data" / "prepare_summary.json").read_text())
    assert summary["parameters"] == 1_115_264 and summary["vocab"] == 2048  # spec 7: 1.12M parameters
    assert summary["tofu_train_rows"] == 1000 and summary["tofu_forget01_rows"] == 40
