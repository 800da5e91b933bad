"""Tests for tokentrain/trainers/concept_heads.py: spec `specs/concept_heads.md` sections 3 (trainer, trainable sets,
persistence, metrics), 6 (phase properties, beta = 0 = TRL SFT, global normalisation, reload, schedule, resume) and 9
(the trainer's bad inputs).

Everything runs on the conftest tiny Llama (2 layers, hidden 32, tied embeddings) and its 12 prompt/completion rows.
"One step" is Trainer's real loop followed by one SGD step with lr 1, no clipping and no schedule, so the weights
after it are w0 - gradient: comparing them compares the step's gradients.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from datasets import Dataset, IterableDataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

from tokentrain.heads import AuxHeads, AuxHeadsConfig
from tokentrain.signals.self_distill import sample_completions
from tokentrain.trainers.concept_heads import ConceptHeadsConfig, ConceptHeadsTrainer

ATOL = 1e-6
ONE_SGD_STEP = {
    "optim": "sgd",
    "learning_rate": 1.0,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "max_grad_norm": 0.0,
    "weight_decay": 0.0,
    "max_steps": 1,
    "logging_steps": 1,
    "train_sampling_strategy": "sequential",
}


def config_kwargs(**kwargs):
    return {
        "bf16": False,
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "no",
        "max_length": None,
        "seed": 0,
        **kwargs,
    }


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rows(pc_rows):
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in pc_rows[:8]])


@pytest.fixture(scope="module")
def heads_dir(tiny_model_factory, tmp_path_factory):
    """Heads for the seed-0 tiny model, moved off their NTP-equal initialisation (a phase-heads output folder)."""
    model = tiny_model_factory(0)
    heads = AuxHeads.attach(model, AuxHeadsConfig(3, "decoder_layer"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return heads.save(tmp_path_factory.mktemp("heads") / "heads")


@pytest.fixture(scope="module")
def generated(tiny_model_factory, tiny_tokenizer, pc_rows):
    """Self-distilled rows: the seed-0 model's own samples for 8 prompts (section 2)."""
    prompts = Dataset.from_list([{"prompt": r["prompt"]} for r in pc_rows[:8]])
    return sample_completions(prompts, tiny_model_factory(0), tiny_tokenizer, max_new_tokens=10, batch_size=4, seed=0)


@pytest.fixture(scope="module")
def make(tiny_model_factory, tiny_tokenizer):
    def make(dataset, out, model=None, **config):
        args = ConceptHeadsConfig(output_dir=str(out), **config_kwargs(**config))
        return ConceptHeadsTrainer(
            model if model is not None else tiny_model_factory(0),
            args,
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )

    return make


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_and_diff(trainer):
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    return {n for n in after if not torch.equal(after[n], before[n])}, after


def one_step(trainer):
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    assert max((after[n] - before[n]).abs().max().item() for n in after) > 1e-4, "vacuous comparison"
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return loss, after


def assert_same_step(a, b, atol=ATOL, skip=(), label=""):
    (loss_a, params_a), (loss_b, params_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=atol), label
    for name in params_a:
        if not any(s in name for s in skip):
            torch.testing.assert_close(params_a[name], params_b[name], atol=atol, rtol=0, msg=f"{label} {name}")


# ------------------------------------------------------------------------------------------ phase heads


def test_phase_heads_changes_only_the_heads_and_saves_only_them(generated, make, tmp_path, tiny_model_factory):
    assert set(generated.column_names) == {"prompt", "completion", "prompt_ids", "completion_ids", "finish_reason"}
    trainer = make(
        generated, tmp_path, phase="heads", num_aux_heads=3, max_steps=2, per_device_train_batch_size=4, logging_steps=1
    )
    # trained on the stored ids: input = prompt_ids + completion_ids, labels -100 on the prompt
    first = trainer.train_dataset[0]
    row = next(r for r in generated if list(r["prompt_ids"]) + list(r["completion_ids"]) == first["input_ids"])
    assert first["labels"] == [-100] * len(row["prompt_ids"]) + list(row["completion_ids"])
    changed, _ = train_and_diff(trainer)
    assert changed and all(n.startswith("concept_heads.") for n in changed)
    assert len(changed) == len(list(trainer.aux_heads.parameters()))  # every head weight moved
    logged = trainer.state.log_history[0]
    assert {"concept_heads/ce_1", "concept_heads/acc_3", "concept_heads/count_2"} <= set(logged)
    assert "concept_heads/ce_0" not in logged and "concept_heads/weight" not in logged
    w = [0.8, 0.64, 0.512]
    assert logged["loss"] == pytest.approx(
        sum(wi * logged[f"concept_heads/ce_{i + 1}"] for i, wi in enumerate(w)), rel=1e-5
    )

    trainer.save_model(str(tmp_path / "out"))
    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert saved == ["heads", "training_args.bin"]  # the frozen base is never re-saved
    fresh = tiny_model_factory(0)
    loaded = AuxHeads.load(fresh, tmp_path / "out" / "heads")
    ids = torch.tensor([first["input_ids"]])
    assert torch.equal(loaded.logits(fresh, ids), trainer.aux_heads.logits(trainer.model, ids))


