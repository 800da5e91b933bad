"""The concept_heads pipeline's stages through the CLI (spec `specs/concept_heads.md` sections 4, 7 and 9): the
equation data (made in code, and GSM8K's when the shared data is there), the shipped quickstart recipe on a few rows
with tiny settings (prepare, phase 0, self-distilled generation, phase heads, CAFT and NTP, evaluation), a killed and
resumed CAFT stage, generation resumed after a kill, the evaluation's exact match and per-head metrics against naive
references, the mini report, and each stage's bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.trainer import DEFAULT_CALLBACKS

from tokentrain.cli import main
from tokentrain.heads import AuxHeads, AuxHeadsConfig
from tokentrain.losses.concept_heads import IGNORE_INDEX, head_targets
from tokentrain.models import load_tokenizer
from tokentrain.reports.concept_heads import PLOT, concept_heads_mini
from tokentrain.signals import self_distill
from tokentrain.stages import evaluate_concept_heads as ev
from tokentrain.tasks import equations as eq

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "tokentrain" / "shipped" / "quickstart" / "concept_heads"
TINY = {  # the quickstart cut to a few rows and steps
    "num_train": "120",
    "num_test": "20",
    "pool": "40",
    "num_docs": "60",
    "pretrain_windows": "32",
    "window_chars": "24",
    "question_prompts": "6",
    "question_chars": "12",
    "max_steps": "2",
    "per_device_train_batch_size": "8",
    "max_new_tokens": "6",
    "save_steps": "100",
}


def write_stage(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def shared_data() -> Path:
    for var in ("TOKENTRAIN_SHARED_DATA", "TOKENTRAIN_DATA"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The quickstart recipe run on a few rows: every stage through `tokentrain run`, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("qs") / "run"
    argv = ["run", str(QUICKSTART), "--run_dir", str(run)]
    for key, value in TINY.items():
        argv += [f"--{key}", value]
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return run


# ------------------------------------------------------------------------------------------------ the equation data


def test_annotations_keep_only_integer_binary_equations():
    answer = (
        "She sold 48/2 = <<48/2=24>>24 clips. Then <<48+24=72>>72. Rate <<12/60=0.2>>0.2, "
        "pay <<0.2*50=10>>10, sum <<5+3+2=10>>10, no equation <<72>>, neg <<3-5=-2>>-2.\n#### 72"
    )
    assert eq.annotations(answer) == [("48/2", "24"), ("48+24", "72")]
    assert eq.strip_annotations("48/2 = <<48/2=24>>24 clips") == "48/2 = 24 clips"


def test_equation_rows_keep_repeats_in_train_and_mark_seen_test_equations():
    train, test = eq.equation_rows(
        ["<<1+2=3>> <<4*5=20>>", "<<1+2=3>>"], ["<<4*5=20>> <<9-1=8>>", "<<4*5=20>> <<7/7=1>>"]
    )
    assert train == [
        {"prompt": "1+2=", "completion": "3"},
        {"prompt": "4*5=", "completion": "20"},
        {"prompt": "1+2=", "completion": "3"},
    ]
    assert test == [  # distinct, in first-seen order
        {"prompt": "4*5=", "completion": "20", "seen": True},
        {"prompt": "9-1=", "completion": "8", "seen": False},
        {"prompt": "7/7=", "completion": "1", "seen": False},
    ]


def test_synthetic_equations_are_correct_and_half_the_test_is_seen():
    train, test = eq.synthetic_equations(300, 40, 60, seed=3)
    for row in train + test:
        assert str(int(eval(row["prompt"][:-1].replace("/", "//")))) == row["completion"]  # noqa: S307 - digits only
    known = {(r["prompt"], r["completion"]) for r in train}
    assert len({(r["prompt"], r["completion"]) for r in test}) == 40
    assert [r["seen"] for r in test] == [(r["prompt"], r["completion"]) in known for r in test]
    assert sum(r["seen"] for r in test) == 20
    assert eq.synthetic_equations(300, 40, 60, seed=3) == (train, test)  # seeded


def test_windows_and_alphabet():
    corpus = "abcdefghij" * 10
    windows = eq.windows(corpus, 5, 7, seed=1)
    assert len(windows) == 5 and all(len(w) == 7 and w in corpus for w in windows)
    assert windows == eq.windows(corpus, 5, 7, seed=1)
    assert eq.alphabet(["b a\n"]) == "\n *+-/0123456789=ab"  # the equation characters always in
    with pytest.raises(ValueError, match="outside printable ASCII"):
        eq.alphabet(["caf\u00e9"])
    assert eq.ascii_only("caf\u00e9 \u00bd") == "caf "


def test_gsm8k_equations_match_the_spec_counts(tmp_path, capsys):
    data = shared_data()
    if not (data / "gsm8k" / "train.jsonl.gz").exists():
        pytest.skip(f"{data}/gsm8k not found: the shared data folder is absent (set TOKENTRAIN_DATA to its path)")
    stage = write_stage(
        tmp_path / "p.yaml",
        f"stage: prepare\ntask: gsm8k_equations\ndata_dir: {data}\npretrain_windows: 4\nseed: 1234\n"
        f"output_dir: {tmp_path / 'data'}\n",
    )
    assert main(["prepare", str(stage)]) == 0
    summary = json.loads((tmp_path / "data" / "prepare_summary.json").read_text())
    # spec section 7: 18,232 annotations (6,533 distinct) in train; 1,937 distinct in test, 1,209 seen, 728 unseen;
    # 94 ids (91 ASCII characters + pad, bos, eos); 225,600 parameters
    assert {k: summary[k] for k in ("train_rows", "train_distinct", "test_rows", "test_seen", "test_unseen")} == {
        "train_rows": 18232,
        "train_distinct": 6533,
        "test_rows": 1937,
        "test_seen": 1209,
        "test_unseen": 728,
    }
    assert (summary["vocab_size"], summary["parameters"], summary["max_answer_chars"]) == (94, 225_600, 7)
    prompts = [r["prompt"] for r in read_jsonl(tmp_path / "data" / "prompts.jsonl")]
    assert len(prompts) == 300
    assert all(p.endswith("\n") and len(p) == 81 for p in prompts[:200])  # question tails
    assert all(len(p) == 48 for p in prompts[200:])  # Shakespeare openings


# ----------------------------------------------------------------------------------------------- the quickstart


def test_prepare_writes_rows_windows_and_the_untied_model(run_dir):
    data = run_dir / "data"
    tokenizer = load_tokenizer(data / "init")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    windows = read_jsonl(data / "pretrain.jsonl")
    assert len(windows) == 32
    for row in windows:  # <bos> + 24 characters, no <eos>: a window ends nowhere
        assert len(row["input_ids"]) == 25 and row["input_ids"][0] == 1 and 2 not in row["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(data / "init")
    assert not model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tokenizer)
    shape = (model.config.hidden_size, model.config.num_hidden_layers, model.config.intermediate_size)
    assert shape == (64, 4, 192)
    test = read_jsonl(data / "test.jsonl")
    assert len(test) == 20 and sum(r["seen"] for r in test) == 10
    assert len(read_jsonl(data / "train.jsonl")) == 120


def test_generate_writes_the_phase_one_columns(run_dir):
    samples = load_from_disk(str(run_dir / "samples"))
    assert samples.column_names == list(self_distill.COLUMNS)
    tokenizer = load_tokenizer(run_dir / "base")
    prompts = read_jsonl(run_dir / "data" / "prompts.jsonl")
    assert samples["prompt"] == [p["prompt"] for p in prompts]
    for row in samples:
        assert self_distill.check_generated_row(row, 0, tokenizer, len(tokenizer)) in (True, False)
        assert len(row["completion_ids"]) <= 6
    summary = json.loads((run_dir / "samples" / "generate_summary.json").read_text())
    assert summary["rows"] == 6 and summary["eos"] + summary["length"] == 6


def test_phase_heads_writes_only_the_heads_and_phase_two_a_vanilla_model(run_dir):
    heads = run_dir / "heads"
    assert (heads / "heads" / "heads.safetensors").exists() and (heads / "heads" / "concept_heads.json").exists()
    assert not (heads / "model.safetensors").exists()  # the frozen base is never re-saved
    assert len(load_file(str(heads / "heads" / "heads.safetensors"))) > 0
    for name in ("caft", "ntp"):
        weights = load_file(str(run_dir / name / "model.safetensors"))
        assert not [k for k in weights if "concept_heads" in k]
        model, info = AutoModelForCausalLM.from_pretrained(run_dir / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
    base = load_file(str(run_dir / "base" / "model.safetensors"))
    caft = load_file(str(run_dir / "caft" / "model.safetensors"))
    assert torch.equal(base["lm_head.weight"], caft["lm_head.weight"])  # frozen unembedding
    assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], caft["model.layers.0.mlp.up_proj.weight"])
    summary = json.loads((run_dir / "caft" / "train_summary.json").read_text())
    logged = [h for h in summary["log_history"] if "concept_heads/ce_1" in h]
    assert logged and "concept_heads/weight" in logged[0]


def test_evaluate_reports_exact_match_and_per_head_metrics(run_dir):
    results = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert list(results) == ["base", "ntp", "caft"]
    test = read_jsonl(run_dir / "data" / "test.jsonl")
    answer_tokens = sum(len(r["completion"]) + 1 for r in test)  # characters + <eos>
    for r in results.values():
        assert r["rows"] == 20 and r["rows_seen"] == r["rows_unseen"] == 10
        assert 0 <= r["exact_match"] <= 1 and len(r["acc"]) == len(r["ce"]) == 5
        # every prompt is >= 5 tokens long, so every head scores every answer token
        assert r["count"] == [answer_tokens] * 5
        assert all(c > 0 for c in r["ce"])
    outputs = read_jsonl(run_dir / "eval" / "outputs_caft.jsonl")
    assert len(outputs) == 20 and {"prompt", "reference", "output", "eos", "correct", "seen"} <= set(outputs[0])
    assert sum(o["correct"] for o in outputs) == results["caft"]["correct"]


class CrashAfterCheckpoint(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise RuntimeError(f"killed after checkpoint-{state.global_step}")


def test_killed_caft_stage_resumes_to_the_uninterrupted_weights(run_dir, tmp_path, capsys, one_thread):
    text = (QUICKSTART / "04_caft.yaml").read_text()
    stage = write_stage(tmp_path / "04_caft.yaml", text)
    argv = ["train", str(stage), "--run_dir", str(run_dir), "--max_steps", "5", "--save_steps", "2"]
    argv += ["--per_device_train_batch_size", "8", "--logging_steps", "1"]
    out = tmp_path / "killed"
    crash = CrashAfterCheckpoint(4)
    DEFAULT_CALLBACKS.append(crash)  # the list Trainer reads: the CLI builds its trainer untouched
    try:
        with pytest.raises(RuntimeError, match="killed after checkpoint-4"):
            main([*argv, "--output_dir", str(out)])
    finally:
        DEFAULT_CALLBACKS.remove(crash)
    partial = out.with_name("killed.tmp")
    assert sorted(p.name for p in partial.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not out.exists()
    capsys.readouterr()
    assert main([*argv, "--output_dir", str(out)]) == 0
    assert f"resuming from {partial / 'checkpoint-4'}" in capsys.readouterr().err
    assert main([*argv, "--output_dir", str(tmp_path / "straight")]) == 0
    got, expected = (
        load_file(str(out / "model.safetensors")),
        load_file(str(tmp_path / "straight" / "model.safetensors")),
    )
    start = load_file(str(run_dir / "base" / "model.safetensors"))
    assert max((expected[k] - start[k]).abs().max().item() for k in expected) > 1e-4  # not vacuous
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)


# --------------------------------------------------------------------------------------------------- generate

GENERATE = """stage: generate
task: self_distill
model: {model}
dataset: {dataset}
max_new_tokens: 5
batch_size: 4
chunk_rows: 2
seed: 7
output_dir: {out}
"""


def test_generate_killed_midway_resumes_without_resampling(run_dir, tmp_path, monkeypatch, capsys, one_thread):
    def stage(name):
        text = GENERATE.format(model=run_dir / "base", dataset=run_dir / "data" / "prompts.jsonl", out=tmp_path / name)
        return write_stage(tmp_path / f"{name}.yaml", text)

    assert main(["generate", str(stage("whole"))]) == 0  # 6 prompts in 3 chunks
    real, calls = self_distill.sample_completions, []

    def counted(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 2 and crash:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(self_distill, "sample_completions", counted)
    crash = True
    with pytest.raises(RuntimeError, match="killed"):
        main(["generate", str(stage("resumed"))])
    assert sorted(p.name for p in (tmp_path / "resumed.tmp" / "chunks").iterdir()) == ["chunk-000000"]
    assert main(["generate", str(stage("resumed")), "--temperature", "0.7"]) == 2  # other settings: refused
    assert "temperature: 1.0 then, 0.7 now" in capsys.readouterr().err
    crash, calls[:] = False, []
    assert main(["generate", str(stage("resumed"))]) == 0
    assert calls == [7 * 1_000_003 + 1, 7 * 1_000_003 + 2]  # only the missing chunks, with their own seeds
    whole, resumed = load_from_disk(str(tmp_path / "whole")), load_from_disk(str(tmp_path / "resumed"))
    assert resumed.to_list() == whole.to_list()
    assert not (tmp_path / "resumed" / "chunks").exists()


def test_generate_reads_the_first_user_turn_and_skips_long_prompts(tiny_model_dir, tmp_path, one_thread):
    rows = [
        {"conversation": [{"role": "user", "content": "name[Aromi]"}, {"role": "assistant", "content": "x"}]},
        {"conversation": [{"role": "system", "content": "s"}, {"role": "user", "content": "area[riverside]"}]},
        {"conversation": [{"role": "assistant", "content": "no user here"}]},
        {"conversation": [{"role": "user", "content": "name[Zizzi] " * 40}]},
    ]
    (tmp_path / "conv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = GENERATE.format(model=tiny_model_dir, dataset=tmp_path / "conv.jsonl", out=tmp_path / "o")
    text += "messages_column: conversation\nmax_prompt_length: 40\n"
    assert main(["generate", str(write_stage(tmp_path / "g.yaml", text))]) == 0
    out = load_from_disk(str(tmp_path / "o"))
    assert out["prompt"] == [
        [{"role": "user", "content": "name[Aromi]"}],
        [{"role": "user", "content": "area[riverside]"}],
    ]
    summary = json.loads((tmp_path / "o" / "generate_summary.json").read_text())
    assert summary["skipped"] == {"no_user_turn": 1, "too_long": 1} and summary["rows"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("temperature: 0.0\n", "need temperature > 0"),
        ("chunk_rows: 0\n", "chunk_rows must be >= 1"),
        ("max_prompt_length: -1\n", "max_prompt_length must be >= 0"),
        ("messages_column: talk\n", "lacks column(s) ['talk']"),
    ],
)
def test_generate_bad_inputs_name_the_key(run_dir, tmp_path, capsys, extra, message):
    text = GENERATE.format(model=run_dir / "base", dataset=run_dir / "data" / "prompts.jsonl", out=tmp_path / "o")
    assert main(["generate", str(write_stage(tmp_path / "g.yaml", text + extra))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_generate_needs_a_prompt_column(run_dir, tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "1+1"}) + "\n")
    text = GENERATE.format(model=run_dir / "base", dataset=tmp_path / "q.jsonl", out=tmp_path / "o")
    assert main(["generate", str(write_stage(tmp_path / "g.yaml", text))]) == 2
    assert "lacks column(s) ['prompt']" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def perturbed_heads(tiny_model_factory, tmp_path_factory):
    """3 decoder-layer heads for the seed-0 tiny model, moved off their initialisation."""
    model = tiny_model_factory(0)
    heads = AuxHeads.attach(model, AuxHeadsConfig(3, "decoder_layer"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return heads.save(tmp_path_factory.mktemp("heads") / "heads")


def test_head_metrics_equal_the_full_logits_reference(tiny_model_factory, tiny_tokenizer, pc_rows, perturbed_heads):
    """Batched, right-padded, chunked `head_metrics` = per-row full logits of every head, float64 CE and argmax."""
    from tokentrain.data import tokenize_row

    model = tiny_model_factory(0)
    got = ev.head_metrics(model, tiny_tokenizer, pc_rows, str(perturbed_heads), batch_size=5)
    assert not hasattr(model, "concept_heads")  # detached again
    heads = AuxHeads.load(model, perturbed_heads)
    nll = torch.zeros(4, dtype=torch.float64)
    hits, count = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    for row in pc_rows:
        t = tokenize_row(row, tiny_tokenizer)
        ids, labels = torch.tensor([t["input_ids"]]), torch.tensor([t["labels"]])
        logits = heads.logits(model, ids).double()  # (H + 1, 1, T, V)
        targets = head_targets(labels, 3)  # (H + 1, 1, T)
        for i in range(4):
            valid = targets[i] != IGNORE_INDEX
            logps = torch.log_softmax(logits[i][valid], -1)
            nll[i] -= logps.gather(-1, targets[i][valid].unsqueeze(-1)).sum()
            hits[i] += (logits[i][valid].argmax(-1) == targets[i][valid]).sum()
            count[i] += valid.sum()
    assert got["count"] == count.tolist()
    torch.testing.assert_close(torch.tensor(got["ce"], dtype=torch.float64), nll / count, atol=1e-5, rtol=1e-5)
    assert [round(a * n) for a, n in zip(got["acc"], got["count"])] == hits.tolist() and hits.sum() > 0


def test_batched_greedy_equals_one_prompt_at_a_time(tiny_model_factory, tiny_tokenizer, pc_rows):
    from tokentrain.data import prompt_ids

    model = tiny_model_factory(1)
    prompts = [prompt_ids(r, tiny_tokenizer) for r in pc_rows[:6]]
    batched = ev.greedy_ids(model, tiny_tokenizer, prompts, max_new_tokens=7, batch_size=4)  # left-padded
    eos = tiny_tokenizer.eos_token_id
    for prompt, (ids, ended) in zip(prompts, batched):
        seq, new = torch.tensor([prompt]), []
        with torch.no_grad():
            for _ in range(7):
                token = model(seq).logits[0, -1].argmax().item()
                if token == eos:
                    break
                new.append(token)
                seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
        assert ids == new and ended == (len(new) < 7 or token == eos)


def test_exact_match_needs_the_eos_and_the_exact_text(run_dir, monkeypatch):
    tokenizer = load_tokenizer(run_dir / "base")
    rows = [{"prompt": "1+1=", "completion": "2"}] * 3 + [{"prompt": "2+2=", "completion": "4"}]

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    fake = [(ids("2"), True), (ids("2"), False), (ids("22"), True), (ids("4"), True)]
    monkeypatch.setattr(ev, "greedy_ids", lambda *a, **k: fake)
    outputs = ev.exact_match_outputs(None, tokenizer, rows, 9, 8)
    assert [o["correct"] for o in outputs] == [True, False, False, True]  # no EOS: wrong; "22" != "2"
    rates = ev.exact_match_rates(outputs, [True, True, False, False])
    assert rates == {
        "exact_match": 0.5,
        "correct": 2,
        "rows": 4,
        "no_eos": 1,
        "exact_match_seen": 0.5,
        "rows_seen": 2,
        "exact_match_unseen": 0.5,
        "rows_unseen": 2,
    }
    assert "exact_match_seen" not in ev.exact_match_rates(outputs, [None] * 4)


EVALUATE = """stage: evaluate
task: concept_heads
dataset: {dataset}
models:
  m: {model}
