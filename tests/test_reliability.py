"""Nothing trains silently on wrong signals: the auxiliary model's tokenizer, the context the signals were scored
in, TRL's assistant-only loss and per-row chat arguments, and bad values in signal columns (issue: correctness)."""

from __future__ import annotations

import copy
import json
import logging

import pytest
from datasets import Dataset

from tokentrain.cli import main
from tokentrain.data import (
    SignalAlignmentError,
    completion_ids_of,
    context_ids_of,
    prepare_sft_dataset,
    tokenize_row,
)
from tokentrain.models import check_same_vocab, tiny_llama, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def scored_rows(rows, tok, with_prompt=True):
    out = []
    for row in rows:
        o = tokenize_row(row, tok)
        ids = completion_ids_of(o["input_ids"], o["labels"])
        extra = {"prompt_ids": context_ids_of(o["input_ids"], o["labels"])} if with_prompt else {}
        out.append({**row, **extra, "completion_ids": ids, "token_weights": [1.0] * len(ids)})
    return out


# ------------------------------------------------------------------------ the reference's own tokenizer


def other_bpe(tiny_tokenizer):
    """A byte-level BPE of exactly the tiny tokenizer's size, trained on other text: other merges, same ids range."""
    texts = [f"zq{i} xv{i * 7} kw" for i in range(400)] + ["plain words for another vocabulary"] * 5
    for size in range(len(tiny_tokenizer), len(tiny_tokenizer) + 40):
        tok = train_tokenizer(texts, vocab_size=size)
        if len(tok) == len(tiny_tokenizer):
            return tok
    pytest.skip("could not train a tokenizer of the same size")


def test_score_refuses_a_reference_whose_own_tokenizer_differs(
    tmp_path, tiny_tokenizer, tiny_model_dir, pc_rows, capsys
):
    other = other_bpe(tiny_tokenizer)
    assert other.get_vocab() != tiny_tokenizer.get_vocab() and len(other) == len(tiny_tokenizer)
    ref = tmp_path / "ref"
    tiny_llama(other, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64).save_pretrained(ref)
    other.save_pretrained(ref)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in pc_rows))
    argv = ["score", "--model", str(ref), "--tokenizer", str(tiny_model_dir), "--dataset", str(rows)]
    assert main([*argv, "--output_dir", str(tmp_path / "scored")]) == 2
    err = capsys.readouterr().err
    assert "reference model" in err and "differs from the policy tokenizer" in err
    assert not (tmp_path / "scored").exists()


def test_special_tokens_must_agree(tiny_tokenizer, tiny_model_factory):
    other = copy.deepcopy(tiny_tokenizer)
    other.bos_token = "<sep>"
    with pytest.raises(ValueError, match="has bos_token '<sep>' where the policy tokenizer has '<s>'"):
        check_same_vocab(tiny_tokenizer, tiny_model_factory(0), "reference x", model_tokenizer=other)


def test_train_refuses_signals_scored_with_another_tokenizer(tmp_path, tiny_tokenizer, tiny_model_dir, pc_rows, capsys):
    other = other_bpe(tiny_tokenizer)
    other.save_pretrained(tmp_path / "other_tok")
    data = tmp_path / "scored"
    Dataset.from_list(scored_rows(pc_rows, tiny_tokenizer)).save_to_disk(str(data))
    meta = {"signal": "token_weights", "tokenizer": str(tmp_path / "other_tok"), "vocab_size": len(other)}
    (data / "signal_meta.json").write_text(json.dumps(meta))
    argv = ["train", "--objective", "weighted_ntp", "--weighting", "column", "--model", str(tiny_model_dir)]
    assert main([*argv, "--dataset", str(data), "--max_steps", "1", "--output_dir", str(tmp_path / "o")]) == 2
    assert "were scored with the tokenizer" in capsys.readouterr().err


# ------------------------------------------------------------------------ the context the signals were scored in