def test_phase_heads_on_sft_rows_and_continuing_from_heads(rows, make, heads_dir, tmp_path):
    """Stage 02b: phase heads on ordinary prompt/completion rows (the task's answers), starting from saved heads."""
    trainer = make(rows, tmp_path, phase="heads", num_aux_heads=3, heads_path=str(heads_dir), max_steps=1)
    start = load_file(str(heads_dir / "heads.safetensors"))
    assert torch.equal(
        trainer.aux_heads.state_dict()["heads.0.mlp.up_proj.weight"], start["heads.0.mlp.up_proj.weight"]
    )
    changed, _ = train_and_diff(trainer)
    assert changed and all(n.startswith("concept_heads.") for n in changed)


# --------------------------------------------------------------------------------------- phase finetune


def test_finetune_full_frozen_heads_and_unembedding(rows, make, heads_dir, tmp_path, caplog):
    trainer = make(
        rows,
        tmp_path,
        phase="finetune",
        finetune="full",
        heads_path=str(heads_dir),
        num_aux_heads=3,
        max_steps=2,
        logging_steps=1,
    )
    with caplog.at_level(logging.WARNING, logger="tokentrain.trainers.concept_heads"):
        changed, _ = train_and_diff(trainer)
    assert not any(n.startswith("concept_heads.") for n in changed)
    assert "lm_head.weight" not in changed and "model.embed_tokens.weight" not in changed
    assert {n for n in changed if "layers" in n} == {
        n for n, _ in trainer.model.named_parameters() if n.startswith("model.layers")
    }
    assert "model.norm.weight" in changed
    logged = trainer.state.log_history[0]
    assert {f"concept_heads/{k}_{i}" for k in ("ce", "acc", "count") for i in range(4)} <= set(logged)
    assert logged["concept_heads/weight"] == 0.01
    assert logged["concept_heads/ce_1"] > 4.0 and "fit this task poorly" in caplog.text  # the paper's 02b rule


def test_finetune_lora_trains_only_the_adapter(rows, make, heads_dir, tmp_path):
    trainer = make(rows, tmp_path, phase="finetune", heads_path=str(heads_dir), num_aux_heads=3, max_steps=1)
    assert trainer.args.finetune == "lora"
    cfg = trainer.model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.1)
    assert any(n.startswith("concept_heads.") for n in cfg.exclude_modules)
    changed, _ = train_and_diff(trainer)
    assert changed and all("lora_" in n for n in changed)
    assert not any("concept_heads" in n for n, _ in trainer.model.named_parameters() if "lora_" in n)
    trainer.save_model(str(tmp_path / "out"))
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k and "concept_heads" not in k for k in adapter)
    assert not (tmp_path / "out" / "heads").exists()
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["exclude_modules"] is None  # reloads onto a vanilla base (no head module to exclude)


def test_train_heads_trains_and_saves_them(rows, make, heads_dir, tmp_path):
    trainer = make(
        rows,
        tmp_path,
        phase="finetune",
        finetune="full",
        heads_path=str(heads_dir),
        num_aux_heads=3,
        train_heads=True,
        max_steps=1,
    )
    changed, after = train_and_diff(trainer)
    assert any(n.startswith("concept_heads.") for n in changed) and "lm_head.weight" not in changed
    trainer.save_model(str(tmp_path / "out"))
    saved = load_file(str(tmp_path / "out" / "heads" / "heads.safetensors"))
    assert torch.equal(saved["heads.2.mlp.down_proj.weight"], after["concept_heads.heads.2.mlp.down_proj.weight"])
    assert not any("concept_heads" in k for k in load_file(str(tmp_path / "out" / "model.safetensors")))