output_dir: {out}
"""


@pytest.mark.parametrize(
    ("extra", "rows", "message"),
    [
        ("exact_match: false\n", None, "nothing to measure: set heads_path"),
        ("heads_path: {heads_dir}\n", None, "heads.safetensors, concept_heads.json missing"),
        ("max_new_tokens: 0\n", None, "max_new_tokens must be >= 1"),
        ("", [{"prompt": "1+1="}], "lack ['completion']"),
        ("", [{"prompt": "1+1=", "completion": "2", "seen": "yes"}], "row 0: column 'seen' must be true or false"),
    ],
)
def test_evaluate_bad_inputs_name_the_key(run_dir, tmp_path, capsys, extra, rows, message):
    dataset = run_dir / "data" / "test.jsonl"
    if rows is not None:
        dataset = tmp_path / "rows.jsonl"
        dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = EVALUATE.format(dataset=dataset, model=run_dir / "base", out=tmp_path / "o")
    text += extra.format(heads_dir=tmp_path)
    assert main(["evaluate", str(write_stage(tmp_path / "e.yaml", text))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_evaluate_refuses_heads_of_another_model(run_dir, tmp_path, capsys, perturbed_heads):
    text = EVALUATE.format(dataset=run_dir / "data" / "test.jsonl", model=run_dir / "base", out=tmp_path / "o")
    text += f"heads_path: {perturbed_heads}\nexact_match: false\n"
    assert main(["evaluate", str(write_stage(tmp_path / "e.yaml", text))]) == 2
    err = capsys.readouterr().err
    assert "saved for another model" in err and "hidden_size is 32 there but 64 here" in err


def test_evaluate_without_models_is_an_error(run_dir, tmp_path, capsys):
    text = EVALUATE.format(dataset=run_dir / "data" / "test.jsonl", model="x", out=tmp_path / "o")
    text = text.replace("models:\n  m: x\n", "")
    assert main(["evaluate", str(write_stage(tmp_path / "e.yaml", text))]) == 2
    assert "evaluate needs models" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- prepare


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("task: gsm8k_equations\ndata_dir: {tmp}\n", "gsm8k_equations reads"),
        ("task: synthetic_equations\nwindow_chars: 0\n", "window_chars must be >= 1"),
        ("task: synthetic_equations\npool: 0\n", "pool must be >= 1"),
        ("task: equations\n", "prepare: task must be one of"),
    ],
)
def test_prepare_bad_inputs_name_the_key(tmp_path, capsys, extra, message):
    text = f"stage: prepare\noutput_dir: {tmp_path / 'o'}\n" + extra.format(tmp=tmp_path)
    assert main(["prepare", str(write_stage(tmp_path / "p.yaml", text))]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- report


def fake_mini_tree(root: Path) -> None:
    def put(path: Path, obj: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))

    def arm(em, seen, unseen, acc, secs):
        return {
            "exact_match": em,
            "exact_match_seen": seen,
            "exact_match_unseen": unseen,
            "acc": acc,
            "ce": [2.0 - a for a in acc],
            "train_seconds": secs,
        }

    put(root / "eval_base" / "eval.json", {"base": arm(0.0, 0.0, 0.0, [0.3, 0.1, 0.1, 0.05, 0.0], None)})
    for k, (ntp, caft) in enumerate(((0.14, 0.13), (0.16, 0.15))):
        acc_n, acc_c = [0.6, 0.08, 0.05, 0.05, 0.04], [0.6 + k / 100, 0.25, 0.2, 0.2, 0.2]
        put(
            root / "seeds" / f"seed{k}" / "eval" / "eval.json",
            {"ntp": arm(ntp, ntp + 0.1, ntp - 0.1, acc_n, 90), "caft": arm(caft, caft, caft, acc_c, 180 + k)},
        )


def test_mini_report_table_and_plot(tmp_path):
    fake_mini_tree(tmp_path)
    out = tmp_path / "report"
    out.mkdir()
    results, table = concept_heads_mini(tmp_path / "seeds", {"base": str(tmp_path / "eval_base")}, out_dir=out)
    assert results["seeds"] == ["seed0", "seed1"]
    assert "| NTP (beta 0) | 15.0 ± 1.4 | 25.0 ± 1.4 | 5.0 ± 1.4 | 0.600 | 0.080 |" in table
    assert "| CAFT (beta 0.01, sine decay) | 14.0 ± 1.4 |" in table and "| 180, 181 |" in table
    assert "| phase-0 model, zero-shot | 0.0 | 0.0 | 0.0 | 0.300 |" in table
    assert "paired by seed: -1.00 ± 0.00 points (-1.0, -1.0)" in table
    assert "head 1: +0.170" in table
    assert results["arms"]["caft"]["acc"][0]["sd"] == pytest.approx(0.00707107, abs=1e-6)
    assert (out / PLOT).stat().st_size > 1000 and (out / PLOT).read_bytes()[:4] == b"\x89PNG"


def test_mini_report_names_a_missing_arm_or_file(tmp_path):
    fake_mini_tree(tmp_path)
    path = tmp_path / "seeds" / "seed1" / "eval" / "eval.json"
    path.write_text(json.dumps({"ntp": {}}))
    with pytest.raises(KeyError, match=r"has no \['caft'\]"):
        concept_heads_mini(tmp_path / "seeds", {})
    path.unlink()
    with pytest.raises(FileNotFoundError, match="seed1/eval/eval.json"):
        concept_heads_mini(tmp_path / "seeds", {})


def test_shipped_optional_task_warmup_stage_parses():
    """The optional stage 02b of the real-scale recipe is not numbered (off by default), so the config test does not
    see it: parsed here with the recipe's variables."""
    from tokentrain.config import load_stage, recipe_variables

    recipe = ROOT / "recipes" / "concept_heads"
    variables = {**recipe_variables(recipe), "run_dir": "runs/x", "top_dir": "runs/x", "data_dir": "d"}
    stage = load_stage(recipe / "optional_02b_heads_task.yaml", {}, variables)
    args = stage.config.trainer_config_class()(output_dir="/tmp/unused", **{**stage.trainer_kwargs, "bf16": False})
    assert (args.phase, args.heads_path, args.num_train_epochs) == ("heads", "runs/x/heads/heads", 1)