def test_prompt_ids_are_checked_an_edited_prompt_is_an_error(pc_rows, tiny_tokenizer):
    rows = scored_rows(pc_rows[:4], tiny_tokenizer)
    prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=("token_weights",))  # aligned: fine
    rows[2]["prompt"] = rows[2]["prompt"].replace("name[", "name [")  # edited after scoring; completion unchanged
    with pytest.raises(SignalAlignmentError, match=r"row 2: stored 'prompt_ids' differ"):
        prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=("token_weights",))


def test_a_bos_adding_scoring_tokenizer_is_an_error(pc_rows, tiny_tokenizer):
    """The scorer's tokenizer put an extra BOS before the prompt: the completion ids agree, the context does not."""
    rows = scored_rows(pc_rows[:3], tiny_tokenizer)
    for r in rows:
        r["prompt_ids"] = [tiny_tokenizer.bos_token_id, *r["prompt_ids"]]
    with pytest.raises(
        SignalAlignmentError, match="'prompt_ids' differ from this trainer's tokenisation at position 1"
    ):
        prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=("token_weights",))


def test_score_stage_writes_prompt_ids(tmp_path, tiny_model_dir, pc_rows, tiny_tokenizer):
    from datasets import load_from_disk

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in pc_rows))
    argv = ["score", "--model", str(tiny_model_dir), "--dataset", str(rows), "--output_dir", str(tmp_path / "s")]
    assert main(argv) == 0
    scored = load_from_disk(str(tmp_path / "s"))
    for row, stored in zip(pc_rows, scored):
        o = tokenize_row(row, tiny_tokenizer)
        assert stored["prompt_ids"] == context_ids_of(o["input_ids"], o["labels"])
        assert stored["prompt_ids"] + stored["completion_ids"] == o["input_ids"]  # prompt/completion rows: the row


# ------------------------------------------------------------------------ TRL's assistant-only loss, tools, kwargs

# A ChatML-like template that marks assistant turns for `return_assistant_tokens_mask`, renders tools and a kwarg.
MARKED_TEMPLATE = (
    "{% if tools %}<s>tools<sep>{{ tools | length }}</s>{% endif %}"
    "{% if brief %}<s>system<sep>be brief</s>{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<s>assistant<sep>{% generation %}{{ message['content'] }}</s>"
    "{% endgeneration %}{% else %}<s>{{ message['role'] }}<sep>{{ message['content'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant<sep>{% endif %}"
)


def chat_rows():
    tool = {"type": "function", "function": {"name": "menu", "description": "the menu", "parameters": {}}}
    turns = [
        {"role": "user", "content": "Where is Aromi?"},
        {"role": "assistant", "content": "In the city centre."},
        {"role": "user", "content": "And the food?"},
        {"role": "assistant", "content": "Italian."},
    ]
    return [
        {"messages": turns, "tools": [tool], "chat_template_kwargs": {"brief": True}},
        {"messages": turns[:2], "tools": None, "chat_template_kwargs": {"brief": False}},
    ]