def test_finetuned_model_reloads_as_a_vanilla_model(rows, make, heads_dir, tmp_path, tiny_tokenizer):
    trainer = make(
        rows, tmp_path, phase="finetune", finetune="full", heads_path=str(heads_dir), num_aux_heads=3, max_steps=1
    )
    trainer.train()
    out = tmp_path / "model"
    trainer.save_model(str(out))
    assert not any("concept_heads" in k for k in load_file(str(out / "model.safetensors")))
    vanilla, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([tiny_tokenizer("<s>name[Aromi], food[Italian]<sep>")["input_ids"]])
    generated = vanilla.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, ids.shape[1] + 4)
    trained = trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(trainer.aux_heads.logits(trained, ids)[0], vanilla(input_ids=ids).logits)


def test_lora_output_loads_onto_a_vanilla_base(rows, make, heads_dir, tmp_path, tiny_model_factory):
    from peft import PeftModel

    trainer = make(rows, tmp_path, phase="finetune", heads_path=str(heads_dir), num_aux_heads=3, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    reloaded = PeftModel.from_pretrained(tiny_model_factory(0), str(tmp_path / "out"))
    ids = torch.tensor([[1, 40, 50, 60, 3]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits, atol=1e-6, rtol=0
        )


# ------------------------------------------------------------------------------- beta = 0 is TRL's SFT


def loss_and_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_beta_zero_equals_trl_sft_exactly(rows, make, tiny_model_factory, tiny_tokenizer, tmp_path):
    """beta = 0: no heads, and the loss and gradients are TRL 1.16 SFTTrainer's, bit for bit (on the trainable set:
    every weight but the tied lm_head / embeddings)."""
    ours = make(rows, tmp_path / "ours", phase="finetune", finetune="full", beta=0.0)
    assert ours.aux_heads is None and "concept_heads" not in ours.model._modules
    trl = SFTTrainer(
        tiny_model_factory(0),
        SFTConfig(output_dir=str(tmp_path / "trl"), **config_kwargs()),
        train_dataset=rows,
        processing_class=tiny_tokenizer,
    )
    batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    trl_batch = trl.data_collator([trl.train_dataset[i] for i in range(4)])
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(batch[key], trl_batch[key]), key
    loss, grads = loss_and_grads(ours, batch)
    trl_loss, trl_grads = loss_and_grads(trl, trl_batch)
    assert torch.equal(loss, trl_loss)
    assert set(grads) == set(trl_grads) - {"model.embed_tokens.weight"}
    for name in grads:
        assert torch.equal(grads[name], trl_grads[name]), name


@pytest.mark.parametrize("batch, accumulation", [(4, 1), (2, 2)])
def test_beta_zero_equals_trl_sft_step(rows, make, tiny_model_factory, tiny_tokenizer, tmp_path, batch, accumulation):
    step = {**ONE_SGD_STEP, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation}
    trl = SFTTrainer(
        tiny_model_factory(0),
        SFTConfig(output_dir=str(tmp_path / "trl"), **config_kwargs(**step)),
        train_dataset=rows.select(range(4)),
        processing_class=tiny_tokenizer,
    )
    ours = make(rows.select(range(4)), tmp_path / "ours", phase="finetune", finetune="full", beta=0.0, **step)
    assert_same_step(one_step(ours), one_step(trl), skip=("embed_tokens", "lm_head"))


# ------------------------------------------------------------------------------- global normalisation


LAYOUTS = {
    "padded": {},
    "pad64": {"pad_to_multiple_of": 64},
    "padding_free": {"padding_free": True},
    "packed": {"packing": True, "max_length": 4096},
}


@pytest.mark.parametrize("phase", ["heads", "finetune"])
def test_batch4_equals_batch1_times_ga4_and_layouts(rows, make, heads_dir, tmp_path, phase):
    """Each head's normaliser is global: 4 rows x GA 1 = 1 row x GA 4 = 2 x 2, and extra padding, padding-free and
    bfd packing change nothing (loss and every weight after one SGD step, 1e-6). Language-modelling rows (every token
    a target), so that a head target crossing into the next packed document would be a valid one."""
    data = Dataset.from_list([{"text": r["prompt"] + r["completion"]} for r in rows.select(range(4))])
    extra = {"heads_path": str(heads_dir), "num_aux_heads": 3}
    if phase == "finetune":
        extra.update(finetune="full", beta=0.5, schedule="constant")  # a large head term, so the heads matter
    results = {}
    for batch, accumulation, layout in (
        (4, 1, "padded"),
        (1, 4, "padded"),
        (2, 2, "padded"),
        (4, 1, "pad64"),
        (4, 1, "padding_free"),
        (1, 1, "packed"),
    ):
        trainer = make(
            data,
            tmp_path / f"{batch}x{accumulation}{layout}",
            phase=phase,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            **ONE_SGD_STEP,
            **LAYOUTS[layout],
            **extra,
        )
        if layout == "packed":
            assert len(trainer.train_dataset) == 1  # one bfd pack holding the 4 rows: head targets stop at each row
        results[batch, accumulation, layout] = one_step(trainer)
    reference = results[4, 1, "padded"]
    for key, result in results.items():
        assert_same_step(result, reference, label=str(key))


@pytest.mark.parametrize("phase", ["heads", "finetune"])
def test_activation_checkpointing_changes_nothing(rows, make, heads_dir, tmp_path, phase):
    """Reentrant activation checkpointing (as PEFT + ZeRO-3 forces): same step as without. In phase heads the base
    runs under no_grad, so a checkpointed head would get no gradient unless its input asks for one."""
    extra = {"heads_path": str(heads_dir), "num_aux_heads": 3, "per_device_train_batch_size": 4, **ONE_SGD_STEP}
    if phase == "finetune":
        extra.update(finetune="full", beta=0.5, schedule="constant")
    plain = one_step(make(rows, tmp_path / "plain", phase=phase, **extra))
    checkpointed = make(
        rows,
        tmp_path / "ckpt",
        phase=phase,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
        **extra,
    )
    assert_same_step(one_step(checkpointed), plain)
    assert checkpointed.model.is_gradient_checkpointing


def test_packed_batch_without_position_ids_is_refused(rows, make, tmp_path):
    trainer = make(rows, tmp_path, phase="finetune", finetune="full", beta=0.0, packing=True, max_length=4096)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    batch.pop("position_ids")
    with pytest.raises(ValueError, match="without position_ids: head targets could cross document boundaries"):
        trainer.compute_loss(trainer.model, batch)


# ------------------------------------------------------------------------------------ schedule and resume


def test_schedule_logged_at_first_and_last_step(rows, make, heads_dir, tmp_path):
    trainer = make(
        rows,
        tmp_path,
        phase="finetune",
        finetune="full",
        heads_path=str(heads_dir),
        num_aux_heads=3,
        max_steps=3,
        logging_steps=1,
        per_device_train_batch_size=2,
    )
    trainer.train()
    weights = [h["concept_heads/weight"] for h in trainer.state.log_history if "concept_heads/weight" in h]
    # tau = global_step / max_steps = 0, 1/3, 2/3 during steps 1, 2, 3; gamma = sin((1 - tau) pi / 2)
    expected = [0.01 * math.sin((1 - s / 3) * math.pi / 2) for s in range(3)]
    assert weights == pytest.approx(expected, abs=1e-9) and weights[0] == 0.01


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("phase", ["heads", "finetune"])
def test_killed_and_resumed_run_ends_with_the_same_weights(rows, make, heads_dir, tmp_path, phase):
    extra = {
        "heads_path": str(heads_dir),
        "num_aux_heads": 3,
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "save_strategy": "steps",
        "save_steps": 2,
        "learning_rate": 1e-2,
        "train_sampling_strategy": "sequential",
    }
    if phase == "finetune":
        extra["finetune"] = "full"
    straight = make(rows, tmp_path / "straight", phase=phase, **extra)
    straight.train()
    killed = make(rows, tmp_path / "killed", phase=phase, **extra)
    killed.add_callback(StopAt(2))
    killed.train()
    assert killed.state.global_step == 2
    checkpoint = tmp_path / "killed" / "checkpoint-2"
    if phase == "heads":
        assert sorted(p.name for p in checkpoint.iterdir() if p.suffix == ".safetensors") == []  # heads only
        assert (checkpoint / "heads" / "heads.safetensors").exists()
    else:
        assert not any("concept_heads" in k for k in load_file(str(checkpoint / "model.safetensors")))
    resumed = make(rows, tmp_path / "resumed", phase=phase, **extra)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = snapshot(straight.model), snapshot(resumed.model)
    moved = snapshot(make(rows, tmp_path / "fresh", phase=phase, **extra).model)
    assert any(not torch.equal(a[n], moved[n]) for n in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)


# --------------------------------------------------------------------------------------- short sequences


def test_sequences_too_short_for_some_heads_are_counted_and_warned(tiny_tokenizer, make, tmp_path, caplog):
    """Rows of 3 tokens ([<s>], answer token, EOS): heads 2 and 3 never have a target; no crash, counts 0, and a
    warning at the end of the epoch."""
    eos = tiny_tokenizer.eos_token_id
    data = Dataset.from_list(
        [
            {
                "prompt": "<s>",
                "completion": tiny_tokenizer.decode([t]),
                "prompt_ids": [1],
                "completion_ids": [t, eos],
                "finish_reason": "eos",
            }
            for t in (40, 50, 60, 70)
        ]
    )
    trainer = make(
        data,
        tmp_path,
        phase="heads",
        num_aux_heads=3,
        num_train_epochs=1,
        per_device_train_batch_size=4,
        logging_steps=1,
    )
    with caplog.at_level(logging.WARNING, logger="tokentrain.trainers.concept_heads"):
        trainer.train()
    logged = trainer.state.log_history[0]
    assert (
        logged["concept_heads/count_1"] == 4
        and logged["concept_heads/count_2"] == 0
        and logged["concept_heads/count_3"] == 0
    )
    assert "concept_heads/ce_2" not in logged and math.isfinite(logged["loss"])
    assert "heads [2, 3] had no valid target" in caplog.text


def test_evaluate_reports_next_token_nll_and_head_metrics(rows, make, heads_dir, tmp_path):
    trainer = make(rows, tmp_path, phase="finetune", finetune="full", heads_path=str(heads_dir), num_aux_heads=3)
    metrics = trainer.evaluate(rows.select(range(4)))
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_concept_heads/ce_0"], rel=1e-6)
    assert "eval_concept_heads/ce_3" in metrics


# ------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "config, match",
    [
        ({"phase": "pretrain"}, r"phase must be one of \['heads', 'finetune'\], got 'pretrain'"),
        ({"phase": "heads", "num_aux_heads": 0}, "num_aux_heads must be an integer >= 1, got 0"),
        ({"phase": "heads", "num_aux_heads": 2.5}, "num_aux_heads must be an integer >= 1, got 2.5"),
        ({"phase": "heads", "head_type": "mlp"}, r"head_type must be one of \['decoder_layer', 'resblock'\]"),
        (
            {"phase": "finetune", "beta": 0, "schedule": "rsine"},
            r"schedule must be one of \['sine_decay', 'constant'\]",
        ),
        (
            {"phase": "finetune", "beta": 0, "finetune": "qlora"},
            r"finetune must be one of \['lora', 'full'\], got 'qlora'",
        ),
        ({"phase": "heads", "alpha": 0.0}, r"alpha must be in \(0, 1\]"),
        ({"phase": "heads", "alpha": 1.2}, r"alpha must be in \(0, 1\]"),
        ({"phase": "finetune", "beta": -0.1}, "beta must be a finite number >= 0"),
        ({"phase": "finetune"}, "phase finetune with beta > 0 needs heads_path"),
        ({"phase": "heads", "finetune": "lora"}, "LoRA is refused in phase heads"),
        ({"phase": "finetune", "beta": 0, "train_heads": True}, "train_heads with beta 0"),
    ],
)
def test_config_errors(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        ConceptHeadsConfig(output_dir=str(tmp_path), **config_kwargs(**config))


def test_lora_peft_config_in_phase_heads_is_refused(rows, tiny_model_factory, tiny_tokenizer, tmp_path):
    from peft import LoraConfig

    args = ConceptHeadsConfig(output_dir=str(tmp_path), phase="heads", **config_kwargs())
    with pytest.raises(ValueError, match="LoRA is refused in phase heads"):
        ConceptHeadsTrainer(
            tiny_model_factory(0),
            args,
            train_dataset=rows,
            processing_class=tiny_tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
        )


@pytest.mark.parametrize(
    "targets, named",
    [
        (["q_proj", "lm_head"], "lm_head"),
        (["embed_tokens"], "model.embed_tokens"),
        (["concept_heads"], "concept_heads"),
        (r".*concept_heads.*q_proj", "concept_heads"),
    ],
)
def test_lora_targets_reaching_the_unembedding_or_heads_are_refused(
    rows, tiny_model_factory, tiny_tokenizer, heads_dir, tmp_path, targets, named
):
    from peft import LoraConfig

    args = ConceptHeadsConfig(
        output_dir=str(tmp_path), phase="finetune", heads_path=str(heads_dir), num_aux_heads=3, **config_kwargs()
    )
    with pytest.raises(ValueError, match=rf"LoRA target_modules .* match \[.*'{named}'.*\]"):
        ConceptHeadsTrainer(
            tiny_model_factory(0),
            args,
            train_dataset=rows,
            processing_class=tiny_tokenizer,
            peft_config=LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"),
        )


def test_sine_decay_needs_max_steps_with_an_iterable_dataset(
    rows, tiny_model_factory, tiny_tokenizer, heads_dir, tmp_path
):
    stream = IterableDataset.from_generator(lambda: iter(rows))
    args = ConceptHeadsConfig(
        output_dir=str(tmp_path), phase="finetune", heads_path=str(heads_dir), num_aux_heads=3, **config_kwargs()
    )
    with pytest.raises(ValueError, match="schedule 'sine_decay' needs the run's length: .* set max_steps"):
        ConceptHeadsTrainer(tiny_model_factory(0), args, train_dataset=stream, processing_class=tiny_tokenizer)


def test_heads_saved_for_another_model_are_named_by_the_trainer(rows, make, heads_dir, tmp_path, tiny_tokenizer):
    from tokentrain.models import tiny_llama

    other = tiny_llama(tiny_tokenizer, hidden_size=48, num_layers=2, num_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match="saved for another model: hidden_size is 32 there but 48 here"):
        make(rows, tmp_path, model=other, phase="finetune", heads_path=str(heads_dir), num_aux_heads=3)
    with pytest.raises(ValueError, match="saved with num_aux_heads 3 but this run asks for 4"):
        make(rows, tmp_path, phase="finetune", heads_path=str(heads_dir), num_aux_heads=4)
    with pytest.raises(FileNotFoundError, match="concept_heads.json missing"):
        make(rows, tmp_path, phase="finetune", heads_path=str(tmp_path), num_aux_heads=3)


def test_a_peft_model_is_refused(rows, tiny_model_factory, tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(tiny_model_factory(0), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    args = ConceptHeadsConfig(output_dir=str(tmp_path), phase="finetune", beta=0.0, **config_kwargs())
    with pytest.raises(ValueError, match="pass the base model, not a PEFT model"):
        ConceptHeadsTrainer(peft, args, train_dataset=rows, processing_class=tiny_tokenizer)


def test_generated_rows_with_another_tokenisation_are_refused(generated, make, tmp_path, tiny_model_factory):
    bad = generated.map(
        lambda r, i: {"prompt_ids": r["prompt_ids"][:3] + [5] + r["prompt_ids"][4:]} if i == 2 else {},
        with_indices=True,
    )
    model = tiny_model_factory(0)
    with pytest.raises(
        ValueError, match="row 2: stored 'prompt_ids' differ from this trainer's tokenisation of `prompt` at position 3"
    ):
        make(bad, tmp_path, model=model, phase="heads", num_aux_heads=3)
    assert "concept_heads" not in model._modules  # the caller's model is left as it was


def test_lora_with_peft_default_targets(rows, tiny_model_factory, tiny_tokenizer, heads_dir, tmp_path):
    """The train stage's default `lora_target_modules: null` (PEFT's per-architecture default, q_proj and v_proj for
    Llama): the heads' own q_proj / v_proj are excluded, the base's adapted."""
    from peft import LoraConfig

    args = ConceptHeadsConfig(
        output_dir=str(tmp_path), phase="finetune", heads_path=str(heads_dir), num_aux_heads=3, **config_kwargs()
    )
    trainer = ConceptHeadsTrainer(
        tiny_model_factory(0),
        args,
        train_dataset=rows,
        processing_class=tiny_tokenizer,
        peft_config=LoraConfig(r=4, task_type="CAUSAL_LM"),
    )
    lora = [n for n, _ in trainer.model.named_parameters() if "lora_A" in n]
    assert lora and not any("concept_heads" in n for n in lora)
    assert {n.split(".")[-4] for n in lora} == {"q_proj", "v_proj"}