@pytest.mark.slow
def test_evaluate_on_two_processes_equals_one(run_dir, tmp_path):
    """`launch.sh`-style evaluation: each of 2 gloo processes decodes and scores half of the rows; the main process
    writes the same outputs and metrics as a single process (batch 1, so no padding differs between the two)."""
    import subprocess
    import sys

    def stage(out):
        text = EVALUATE.format(dataset=run_dir / "data" / "test.jsonl", model=run_dir / "caft", out=tmp_path / out)
        text += f"heads_path: {run_dir / 'heads' / 'heads'}\nbatch_size: 1\nmax_new_tokens: 6\n"
        return write_stage(tmp_path / f"{out}.yaml", text)

    assert main(["evaluate", str(stage("one"))]) == 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(ROOT / "accelerate_configs" / "cpu.yaml"), "-m", "tokentrain.cli", "evaluate", str(stage("two"))]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert read_jsonl(tmp_path / "two" / "outputs_m.jsonl") == read_jsonl(tmp_path / "one" / "outputs_m.jsonl")
    one, two = (json.loads((tmp_path / d / "eval.json").read_text())["m"] for d in ("one", "two"))
    assert one["count"] == two["count"] and one["correct"] == two["correct"]
    assert one["ce"] == pytest.approx(two["ce"], rel=1e-6) and one["acc"] == pytest.approx(two["acc"], abs=1e-12)