@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_assistant_only_loss_tools_and_kwargs_as_trl_prepares_them(
    assistant_only_loss, tiny_tokenizer, tiny_model_factory, tmp_path
):
    from trl import SFTConfig, SFTTrainer

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = MARKED_TEMPLATE
    rows = chat_rows()
    args = SFTConfig(
        output_dir=str(tmp_path), bf16=False, report_to="none", max_length=None, assistant_only_loss=assistant_only_loss
    )
    trainer = SFTTrainer(tiny_model_factory(0), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    for i, row in enumerate(rows):
        ours = tokenize_row(row, tok, assistant_only_loss=assistant_only_loss)
        assert ours["input_ids"] == trainer.train_dataset[i]["input_ids"], f"row {i}"
        assert ours["labels"] == trainer.train_dataset[i]["labels"], f"row {i}"
    first = tokenize_row(rows[0], tok, assistant_only_loss=assistant_only_loss)
    trained = tok.decode([t for t in first["labels"] if t != -100])
    if assistant_only_loss:  # the two assistant answers and their </s>, nothing else
        assert trained == "In the city centre.</s>Italian.</s>"
    else:
        assert "be brief" in tok.decode(first["input_ids"]) and "tools" in tok.decode(first["input_ids"])


def test_assistant_only_loss_on_plain_rows_or_unmarked_template_is_an_error(pc_rows, tiny_tokenizer):
    with pytest.raises(ValueError, match="needs conversational rows"):
        tokenize_row(pc_rows[0], tiny_tokenizer, assistant_only_loss=True)
    with pytest.raises(ValueError, match="no assistant tokens"):
        tokenize_row(chat_rows()[1], tiny_tokenizer, assistant_only_loss=True)  # the tiny template has no markers


def test_skip_prepare_dataset_is_refused(tiny_model_factory, tiny_tokenizer, pc_rows, tmp_path):
    from tokentrain.trainers.weighted_ntp import WeightedNTPConfig, WeightedNTPTrainer

    args = WeightedNTPConfig(
        output_dir=str(tmp_path), weighting="column", bf16=False, dataset_kwargs={"skip_prepare_dataset": True}
    )
    with pytest.raises(ValueError, match="skip_prepare_dataset"):
        WeightedNTPTrainer(
            tiny_model_factory(0), args, train_dataset=Dataset.from_list(scored_rows(pc_rows, tiny_tokenizer))
        )


# ------------------------------------------------------------------------ bad values in signal columns


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("token_weights", None, "position 1: None is not a number"),
        ("token_weights", "heavy", "position 1: 'heavy' is not a number"),
        ("completion_ids", 3.0, "must hold integer token ids, found 3.0"),
    ],
)
def test_bad_values_name_row_column_and_position(pc_rows, tiny_tokenizer, column, value, message):
    rows = scored_rows(pc_rows[:3], tiny_tokenizer, with_prompt=False)
    rows[1][column] = list(rows[1][column])
    rows[1][column][1] = value
    with pytest.raises(ValueError, match=message):
        prepare_sft_dataset(_as_dataset(rows, column), tiny_tokenizer, signal_columns=("token_weights",))


def _as_dataset(rows, column):
    """A Dataset that keeps the bad value as written (Arrow would coerce a mixed column)."""

    class Rows(list):
        column_names = list(rows[0])

        def select_columns(self, columns):
            return [{c: r[c] for c in columns} for r in self]

        def map(self, fn, with_indices, remove_columns, desc):
            return Dataset.from_list([fn(r, i) for i, r in enumerate(self)])

    return Rows(rows)


def test_very_large_weights_are_warned_about(pc_rows, tiny_tokenizer, caplog):
    rows = scored_rows(pc_rows[:3], tiny_tokenizer, with_prompt=False)
    rows[2]["token_weights"] = [1e6] * len(rows[2]["token_weights"])
    with caplog.at_level(logging.WARNING):
        prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, signal_columns=("token_weights",))
    assert "1 rows have token weights above 100 (largest 1e+06, row 2)" in caplog.text


# ------------------------------------------------------------------------ training stage: schedule, checkpoints, saves


def test_a_run_without_any_step_is_refused(tmp_path, tiny_model_dir, pc_rows, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in pc_rows))
    argv = ["sft", "--model", str(tiny_model_dir), "--dataset", str(rows), "--output_dir", str(tmp_path / "o")]
    assert main([*argv, "--max_steps", "0"]) == 2
    assert "give no training step" in capsys.readouterr().err
    assert main([*argv, "--num_train_epochs", "0"]) == 2
    assert not (tmp_path / "o").exists()


def _stage(tmp_path, **trainer_kwargs):
    from tokentrain.stages.base import Stage
    from tokentrain.stages.train import SFTConfig

    return Stage(
        path=None, config=SFTConfig(stage="sft", output_dir=str(tmp_path / "o")), trainer_kwargs=trainer_kwargs
    )


