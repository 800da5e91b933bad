"""The critical_dpo pipeline's stages through the CLI, on the arith_chain task made in code: prepare, generate (resume
after a kill, bad gold answers, unparsable answers), contrastive scoring (columns, refused inputs), the evaluation leak
check, the base SFT's accuracy stop, grids and the mini report's learning-rate selection."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from transformers import TrainerControl, TrainerState

from tokentrain import models
from tokentrain.cli import main
from tokentrain.config import ConfigError, load_stage
from tokentrain.models import char_tokenizer, tiny_llama
from tokentrain.reports.critical_dpo import critical_dpo_mini
from tokentrain.stages import evaluate as evaluate_stage
from tokentrain.stages import generate as generate_stage
from tokentrain.stages import train as train_stage
from tokentrain.tasks.arithmetic import ALPHABET, make_problems
from tokentrain.tasks.selection import question_hash


def write_stage(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    """A prepared arith_chain folder with small splits, made through the CLI."""
    root = tmp_path_factory.mktemp("arith")
    stage = write_stage(
        root / "00_prepare.yaml",
        f"stage: prepare\ntask: arith_chain\noutput_dir: {root / 'data'}\nseed: 0\n"
        "splits:\n  questions: [8, 4242]\n  dev: [6, 777]\n",
    )
    assert main(["prepare", str(stage)]) == 0
    return root / "data"


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """Two small Llamas (different seeds) on the arith tokenizer, saved with it: the positive and negative models."""
    root = tmp_path_factory.mktemp("posneg")
    tokenizer = char_tokenizer(ALPHABET)
    for name, seed in (("pos", 1), ("neg", 2)):
        model = tiny_llama(
            tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=128, seed=seed
        )
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


# ------------------------------------------------------------------------------------------------------- prepare


def test_prepare_arith_chain_writes_splits_and_the_264k_model(arith):
    questions = read_jsonl(arith / "questions.jsonl")
    assert [q["question_id"] for q in questions] == list(range(8))
    assert [{k: q[k] for k in ("prompt", "completion", "gold")} for q in questions] == make_problems(8, 4242)
    assert len(read_jsonl(arith / "dev.jsonl")) == 6
    from tokentrain.models import load_model, load_tokenizer

    model = load_model(str(arith / "init"), trainable=False)
    assert sum(p.numel() for p in model.parameters()) == 264_000  # spec section 7
    tokenizer = load_tokenizer(str(arith / "init"))
    assert len(tokenizer) == 20 and (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        0,
        1,
        2,
    )
    ids = tokenizer("Q:472+389\n")["input_ids"]
    assert ids[0] == 1 and len(ids) == 1 + len("Q:472+389\n")  # <bos>, then one id per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Q:472+389\n"


def test_char_tokenizer_refuses_a_repeated_character():
    with pytest.raises(ValueError, match="repeats"):
        char_tokenizer("0123456789+-=:QA\n0")


def test_arith_chain_without_splits_is_an_error(tmp_path, capsys):
    stage = write_stage(tmp_path / "p.yaml", f"stage: prepare\ntask: arith_chain\noutput_dir: {tmp_path / 'd'}\n")
    assert main(["prepare", str(stage)]) == 2
    assert "needs `splits`" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ generate

GENERATE = """stage: generate
model: {data}/init
dataset: {dataset}
task: arithmetic
gold_column: gold
num_samples: 2
temperature: 1.0
top_p: 1.0
top_k: 0
max_new_tokens: 12
batch_size: 16
chunk_questions: 3
completion_prefix: ""
seed: 1
output_dir: {out}
"""


def counting_generate(monkeypatch, crash_on: int | None = None) -> list:
    """Replace the CLI's `generate` with one that counts its calls (one per chunk) and, with `crash_on`, raises
    RuntimeError("killed") on that call: a run killed mid-way. Returns the list of calls."""
    real, calls = models.generate, []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_on:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "generate", counted)
    return calls


def test_generate_killed_midway_resumes_without_duplicates(arith, tmp_path, monkeypatch, capsys, one_thread):
    def stage(name):
        text = GENERATE.format(data=arith, dataset=arith / "questions.jsonl", out=tmp_path / name)
        return write_stage(tmp_path / f"{name}.yaml", text)

    assert main(["generate", str(stage("whole"))]) == 0  # uninterrupted: 8 questions in 3 chunks
    whole = tmp_path / "whole"

    counting_generate(monkeypatch, crash_on=3)
    with pytest.raises(RuntimeError, match="killed"):
        main(["generate", str(stage("resumed"))])
    partial = tmp_path / "resumed.tmp" / "chunks"
    assert sorted(p.name for p in partial.iterdir()) == ["chunk-000000.jsonl", "chunk-000001.jsonl"]
    assert (tmp_path / "resumed.tmp" / "stage.json").exists()  # the settings the partial work was started with
    assert not (tmp_path / "resumed").exists()  # nothing half-done looks finished

    # resuming with other sampling settings would mix two runs: refused, naming what changed
    assert main(["generate", str(stage("resumed")), "--temperature", "0.7"]) == 2
    assert "temperature: 1.0 then, 0.7 now" in capsys.readouterr().err

    monkeypatch.undo()
    calls = counting_generate(monkeypatch)
    assert main(["generate", str(stage("resumed"))]) == 0
    assert len(calls) == 1  # only the missing chunk was sampled
    resumed = tmp_path / "resumed"
    assert read_jsonl(resumed / "samples.jsonl") == read_jsonl(whole / "samples.jsonl")
    assert not (resumed / "chunks").exists()

    samples = read_jsonl(resumed / "samples.jsonl")
    assert [s["question_id"] for s in samples] == list(range(8))  # each question once
    summary = json.loads((resumed / "generate_summary.json").read_text())
    assert summary["questions"] == 8 and summary["samples"] == 16 and summary["question_ids"] == list(range(8))
    for s in samples:
        assert len(s["completions"]) == len(s["answers"]) == len(s["correct"]) == 2
        for answer, correct in zip(s["answers"], s["correct"]):
            assert not (answer == "" and correct)  # unparsable is never correct
    unparsable = sum(a == "" for s in samples for a in s["answers"]) / 16
    assert summary["unparsable_fraction"] == pytest.approx(unparsable)
    for name in ("pos_sft", "neg_sft", "pairs"):
        assert summary[f"{name}_rows"] == len(read_jsonl(resumed / f"{name}.jsonl"))


def test_generate_overwrite_discards_partial_chunks(arith, tmp_path, monkeypatch, one_thread):
    text = GENERATE.format(data=arith, dataset=arith / "questions.jsonl", out=tmp_path / "o")
    path = write_stage(tmp_path / "g.yaml", text)
    counting_generate(monkeypatch, crash_on=2)
    with pytest.raises(RuntimeError):
        main(["generate", str(path)])
    monkeypatch.undo()
    calls = counting_generate(monkeypatch)
    assert main(["generate", str(path), "--temperature", "0.7", "--overwrite"]) == 0
    assert len(calls) == 3  # every chunk sampled again, with the new settings
    assert json.loads((tmp_path / "o" / "generate_summary.json").read_text())["temperature"] == 0.7


def test_generate_bad_gold_answer_names_the_question(arith, tmp_path, capsys):
    rows = read_jsonl(arith / "questions.jsonl")[:4]
    rows[2] = {**rows[2], "question_id": 17, "gold": "about 40"}
    dataset = tmp_path / "q.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = write_stage(tmp_path / "g.yaml", GENERATE.format(data=arith, dataset=dataset, out=tmp_path / "o"))
    assert main(["generate", str(stage)]) == 2
    err = capsys.readouterr().err
    assert "row 2 (question_id 17)" in err and "about 40" in err


def test_generate_duplicate_question_id_is_an_error(arith, tmp_path, capsys):
    rows = read_jsonl(arith / "questions.jsonl")[:3]
    rows[1]["question_id"] = rows[0]["question_id"]
    dataset = tmp_path / "q.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = write_stage(tmp_path / "g.yaml", GENERATE.format(data=arith, dataset=dataset, out=tmp_path / "o"))
    assert main(["generate", str(stage)]) == 2
    assert "question_id 0 appears twice (row 1)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- contrastive score


def write_pairs(path: Path, n: int = 6) -> list[dict]:
    rows = []
    for p in make_problems(n, 5):
        last = p["completion"][-1]
        wrong = p["completion"][:-1] + str((int(last) + 1) % 10)  # the final digit of the answer off by one
        rows.append({"prompt": p["prompt"], "chosen": p["completion"], "rejected": wrong, "gold": p["gold"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


SCORE = """stage: score
signal: contrastive
pos_model: {pos}
neg_model: {neg}
tokenizer: {pos}
dataset: {dataset}
ce_beta: 1.0
batch_size: 4
output_dir: {out}
"""


def test_contrastive_score_stage_writes_trl_aligned_columns(small_models, tmp_path, one_thread):
    rows = write_pairs(tmp_path / "pairs.jsonl")
    pos, neg = small_models / "pos", small_models / "neg"
    text = SCORE.format(pos=pos, neg=neg, dataset=tmp_path / "pairs.jsonl", out=tmp_path / "scored")
    stage = write_stage(tmp_path / "s.yaml", text)
    assert main(["score", str(stage)]) == 0
    scored = load_from_disk(str(tmp_path / "scored"))
    assert scored.features["rejected_ids"].feature.dtype == "int32"
    assert scored.features["rejected_weights"].feature.dtype == "float32"
    assert scored["prompt"] == [r["prompt"] for r in rows] and scored["gold"] == [r["gold"] for r in rows]
    tokenizer = char_tokenizer(ALPHABET)
    for row, ids, weights in zip(rows, scored["rejected_ids"], scored["rejected_weights"]):
        # TRL's split: the completion's characters without <bos>, then <eos>
        assert ids == tokenizer(row["rejected"], add_special_tokens=False)["input_ids"] + [2]
        assert len(weights) == len(ids) and all(0.0 <= w <= 1.0 for w in weights)
    meta = json.loads((tmp_path / "scored" / "signal_meta.json").read_text())
    assert meta["signal"] == "contrastive" and meta["rows"] == 6 and meta["dropped_rows"] == 0
    flat = [w for row in scored["rejected_weights"] for w in row]
    assert meta["rejected_weight_mean"] == pytest.approx(sum(flat) / len(flat), abs=1e-6)


def test_contrastive_score_refuses_the_same_model_twice(small_models, tmp_path, capsys):
    write_pairs(tmp_path / "pairs.jsonl")
    pos = small_models / "pos"
    text = SCORE.format(pos=pos, neg=pos, dataset=tmp_path / "pairs.jsonl", out=tmp_path / "o")
    assert main(["score", str(write_stage(tmp_path / "s.yaml", text))]) == 2
    assert "pos_model and neg_model are both" in capsys.readouterr().err


def test_contrastive_score_refuses_a_negative_model_of_another_vocabulary(
    small_models, tiny_model_dir, tmp_path, capsys
):
    write_pairs(tmp_path / "pairs.jsonl")
    text = SCORE.format(
        pos=small_models / "pos", neg=tiny_model_dir, dataset=tmp_path / "pairs.jsonl", out=tmp_path / "o"
    )
    assert main(["score", str(write_stage(tmp_path / "s.yaml", text))]) == 2
    err = capsys.readouterr().err
    assert "neg_model" in err and "policy tokenizer" in err
    assert not (tmp_path / "o").exists()


def test_contrastive_score_needs_preference_columns(small_models, tmp_path, capsys):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "Q:1+1\n", "chosen": "A:2"}) + "\n")
    pos, neg = small_models / "pos", small_models / "neg"
    text = SCORE.format(pos=pos, neg=neg, dataset=tmp_path / "pairs.jsonl", out=tmp_path / "o")
    assert main(["score", str(write_stage(tmp_path / "s.yaml", text))]) == 2
    assert "missing ['rejected']" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- evaluate: leakage

EVALUATE = """stage: evaluate
task: gsm8k
dataset: {dataset}
gold_column: answer
rows: {rows}
train_samples: {samples}
models: {{}}
output_dir: {out}
"""


def leak_setup(tmp_path, question_ids, samples_from="gsm8k_solutions"):
    rows = [{"prompt": f"Question: q{i}\nAnswer:", "answer": f"#### {i}"} for i in range(8)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = tmp_path / "samples"
    samples.mkdir(exist_ok=True)
    summary = {"samples_from": samples_from, "question_ids": question_ids}
    (samples / "generate_summary.json").write_text(json.dumps(summary))
    return samples


@pytest.mark.parametrize(
    ("question_ids", "rows", "error"),
    [
        ([0, 1, 2], "all", "row 0"),  # train rows of the solutions file are evaluated
        ([0, 1, 2], "heldout", None),  # heldout keeps rows 3 and 7
        ([3, 5], "heldout", "row 3"),  # a heldout row fed training all the same
    ],
)
def test_evaluate_refuses_rows_that_fed_training(tmp_path, question_ids, rows, error):
    samples = leak_setup(tmp_path, question_ids)
    text = EVALUATE.format(dataset=tmp_path / "test.jsonl", rows=rows, samples=samples, out=tmp_path / "e")
    stage = load_stage(write_stage(tmp_path / "e.yaml", text))
    if error:
        with pytest.raises(ConfigError, match=f"first: {error}"):
            evaluate_stage.evaluation_rows(stage)
    else:
        kept = evaluate_stage.evaluation_rows(stage)
        assert kept["answer"] == ["#### 3", "#### 7"]


def test_evaluate_leak_check_matches_question_text(tmp_path):
    samples = leak_setup(tmp_path, [0, 1, 2], samples_from=None)  # sampled train questions: ids say nothing
    summary = json.loads((samples / "generate_summary.json").read_text())
    summary["question_hashes"] = [question_hash("Question:  q5\nAnswer:")]  # row 5's prompt, other spacing
    (samples / "generate_summary.json").write_text(json.dumps(summary))
    text = EVALUATE.format(dataset=tmp_path / "test.jsonl", rows="all", samples=samples, out=tmp_path / "e")
    stage = load_stage(write_stage(tmp_path / "e.yaml", text))  # no `question` column: prompts are compared
    with pytest.raises(ConfigError, match="1 evaluation rows \\(first: row 5\\) are questions that fed training"):
        evaluate_stage.evaluation_rows(stage)
    summary["question_hashes"] = [question_hash("Question: q99\nAnswer:")]
    (samples / "generate_summary.json").write_text(json.dumps(summary))
    assert len(evaluate_stage.evaluation_rows(stage)) == 8


def test_evaluate_heldout_refuses_a_sliced_split(tmp_path):
    samples = leak_setup(tmp_path, [0])
    text = EVALUATE.format(dataset=tmp_path / "test.jsonl", rows="heldout", samples=samples, out=tmp_path / "e")
    stage = load_stage(write_stage(tmp_path / "e.yaml", text + "dataset_split: train[1:]\n"))
    with pytest.raises(ConfigError, match="sliced split"):
        evaluate_stage.evaluation_rows(stage)


# ----------------------------------------------------------------------------------------------- accuracy stop

SFT_STOP = """stage: sft
model: {data}/init
dataset: {data}/questions.jsonl
output_dir: {out}
stop_dataset: {data}/dev.jsonl
stop_task: arithmetic
stop_accuracy: 0.45
stop_check_from: 10
stop_check_every: 5
"""


def test_accuracy_stop_checks_on_schedule_and_stops_at_the_threshold(arith, tmp_path, monkeypatch):
    stage = load_stage(write_stage(tmp_path / "s.yaml", SFT_STOP.format(data=arith, out=tmp_path / "o")))
    dev = read_jsonl(arith / "dev.jsonl")
    answers = {"right": [f"A:{r['gold']}" for r in dev], "wrong": [f"A:{int(r['gold']) + 1}" for r in dev]}
    mode = {"now": "wrong"}
    monkeypatch.setattr(models, "generate", lambda model, tok, prompts, *a, **k: answers[mode["now"]][: len(prompts)])
    callback = train_stage.AccuracyStop(stage.config, char_tokenizer(ALPHABET))
    model, state = torch.nn.Linear(1, 1), TrainerState()
    for step in (5, 10, 12, 15):
        state.global_step = step
        control = callback.on_step_end(None, state, TrainerControl(), model=model)
        assert not control.should_training_stop
    assert [c["step"] for c in callback.checks] == [10, 15] and all(c["accuracy"] == 0.0 for c in callback.checks)
    mode["now"] = "right"
    state.global_step = 20
    assert callback.on_step_end(None, state, TrainerControl(), model=model).should_training_stop
    assert callback.checks[-1] == {"step": 20, "accuracy": 1.0}
    assert model.training  # the model goes back to training mode after the check


def test_accuracy_stop_needs_its_dataset_and_task(arith, tmp_path):
    text = SFT_STOP.format(data=arith, out=tmp_path / "o").replace("stop_task: arithmetic\n", "stop_task: chess\n")
    stage = load_stage(write_stage(tmp_path / "s.yaml", text))
    with pytest.raises(ConfigError, match="stop_task"):
        train_stage.AccuracyStop(stage.config, char_tokenizer(ALPHABET))


# ------------------------------------------------------------------------------------------------------- grids


def test_grid_runs_the_sub_recipe_per_value_and_resumes(tmp_path, capsys, one_thread):
    write_stage(
        tmp_path / "recipe" / "sub" / "01_prepare.yaml",
        "stage: prepare\ntask: e2e_synthetic\nnum_rows: 30\nvocab_size: 300\nseed: '{seed}'\noutput_dir: data\n",
    )
    write_stage(
        tmp_path / "recipe" / "01_grid.yaml",
        "stage: grid\nrecipe: sub\nvariables:\n  seed: [3, 4]\nworkers: 1\noutput_dir: seeds\n",
    )
    run = tmp_path / "run"
    assert main(["run", str(tmp_path / "recipe"), "--run_dir", str(run)]) == 0
    for seed in (3, 4):
        assert (run / "seeds" / f"seed{seed}" / "data" / "_COMPLETE").exists()
    assert (run / "seeds" / "_COMPLETE").exists()
    a, b = (read_jsonl(run / "seeds" / f"seed{s}" / "data" / "train.jsonl") for s in (3, 4))
    assert a != b  # {seed} reached the sub-recipe's stage
    capsys.readouterr()
    assert main(["run", str(tmp_path / "recipe"), "--run_dir", str(run)]) == 0
    assert "all 2 combinations are done" in capsys.readouterr().err


def test_grid_variables_must_be_lists(tmp_path, capsys):
    write_stage(tmp_path / "recipe" / "sub" / "01_prepare.yaml", "stage: prepare\ntask: e2e_synthetic\noutput_dir: d\n")
    write_stage(
        tmp_path / "recipe" / "01_grid.yaml", "stage: grid\nrecipe: sub\nvariables:\n  seed: 3\noutput_dir: g\n"
    )
    assert main(["run", str(tmp_path / "recipe"), "--run_dir", str(tmp_path / "run")]) == 2
    assert "variables must map names to non-empty lists" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ report


def fake_mini_tree(root: Path, dev: dict, test: dict) -> None:
    """The folders the mini report reads: 2 seeds x 2 learning rates; dev/test[method][lr] = per-seed accuracies."""

    def put(path: Path, obj: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))

    put(root / "eval_base" / "eval.json", {"base": {"accuracy": 0.5}})
    for k, seed in enumerate(("seed0", "seed1")):
        s = root / "seeds" / seed
        summary = {"pairs_rows": 250 + k, "pos_sft_rows": 251, "neg_sft_rows": 460, "mean_wrong_per_question": 6.0}
        put(
            s / "samples" / "generate_summary.json",
            {**summary, "unparsable_fraction": 0.01, "samples": 80, "questions": 10},
        )
        put(
            s / "pairs_scored" / "signal_meta.json",
            {"rejected_weight_mean": 0.1 + k / 10, "rejected_weight_above_half": 0.1},
        )
        put(s / "eval_pos" / "eval.json", {"sft": {"accuracy": 0.4}})
        for lr in ("1e-05", "0.0001"):
            folder = s / "lrs" / f"lr{lr}"
            put(folder / "eval_dev" / "eval.json", {m: {"accuracy": dev[m][lr][k]} for m in dev})
            put(folder / "eval_test" / "eval.json", {m: {"accuracy": test[m][lr][k]} for m in test})
            for m in dev:
                logs = [{"logps/chosen": -2.0, "logps/rejected": -4.0}, {"logps/chosen": -1.5, "logps/rejected": -6.0}]
                put(folder / m / "train_summary.json", {"log_history": logs})


def test_mini_report_selects_each_methods_lr_on_dev(tmp_path):
    dev = {
        "sft_dp": {"1e-05": [0.5, 0.5], "0.0001": [0.6, 0.6]},
        "dpo": {"1e-05": [0.6, 0.6], "0.0001": [0.7, 0.5]},  # means tie: the smaller rate
        "cdpo_paper": {"1e-05": [0.6, 0.6], "0.0001": [0.8, 0.7]},
        "cdpo_code": {"1e-05": [0.7, 0.7], "0.0001": [0.5, 0.6]},
    }
    test = {
        "sft_dp": {"1e-05": [0.5, 0.5], "0.0001": [0.55, 0.57]},
        "dpo": {"1e-05": [0.60, 0.64], "0.0001": [0.9, 0.9]},  # test must not pick the rate
        "cdpo_paper": {"1e-05": [0.5, 0.5], "0.0001": [0.78, 0.80]},
        "cdpo_code": {"1e-05": [0.7, 0.72], "0.0001": [0.1, 0.1]},
    }
    fake_mini_tree(tmp_path, dev, test)
    results, table = critical_dpo_mini(tmp_path / "seeds", {"base": str(tmp_path / "eval_base")})
    selected = {m: r["selected_lr"] for m, r in results["methods"].items()}
    assert selected == {"sft_dp": "0.0001", "dpo": "1e-05", "cdpo_paper": "0.0001", "cdpo_code": "1e-05"}
    assert "| 1e-05 | 62.0 ± 2.8 | **62.0** / 90.0 |" in table  # dpo: mean ± sd at the selected rate
    assert "| 0.0001 | 79.0 ± 1.4 | 50.0 / **79.0** |" in table
    assert "| + SFT on D_p (the positive model, lr 1e-3) | - | 40.0 ± 0.0 |" in table
    assert "| + SFT on D_p, lr from the grid (not in the spec) | 0.0001 | 56.0 ± 1.4 | 50.0 / **56.0** | - |" in table
    assert "+0.50 / -2.00" in table  # chosen / rejected log-prob drift at the selected rate
    assert "| seed1 | 251 | 251 | 460 | 6.00 of 8 | 1.0% | 0.200 | 10.0% |" in table


def test_mini_report_names_a_missing_file(tmp_path):
    acc = {m: {"1e-05": [0.5, 0.5], "0.0001": [0.5, 0.5]} for m in ("sft_dp", "dpo", "cdpo_paper", "cdpo_code")}
    fake_mini_tree(tmp_path, acc, acc)
    (tmp_path / "seeds" / "seed1" / "lrs" / "lr0.0001" / "eval_test" / "eval.json").unlink()
    with pytest.raises(FileNotFoundError, match="eval_test"):
        critical_dpo_mini(tmp_path / "seeds", {"base": str(tmp_path / "eval_base")})


def test_generation_stops_once_a_stop_string_is_produced(arith, one_thread):
    from tokentrain.models import generate, load_model, load_tokenizer

    tokenizer = load_tokenizer(str(arith / "init"))
    model = load_model(str(arith / "init"), trainable=False)
    prompts = [tokenizer(q["prompt"])["input_ids"] for q in read_jsonl(arith / "questions.jsonl")]
    torch.manual_seed(0)
    free = generate(model, tokenizer, prompts, 24, do_sample=True, progress=False)
    torch.manual_seed(0)
    stopped = generate(model, tokenizer, prompts, 24, do_sample=True, progress=False, stop_strings=("1",))
    assert any("1" in t[:-1] for t in free)  # without the stop string, text goes on after a "1"
    for a, b in zip(free, stopped):
        assert "1" not in b[:-1]  # each sequence ends at its first "1" (one character per token here)
        assert a.startswith(b)  # and is otherwise the same sample


def test_evaluate_checks_every_gold_before_loading_a_model(tmp_path, capsys):
    rows = [{"prompt": f"Q:{i}+1\n", "gold": str(i + 1)} for i in range(4)]
    rows[2]["gold"] = "three"
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = (
        f"stage: evaluate\ntask: arithmetic\ngold_column: gold\ndataset: {tmp_path / 't.jsonl'}\n"
        f"models:\n  m: {tmp_path / 'no_such_model'}\noutput_dir: {tmp_path / 'e'}\n"
    )
    assert main(["evaluate", str(write_stage(tmp_path / "e.yaml", text))]) == 2
    assert "evaluation row 2: arith_chain gold answer is not an integer: 'three'" in capsys.readouterr().err


def test_single_stage_command_reads_the_recipes_variables(arith, tmp_path, capsys, one_thread):
    recipe = tmp_path / "recipe"
    write_stage(recipe / "variables.yaml", f"model: {arith / 'init'}\n")
    text = GENERATE.format(data=arith, dataset=arith / "questions.jsonl", out="samples")
    stage = write_stage(recipe / "01_generate.yaml", text.replace(f"model: {arith}/init", 'model: "{model}"'))
    assert main(["generate", str(stage), "--run_dir", str(tmp_path / "run"), "--num_samples", "1"]) == 0
    summary = json.loads((tmp_path / "run" / "samples" / "generate_summary.json").read_text())
    assert summary["model"] == str(arith / "init")
    missing = tmp_path / "no_such_model"
    argv = ["generate", str(stage), "--run_dir", str(tmp_path / "run2"), "--model", str(missing)]
    capsys.readouterr()
    assert main(argv) == 2  # --model set the variable: the stage read it, and the missing folder is named
    assert f"model folder not found: {missing}" in capsys.readouterr().err


def test_generate_summary_counts(tmp_path):
    def row(qid, answers, correct):
        return {
            "question_id": qid,
            "question": f"q{qid}",
            "gold": "5",
            "prompt": f"Q{qid}:",
            "completions": [f"c{a}" for a in answers],
            "answers": answers,
            "correct": correct,
        }

    samples = [
        row(0, ["5", "3", "3", "4"], [True, False, False, False]),  # 2 distinct wrong answers
        row(1, ["5", "5"], [True, True]),  # none
        row(2, ["", "7"], [False, False]),  # 1 (the unparsable one is not an answer)
    ]
    cfg = types.SimpleNamespace(
        completion_prefix=" ", samples_from="", samples_split="train", model="m", temperature=1.0
    )
    generate_stage.write_samples(tmp_path, samples, cfg, "01_generate")
    summary = json.loads((tmp_path / "generate_summary.json").read_text())
    assert summary["mean_wrong_per_question"] == pytest.approx(5 / 3)
    assert summary["distinct_wrong_answers_per_erring_question"] == pytest.approx(1.5)
    assert summary["unparsable_fraction"] == pytest.approx(1 / 8)
    assert (summary["pos_sft_rows"], summary["pairs_rows"]) == (2, 1)


@pytest.mark.slow
def test_evaluate_on_two_processes_equals_one(arith, tmp_path):
    """`launch.sh`-style evaluation: each of 2 gloo processes decodes half of the rows; the main process writes the
    same outputs as a single process (batch 1, so no padding differs between the two)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]

    def stage(out):
        text = (
            f"stage: evaluate\ntask: arithmetic\ngold_column: gold\ndataset: {arith / 'questions.jsonl'}\n"
            f"models:\n  init: {arith / 'init'}\nmax_new_tokens: 12\nbatch_size: 1\nheldout_nll: true\n"
            f"output_dir: {tmp_path / out}\n"
        )
        return write_stage(tmp_path / f"{out}.yaml", text)

    assert main(["evaluate", str(stage("one"))]) == 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(root / "accelerate_configs" / "cpu.yaml"), "-m", "tokentrain.cli", "evaluate", str(stage("two"))]
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert read_jsonl(tmp_path / "two" / "outputs_init.jsonl") == read_jsonl(tmp_path / "one" / "outputs_init.jsonl")
    one, two = (json.loads((tmp_path / d / "eval.json").read_text())["init"] for d in ("one", "two"))
    assert one["heldout_nll"] == pytest.approx(two["heldout_nll"], rel=1e-6)
    assert {k: one[k] for k in ("correct", "wrong", "unparsable")} == {
        k: two[k] for k in ("correct", "wrong", "unparsable")
    }


def test_e2e_table_without_heldout_nll():
    from tokentrain.stages.evaluate import format_table

    row = {"slot_acc": 0.5, "realised": 1, "slots": 2, "heldout_nll": None}
    table = format_table({"a_s0": row, "a_s1": {**row, "slot_acc": 0.7}})
    assert "| a_s0 | 0.5000 (1/2) | - |" in table and "| a | 0.600 ± 0.141 | - |" in table