def test_a_checkpoint_cut_short_while_saving_is_skipped(tmp_path, caplog):
    from tokentrain.stages.train import _resume_point

    tmp = tmp_path / "o.tmp"
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_text("x")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        assert _resume_point(_stage(tmp_path), tmp) == str(tmp / "checkpoint-4")
    assert "checkpoint-6 was cut short while saving" in caplog.text and not (tmp / "checkpoint-6").exists()
    assert _resume_point(_stage(tmp_path, resume_from_checkpoint=str(tmp / "checkpoint-2")), tmp) == str(
        tmp / "checkpoint-2"
    )  # an explicit resume_from_checkpoint is honoured
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        _resume_point(_stage(tmp_path, resume_from_checkpoint=str(tmp / "checkpoint-9")), tmp)


def test_the_final_save_must_hold_every_weight_before_checkpoints_go(tmp_path, tiny_model_factory):
    from tokentrain.stages.train import _check_saved_weights

    model = tiny_model_factory(0)
    model.save_pretrained(tmp_path / "full")
    _check_saved_weights(tmp_path / "full", model)  # a full save passes
    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / "config.json").write_text("{}")  # what save_model leaves under SHARDED_STATE_DICT
    with pytest.raises(RuntimeError, match="holds 0 parameters of the model's .* checkpoints are kept"):
        _check_saved_weights(tmp_path / "sharded", model)
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(tiny_model_factory(0), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.save_pretrained(tmp_path / "adapter")
    _check_saved_weights(tmp_path / "adapter", peft)  # an adapter: its trainable weights


@pytest.mark.parametrize("stem", ["weighted_ntp", "critical_dpo", "concept_heads", "aligndistil", "unlearning"])
def test_model_card_cites_the_objective_and_is_named_after_the_final_folder(stem, tmp_path):
    from tokentrain.objectives import OBJECTIVES, objective
    from tokentrain.papers import PAPERS
    from tokentrain.stages.train import _trainer_kwargs

    assert stem in OBJECTIVES
    trainer = objective(stem)[1]
    paper = getattr(trainer, "_paper", None) or PAPERS["prior"]  # weighted_ntp picks its paper per weighting
    assert paper["id"] in {p["id"] for p in PAPERS.values()} and "tokentrain" in trainer._tag_names
    kwargs = _trainer_kwargs(_stage(tmp_path, push_to_hub=True))
    assert kwargs["hub_model_id"] == "o"  # not "o.tmp", where the trainer writes
    assert (
        kwargs["save_total_limit"] == 2
        and _trainer_kwargs(_stage(tmp_path, save_total_limit=5))["save_total_limit"] == 5
    )


# ------------------------------------------------------------------------ clear errors instead of tracebacks


def _rows_file(tmp_path, text, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', "rows.jsonl, line 2: not valid JSON"),
        ("", "holds no rows"),
        ('["a", "b"]\n', "line 1: a row must be a JSON object"),
        ('{"prompt": "a", "completion": 3}\n', "train row 0: prompt and completion must both be strings"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": null, "completion": "c"}\n', "train row 1: no usable row"),
        ('{"prompt": "a", "completion": "b"}\n{"text": "c"}\n', "train row 1 is a text row but row 0 is"),
    ],
)
def test_bad_rows_are_named(tmp_path, tiny_model_dir, text, message, capsys):
    rows = _rows_file(tmp_path, text)
    argv = ["sft", "--model", str(tiny_model_dir), "--dataset", str(rows), "--max_steps", "1"]
    assert main([*argv, "--output_dir", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_bad_keys_and_paths_are_named(tmp_path, tiny_model_dir, pc_rows, capsys):
    rows = _rows_file(tmp_path, "".join(json.dumps(r) + "\n" for r in pc_rows))
    cases = [
        (["score", "--model", str(tiny_model_dir), "--dtype", "fp32"], "dtype must be one of"),
        (["score", "--model", str(tiny_model_dir), "--batch_size", "0"], "batch_size must be >= 1, got 0"),
        (["score", "--model", str(tmp_path / "nope")], "model folder not found"),
        (["score", "--model", str(tmp_path)], "holds no tokenizer"),
    ]
    for argv, message in cases:
        assert main([*argv, "--dataset", str(rows), "--output_dir", str(tmp_path / "s")]) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert main(["score", "--dtype", "fp32"]) == 2
    assert "did you mean float32" in capsys.readouterr().err


def test_a_streaming_dataset_is_refused(tiny_model_factory, tiny_tokenizer, pc_rows, tmp_path):
    from tokentrain.trainers.weighted_ntp import WeightedNTPConfig, WeightedNTPTrainer

    stream = Dataset.from_list(scored_rows(pc_rows, tiny_tokenizer)).to_iterable_dataset()
    args = WeightedNTPConfig(output_dir=str(tmp_path), weighting="column", bf16=False, max_steps=1)
    with pytest.raises(ValueError, match="IterableDataset \\(streaming\\)"):
        WeightedNTPTrainer(tiny_model_factory(0), args, train_dataset=stream, processing_class=tiny_tokenizer)


def test_a_failed_stage_reports_its_partial_output(tmp_path, tiny_model_dir, pc_rows, capsys, monkeypatch):
    import tokentrain.signals.ref_logps as ref_logps

    def broken(*args, **kwargs):
        raise ValueError("scoring broke")

    monkeypatch.setattr(ref_logps, "score_ref_logps", broken)
    rows = _rows_file(tmp_path, "".join(json.dumps(r) + "\n" for r in pc_rows))
    argv = ["score", "--model", str(tiny_model_dir), "--dataset", str(rows), "--output_dir", str(tmp_path / "s")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"its partial output is in {tmp_path / 's.tmp'}" in err and "scoring broke" in err


def test_training_writes_no_cache_into_a_finished_scored_folder(tmp_path, tiny_model_dir, pc_rows):
    rows = _rows_file(tmp_path, "".join(json.dumps(r) + "\n" for r in pc_rows))
    scored = tmp_path / "scored"
    assert main(["score", "--model", str(tiny_model_dir), "--dataset", str(rows), "--output_dir", str(scored)]) == 0
    before = sorted(p.name for p in scored.iterdir())
    argv = ["train", "--objective", "weighted_ntp", "--weighting", "prior", "--model", str(tiny_model_dir)]
    argv += ["--dataset", str(scored), "--max_steps", "1", "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 0
    assert sorted(p.name for p in scored.iterdir()) == before  # no cache-*.arrow beside the scored rows


def test_frozen_models_load_outside_zero3_init(tiny_model_dir, monkeypatch):
    """After a ZeRO-3 training stage in the same process, transformers would build a frozen model under zero.Init
    (partitioned, usable only inside an engine): the scoring/generate/evaluate stages load theirs whole."""
    import weakref

    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed as hf_deepspeed

    from tokentrain.models import load_model

    class Zero3:
        def is_zero3(self):
            return True

    config = Zero3()
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", weakref.ref(config))
    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(hf_deepspeed.is_deepspeed_zero3_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(tiny_model_dir, trainable=False)
    assert seen == [False]  # frozen: outside zero.Init
    assert hf_deepspeed.is_deepspeed_zero3_enabled()  # and the training stage's setting is back afterwards


def test_with_several_processes_a_checkpoint_needs_every_ranks_rng_state(tmp_path, monkeypatch):
    """The main process writes trainer_state.json without waiting for the other ranks' RNG states."""
    import types

    import tokentrain.stages.train as train_stage

    state = types.SimpleNamespace(num_processes=2, is_main_process=True, wait_for_everyone=lambda: None)
    monkeypatch.setattr(train_stage, "distributed_state", lambda: state)
    tmp = tmp_path / "o.tmp"
    for step, ranks in ((2, (0, 1)), (4, (0,))):
        folder = tmp / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")
        for r in ranks:
            (folder / f"rng_state_{r}.pth").write_text("x")
    assert train_stage._resume_point(_stage(tmp_path), tmp) == str(tmp / "checkpoint-2")
