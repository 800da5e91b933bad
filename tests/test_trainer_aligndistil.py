"""Tests of tokentrain/trainers/aligndistil.py: data split, positions, parity with a full-logits reference, global
normalisation, memory, on-policy sampling, and the bad inputs of specs/aligndistil.md section 9.

Spec properties 4 (offset), 5 (TRL's DPO split; the reverse stage's chosen_ids = the forward's rejected_ids), 6
(batch 4 × GA 1 = batch 1 × GA 4 = 2 processes × batch 2; padding), 8 (sampling settings), the no-[B, T, V] rule, and
the real-data smoke of section 7 (slow; skipped without ../shared/data/preference). Three tiny Llamas (seeds 0, 1, 2)
play the student, the DPO model and the other model.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GenerationMixin
from trl import DPOConfig, DPOTrainer

from tokentrain.losses.aligndistil import naive_aligndistil_loss
from tokentrain.models import causal_lm, tiny_llama, train_tokenizer
from tokentrain.trainers.aligndistil import AlignDistilCollator, AlignDistilConfig, AlignDistilTrainer

ATOL = 1e-6
REPO = Path(__file__).resolve().parents[1]
PREFERENCE = REPO.parent / "shared" / "data" / "preference" / "orca_dpo_pairs.jsonl.gz"
pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"prompt": "Q: 12+7=", "chosen": " 19", "rejected": " 18 or so"},
    {"prompt": "Q: 3+4=", "chosen": " 7 because 3 and 4 make 7", "rejected": " 8"},
    {"prompt": "Q: 40+2 is what?=", "chosen": " 42", "rejected": " 41 since 40 and 1"},
    {"prompt": "Q: 5+5=", "chosen": " 10 so", "rejected": " 11 so"},
    {"prompt": "Q: 100+23=", "chosen": " 123 exactly", "rejected": " 132"},
]
CHAT_ROWS = [
    {
        "prompt": [{"role": "user", "content": "Q: 12+7="}],
        "chosen": [{"role": "assistant", "content": "19"}],
        "rejected": [{"role": "assistant", "content": "18 or so"}],
    },
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 3+4="}],
        "chosen": [{"role": "assistant", "content": "7 because 3 and 4 make 7"}],
        "rejected": [{"role": "assistant", "content": "8"}],
    },
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS] * 4 + ["user assistant system Be brief."]
    tok = train_tokenizer(texts, vocab_size=300)

    def make(seed):
        return tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=seed)

    out = str(tmp_path_factory.mktemp("aligndistil"))
    return SimpleNamespace(tok=tok, student=make(0), dpo=make(1), other=make(2), make=make, out=out)


def base_kwargs(**kwargs):
    return {
        "bf16": False,
        "report_to": "none",
        "max_length": None,
        "per_device_train_batch_size": 4,
        "disable_tqdm": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "gradient_checkpointing": False,
        **kwargs,
    }


def make_trainer(env, rows=ROWS, dpo=None, other=None, student=None, **config):
    args = AlignDistilConfig(output_dir=env.out, **base_kwargs(**config))
    return AlignDistilTrainer(
        copy.deepcopy(student or env.student),
        args,
        train_dataset=Dataset.from_list(rows),
        processing_class=env.tok,
        dpo_model=dpo if dpo is not None else env.dpo,
        other_model=other if other is not None else env.other,
    )


def batch_of(trainer, idx=(0, 1, 2, 3)):
    return trainer.data_collator([trainer.train_dataset[i] for i in idx])


def loss_and_grads(trainer, batch, num_items=None):
    model = trainer.model
    model.train()
    model.zero_grad()
    if num_items is None:
        num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, atol=ATOL):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=0, msg=name)


# --------------------------------------------------------------------------- property 5: TRL's DPO split


def trl_split(env, rows):
    return DPOTrainer(
        copy.deepcopy(env.student),
        ref_model=copy.deepcopy(env.dpo),
        args=DPOConfig(output_dir=env.out, **base_kwargs()),
        train_dataset=Dataset.from_list(rows),
        processing_class=env.tok,
    ).train_dataset


@pytest.mark.parametrize("rows", [ROWS, CHAT_ROWS], ids=["standard", "conversational"])
def test_rows_are_trl_dpo_prompt_plus_chosen(env, rows):
    split = trl_split(env, rows)
    trainer = make_trainer(env, rows)
    data = trainer.train_dataset
    assert data["row_index"] == list(range(len(rows)))
    for i in range(len(rows)):
        prompt, chosen = split[i]["prompt_ids"], split[i]["chosen_ids"]
        assert data[i]["input_ids"] == prompt + chosen
        assert data[i]["labels"] == [-100] * len(prompt) + chosen
    if rows is ROWS:  # plain text: TRL appends EOS to chosen
        assert all(ids[-1] == env.tok.eos_token_id for ids in split["chosen_ids"])
    on_policy = make_trainer(env, [{"prompt": r["prompt"]} for r in rows], on_policy=True).train_dataset
    assert on_policy["input_ids"] == split["prompt_ids"]  # the prompts the samples continue


def test_reverse_stage_chosen_ids_are_forward_rejected_ids(env):
    """The reverse-DPO stage is TRL's DPO on rename_columns({chosen: rejected, rejected: chosen})."""
    forward = trl_split(env, ROWS)
    swapped = Dataset.from_list(ROWS).rename_columns({"chosen": "rejected", "rejected": "chosen"}).to_list()
    reverse = trl_split(env, swapped)
    assert reverse["chosen_ids"] == forward["rejected_ids"]
    assert reverse["rejected_ids"] == forward["chosen_ids"]
    assert reverse["prompt_ids"] == forward["prompt_ids"]


# ------------------------------------------------------------------------------------ property 4: the offset


def test_positions_are_p_minus_1_to_p_plus_t_minus_2(env):
    """ids [p0 p1 p2 y1 y2 EOS pad], P = 3, T = 3: the hidden states at {2, 3, 4} are used, garbage at 5 and 6 changes
    nothing, and garbage at 2 does (for every one of the three models)."""
    trainer = make_trainer(env)
    ids = [5, 6, 7, 8, 9, env.tok.eos_token_id]
    row = {"input_ids": ids, "labels": [-100] * 3 + ids[3:], "row_index": 0}
    long_row = {"input_ids": ids + [10], "labels": [-100] * 3 + ids[3:] + [10], "row_index": 1}
    batch = trainer.data_collator([row, long_row])
    assert batch["input_ids"][0, 6] == env.tok.pad_token_id
    mask = batch["labels"][:, 1:] != -100
    assert mask[0].nonzero().flatten().tolist() == [2, 3, 4]
    reference = loss_and_grads(trainer, batch)

    def garbage_at(positions):
        def hook(_module, _args, output):
            hidden = output.last_hidden_state.clone()
            hidden[0, positions] = 1e4 * torch.randn(len(positions), hidden.shape[-1])
            output.last_hidden_state = hidden
            return output

        return hook

    for model in (trainer.model, trainer.dpo_model, trainer.other_model):
        handle = causal_lm(model).base_model.register_forward_hook(garbage_at([5, 6]))
        try:
            assert_same(loss_and_grads(trainer, batch), reference)
        finally:
            handle.remove()
        handle = causal_lm(model).base_model.register_forward_hook(garbage_at([2]))
        try:
            assert not torch.allclose(loss_and_grads(trainer, batch)[0], reference[0], atol=1e-4)
        finally:
            handle.remove()


# ------------------------------------------------------------------ parity with the full-logits reference


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"distance": "l1", "r": 10.0, "chunk_tokens": 1},
        {"alpha": "constant", "ratio": 2.0, "chunk_tokens": 7},
        {"teacher": "dpo_ref", "alpha": "constant", "ratio": 2.0, "chunk_tokens": 5},
    ],
    ids=["default", "l1", "constant", "dpo_ref"],
)
def test_trainer_loss_equals_naive_full_logits(env, config):
    trainer = make_trainer(env, **config)
    batch = batch_of(trainer)
    ours = loss_and_grads(trainer, batch)
    model = trainer.model
    model.zero_grad()
    mask = batch["labels"][:, 1:] != -100  # (B, T-1)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        z_d, z_o = (m(**kwargs).logits[:, :-1].double() for m in (trainer.dpo_model, trainer.other_model))
    z_s = model(**kwargs).logits[:, :-1].double()  # (B, T-1, V): the full logits tokentrain never builds
    loss, _ = naive_aligndistil_loss(z_s, z_d, z_o, mask, 4, trainer.args.teacher_settings())
    loss.backward()
    naive = (loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert_same(ours, naive)
    metrics = trainer._metrics["train"]
    assert metrics["aligndistil/response_len"] == [pytest.approx(mask.sum().item() / 4)]
    for key in ("kl", "alpha_mean", "distance_mean", "beta_t_mean", "beta_t_max", "kl_dpo", "kl_other"):
        assert math.isfinite(metrics[f"aligndistil/{key}"][0]), key
    if config.get("alpha") == "constant":
        assert metrics["aligndistil/alpha_mean"] == [pytest.approx(config["ratio"])]


def test_lora_student_equals_naive_full_logits(env):
    from peft import LoraConfig

    args = AlignDistilConfig(output_dir=env.out, **base_kwargs())
    trainer = AlignDistilTrainer(
        copy.deepcopy(env.student), args, train_dataset=Dataset.from_list(ROWS), processing_class=env.tok,
        dpo_model=env.dpo, other_model=env.other,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"),
    )  # fmt: skip
    batch = batch_of(trainer)
    loss, grads = loss_and_grads(trainer, batch)
    assert grads and all("lora_" in name for name in grads)
    mask = batch["labels"][:, 1:] != -100
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        z_s = trainer.model(**kwargs).logits[:, :-1].double()  # the adapter is active
        z_d, z_o = (m(**kwargs).logits[:, :-1].double() for m in (env.dpo, env.other))
        plain = env.student(**kwargs).logits[:, :-1].double()
    settings = trainer.args.teacher_settings()
    naive, _ = naive_aligndistil_loss(z_s, z_d, z_o, mask, 4, settings)
    torch.testing.assert_close(loss, naive.float(), atol=ATOL, rtol=0)
    without_adapter, _ = naive_aligndistil_loss(plain, z_d, z_o, mask, 4, settings)
    assert abs(without_adapter.item() - naive.item()) > 1e-5  # the adapter changed the student


# ------------------------------------------------------------------ property 6: reduction, padding, accumulation


def test_extra_right_padding_changes_nothing(env):
    trainer = make_trainer(env)
    batch = batch_of(trainer)
    extra = 9
    padded = {
        "input_ids": torch.nn.functional.pad(batch["input_ids"], (0, extra), value=env.tok.pad_token_id),
        "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0),
        "labels": torch.nn.functional.pad(batch["labels"], (0, extra), value=-100),
        "row_index": batch["row_index"],
    }
    assert_same(loss_and_grads(trainer, batch), loss_and_grads(trainer, padded))


def test_normaliser_is_global_sequence_count(env):
    trainer = make_trainer(env)
    a, b = batch_of(trainer, [0, 1]), batch_of(trainer, [2])
    assert trainer._get_num_items_in_batch([a, b], torch.device("cpu")).item() == 3
    # split micro-batches with the step's count S = 3 sum to the whole batch's loss
    whole = loss_and_grads(trainer, batch_of(trainer, [0, 1, 2]))
    la, ga = loss_and_grads(trainer, a, num_items=torch.tensor(3))
    lb, gb = loss_and_grads(trainer, b, num_items=torch.tensor(3))
    assert_same(whole, (la + lb, {n: ga[n] + gb[n] for n in ga}))


ONE_STEP = {
    "max_steps": 1,
    "optim": "sgd",
    "learning_rate": 0.5,
    "lr_scheduler_type": "constant",
    "max_grad_norm": 0.0,
    "train_sampling_strategy": "sequential",
}


def one_step(env, batch_size, accumulation):
    trainer = make_trainer(
        env, ROWS[:4], per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, **ONE_STEP
    )
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_batch4_ga1_equals_batch1_ga4(env):
    start = dict(env.student.named_parameters())
    big, small = one_step(env, 4, 1), one_step(env, 1, 4)
    assert any(not torch.equal(big[n], start[n]) for n in big)
    for name in big:
        torch.testing.assert_close(big[name], small[name], atol=ATOL, rtol=0, msg=name)


WORKER = """
import json, sys
import torch
from datasets import load_from_disk
from transformers import AutoTokenizer, LlamaForCausalLM
from tokentrain.runtime import exit_process
from tokentrain.trainers.aligndistil import AlignDistilConfig, AlignDistilTrainer

folder = sys.argv[1]
kwargs = json.loads(open(f"{folder}/kwargs.json").read())
args = AlignDistilConfig(output_dir=f"{folder}/out", dpo_model=f"{folder}/dpo", reverse_model=f"{folder}/other", **kwargs)
trainer = AlignDistilTrainer(
    LlamaForCausalLM.from_pretrained(f"{folder}/student"),
    args,
    train_dataset=load_from_disk(f"{folder}/data"),
    processing_class=AutoTokenizer.from_pretrained(f"{folder}/student"),
)
assert trainer.accelerator.num_processes == 2
trainer.train()
if trainer.accelerator.is_main_process:
    torch.save({n: p.detach() for n, p in trainer.model.named_parameters()}, f"{folder}/after.pt")
exit_process(0)  # a gloo rank can abort at interpreter exit after its work is done: see its docstring
"""


@pytest.mark.slow
def test_two_processes_batch2_equal_batch4(env, tmp_path):
    """2 CPU processes × batch 2 (gloo) = batch 4 × GA 1; the frozen models load from their folders (paths)."""
    candidates = [
        REPO / "accelerate_configs" / "cpu.yaml",
        REPO / "tokentrain" / "shipped" / "accelerate_configs" / "cpu.yaml",
    ]
    config = next((c for c in candidates if c.exists()), None)
    if config is None:
        pytest.skip(f"no cpu.yaml in {[str(c) for c in candidates]}")
    for name, model in (("student", env.student), ("dpo", env.dpo), ("other", env.other)):
        model.save_pretrained(tmp_path / name)
        env.tok.save_pretrained(tmp_path / name)
    Dataset.from_list(ROWS[:4]).save_to_disk(str(tmp_path / "data"))
    (tmp_path / "kwargs.json").write_text(json.dumps(base_kwargs(per_device_train_batch_size=2, **ONE_STEP)))
    (tmp_path / "worker.py").write_text(WORKER)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    environ.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    proc = subprocess.run(
        [*cmd, str(tmp_path / "worker.py"), str(tmp_path)], env=environ, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_processes = torch.load(tmp_path / "after.pt")
    one_process = one_step(env, 4, 1)
    for name in one_process:
        torch.testing.assert_close(two_processes[name], one_process[name], atol=ATOL, rtol=0, msg=name)


# ----------------------------------------------------------------------------------- memory: no [B, T, V]


def test_no_vocabulary_sized_tensor_beyond_one_chunk_in_a_training_step(env):
    """Every tensor created in a whole training step (three backbones, the loss, the backward, the optimizer) is
    checked: none with a vocabulary-sized dimension has more than chunk_tokens × V elements, except the (V, H)
    embedding/head weights, their gradients and views."""
    chunk = 3
    trainer = make_trainer(env, chunk_tokens=chunk, max_steps=1, optim="sgd")
    v = trainer.model.get_output_embeddings().weight.shape[0]
    h = trainer.model.config.hidden_size
    batch = batch_of(trainer)
    n_positions = int((batch["labels"][:, 1:] != -100).sum())
    assert n_positions > 4 * chunk  # a (N, V) or (B, T, V) tensor would be caught

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.shapes.append(tuple(o.shape))
            return out

    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    with Shapes() as mode:
        trainer.training_step(trainer.model, batch, num_items_in_batch=torch.tensor(4))
        trainer.optimizer.step()
    vocab_sized = [s for s in mode.shapes if v in s and s not in ((v, h), (h, v))]
    assert vocab_sized, "the heads never ran?"
    assert max(torch.Size(s).numel() for s in vocab_sized) == chunk * v, sorted(set(vocab_sized))[-5:]


# ------------------------------------------------------------------------------------------------- on-policy


def test_on_policy_sampling_settings_are_explicit(env, monkeypatch):
    """Property 8: the generation config actually used has top_k 0, temperature 1, top_p 1, no repetition penalty,
    sampling on and the configured length, although the student's generation_config says otherwise."""
    student = copy.deepcopy(env.student)
    student.generation_config.update(top_k=7, temperature=0.3, top_p=0.5, repetition_penalty=1.3, do_sample=False)
    trainer = make_trainer(env, student=student, on_policy=True, max_new_tokens=3)
    used = []
    original = GenerationMixin._prepare_generation_config

    def spy(self, generation_config, **kwargs):
        config, model_kwargs = original(self, generation_config, **kwargs)
        used.append(config)
        return config, model_kwargs

    monkeypatch.setattr(GenerationMixin, "_prepare_generation_config", spy)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch_of(trainer), num_items_in_batch=torch.tensor(4))
    assert math.isfinite(loss.item())
    (config,) = used
    assert (config.top_k, config.temperature, config.top_p, config.repetition_penalty) == (0, 1.0, 1.0, 1.0)
    assert config.do_sample is True and config.max_new_tokens == 3
    assert trainer.model.training  # back in train mode after sampling
    metrics = trainer._metrics["train"]
    assert 1 <= metrics["aligndistil/gen_len"][0] <= 3 and 0 <= metrics["aligndistil/truncated_frac"][0] <= 1


def test_rollout_cuts_after_first_eos_and_recollates_right_padded(env, monkeypatch):
    trainer = make_trainer(env, on_policy=True, max_new_tokens=4)
    eos, pad = env.tok.eos_token_id, env.tok.pad_token_id
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 2)])  # left-padded prompts
    prompts, width = batch["input_ids"], batch["input_ids"].shape[1]
    samples = torch.tensor([[20, eos, 21, 22], [30, 31, 32, 33]])  # row 0 stops, row 1 is truncated

    def fake_generate(input_ids, attention_mask, **kwargs):
        assert torch.equal(input_ids, prompts)
        return torch.cat([input_ids, samples], dim=1)

    monkeypatch.setattr(trainer.model, "generate", fake_generate)
    out = trainer._rollout(trainer.model, batch)
    p0 = trainer.train_dataset[0]["input_ids"]
    p2 = trainer.train_dataset[2]["input_ids"]
    assert out["input_ids"][0].tolist()[: len(p0) + 2] == p0 + [20, eos]
    assert out["input_ids"][1].tolist()[: len(p2) + 4] == p2 + [30, 31, 32, 33]
    assert out["labels"][0].tolist()[: len(p0) + 2] == [-100] * len(p0) + [20, eos]
    assert set(out["input_ids"][0].tolist()[len(p0) + 2 :]) <= {pad}  # right padding after the cut
    assert out["_truncated"].item() == 1.0 and out["row_index"].tolist() == [0, 2]
    assert width == max(len(p0), len(p2))


def test_on_policy_train_and_prompt_filter(env, caplog):
    limit = max(len(env.tok(r["prompt"])["input_ids"]) for r in ROWS)
    long_prompt = {"prompt": "Q: " + "1+1+" * 12 + "=", "chosen": " 2"}
    assert len(env.tok(long_prompt["prompt"])["input_ids"]) > limit
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(
            env, [*ROWS, long_prompt], on_policy=True, max_new_tokens=4, max_prompt_length=limit, max_steps=2
        )
    assert len(trainer.train_dataset) == len(ROWS)
    assert f"1 of 6 prompts have more than max_prompt_length={limit}" in caplog.text
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


# ---------------------------------------------------------------------------------- a short run, evaluation


def test_short_run_logs_finite_metrics_and_evaluates(env):
    trainer = make_trainer(env, per_device_train_batch_size=2, max_steps=2, logging_strategy="steps", logging_steps=1)
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("kl", "alpha_mean", "distance_mean", "beta_t_mean", "beta_t_max", "kl_dpo", "kl_other"):
        assert math.isfinite(logged[f"aligndistil/{key}"]), key
    assert 0.001 <= logged["aligndistil/alpha_mean"] <= 20.001
    metrics = trainer.evaluate(Dataset.from_list(ROWS[:3]))
    assert math.isfinite(metrics["eval_loss"])


# --------------------------------------------------------------------------------------- bad inputs (section 9)


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"ratio": 2.0}, "ratio has no effect with alpha 'adaptive'"),
        ({"alpha": "constant", "r": 5.0}, "r has no effect with alpha 'constant'"),
        ({"alpha": "constant", "eps": 0.01, "r": 3.0}, "r/eps has no effect with alpha 'constant'"),
        ({"reference_model": "x"}, "reference_model has no effect with teacher 'contrastive'"),
        ({"teacher": "dpo_ref", "alpha": "constant", "reverse_model": "x"}, "reverse_model has no effect"),
        ({"teacher": "dpo_ref"}, "'dpo_ref' takes alpha 'constant' only"),
        ({"r": float("nan")}, "r must be finite and > 0"),
        ({"eps": -1.0}, "eps must be finite and > 0"),
        ({"alpha": "constant", "ratio": float("inf")}, "ratio must be finite and > 0"),
        ({"beta0": 0.0}, "beta0 must be finite and > 0"),
        ({"distance": "kl"}, "distance must be one of"),
        ({"teacher": "theorem1_adaptive"}, "teacher must be one of"),
        ({"max_new_tokens": 16}, "max_new_tokens has no effect off-policy"),
        ({"on_policy": True, "max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"chunk_tokens": 0}, "chunk_tokens must be an integer >= 1"),
        ({"packing": True}, "packing/padding_free must be off"),
        ({"assistant_only_loss": True}, "assistant_only_loss has no effect"),
    ],
)
def test_config_refuses(env, config, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        AlignDistilConfig(output_dir=env.out, **base_kwargs(**config))


def test_missing_models_name_the_key(env):
    args = AlignDistilConfig(output_dir=env.out, **base_kwargs(dpo_model=None))
    with pytest.raises(ValueError, match="dpo_model is required"):
        AlignDistilTrainer(
            copy.deepcopy(env.student), args, train_dataset=Dataset.from_list(ROWS), processing_class=env.tok
        )
    args = AlignDistilConfig(output_dir=env.out, **base_kwargs(teacher="dpo_ref", alpha="constant"))
    with pytest.raises(ValueError, match="reference_model is required with teacher 'dpo_ref'"):
        AlignDistilTrainer(
            copy.deepcopy(env.student), args, train_dataset=Dataset.from_list(ROWS), processing_class=env.tok,
            dpo_model=env.dpo,
        )  # fmt: skip


def test_tokenizer_mismatch_names_both_models_and_first_token(env, tmp_path):
    other_tok = train_tokenizer(["completely different words here, zebra xylophone"] * 3, vocab_size=300)
    folder = tmp_path / "foreign_dpo"
    env.dpo.save_pretrained(folder)
    other_tok.save_pretrained(folder)
    args = AlignDistilConfig(output_dir=env.out, **base_kwargs(dpo_model=str(folder)))
    with pytest.raises(ValueError, match="tokenizer mismatch") as err:
        AlignDistilTrainer(
            copy.deepcopy(env.student), args, train_dataset=Dataset.from_list(ROWS), processing_class=env.tok,
            other_model=env.other,
        )  # fmt: skip
    message = str(err.value)
    assert "the student" in message and f"dpo_model ({folder})" in message and "first differing id" in message


def test_head_rows_mismatch_names_both_models(env):
    wide = copy.deepcopy(env.other)
    wide.resize_token_embeddings(310)  # tied: the head grows too
    n = env.student.get_output_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match=rf"LM-head rows differ: the student .* has {n} and reverse_model .* has 310"):
        make_trainer(env, other=wide)


@pytest.mark.parametrize(
    "key, value", [("final_logit_softcapping", 30.0), ("logit_scale", 2.0), ("lm_head_multiplier", 0.5)]
)
def test_logit_transforms_refused(env, key, value):
    dpo = copy.deepcopy(env.dpo)
    setattr(dpo.config, key, value)
    with pytest.raises(
        ValueError, match=r"dpo_model .* declares a logit transform " + re.escape(f"{{'{key}': {value}}}")
    ):
        make_trainer(env, dpo=dpo)


def test_same_dpo_and_other_weights_warn(env):
    with pytest.warns(UserWarning, match="same weights: the contrast is zero.*weight β0/α = 100"):
        make_trainer(env, other=copy.deepcopy(env.dpo))


def test_beta0_differing_from_dpo_stage_beta_warns(env, tmp_path):
    folder = tmp_path / "dpo"
    env.dpo.save_pretrained(folder)
    env.tok.save_pretrained(folder)
    torch.save(SimpleNamespace(beta=0.2), folder / "training_args.bin")  # what TRL's Trainer saves, reduced
    args = AlignDistilConfig(output_dir=env.out, **base_kwargs(dpo_model=str(folder)))
    with pytest.warns(UserWarning, match="beta0 is 0.1 but dpo_model .* was trained with beta 0.2"):
        AlignDistilTrainer(
            copy.deepcopy(env.student), args, train_dataset=Dataset.from_list(ROWS), processing_class=env.tok,
            other_model=env.other,
        )  # fmt: skip


def test_empty_and_fully_truncated_responses_are_counted_and_dropped(env, caplog):
    rows = [*ROWS, {"prompt": "Q: 1+1=", "chosen": "", "rejected": " 3"}]
    long_prompt = {"prompt": "Q: " + "9+9+" * 20 + "=", "chosen": " 2", "rejected": " 3"}
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(env, [*rows, long_prompt], max_length=24)
    assert trainer.train_dataset["row_index"] == [0, 1, 2, 3, 4]
    assert "2 of 7 rows have an empty or fully truncated chosen response" in caplog.text
    assert "first: [5, 6]" in caplog.text


def test_empty_prompt_is_an_error_naming_the_rows(env):
    with pytest.raises(ValueError, match=r"train rows \[1\] have no prompt token"):
        make_trainer(env, [ROWS[0], {"prompt": "", "chosen": "x y", "rejected": "z"}])


def test_batch_row_without_response_position_is_an_error(env):
    trainer = make_trainer(env)
    batch = batch_of(trainer)
    batch["labels"][2] = -100
    with pytest.raises(ValueError, match=r"rows \[2\] of this batch have no response position"):
        trainer.compute_loss(trainer.model, batch)


def test_non_finite_teacher_logits_name_step_row_and_position(env):
    trainer = make_trainer(env)
    batch = batch_of(trainer, [3, 1])

    def hook(_module, _args, output):
        output.last_hidden_state[1, 9] = float("nan")  # batch row 1 (dataset row 1), context ending at 9
        return output

    handle = causal_lm(trainer.other_model).base_model.register_forward_hook(hook)
    try:
        with pytest.raises(ValueError, match=r"reverse_model .* at step 0, row 1 \(batch row 1\), position 9") as err:
            trainer.compute_loss(trainer.model, batch)
    finally:
        handle.remove()
    prompt_len = trainer.train_dataset[1]["labels"].count(-100)
    assert f"response token {9 - prompt_len + 1}" in str(err.value)


def test_missing_columns_are_named(env):
    with pytest.raises(KeyError, match=r"lacks column\(s\) \['chosen'\]"):
        make_trainer(env, [{"prompt": r["prompt"]} for r in ROWS])
    with pytest.raises(KeyError, match=r"lacks column\(s\) \['prompt'\]"):
        make_trainer(env, [{"question": r["prompt"]} for r in ROWS], on_policy=True)


def test_collator_pads_right_off_policy_and_left_on_policy():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, -100, 7], "row_index": 3},
        {"input_ids": [8], "labels": [8], "row_index": 4},
    ]
    right = AlignDistilCollator(pad_token_id=0)(rows)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, -100, 7], [8, -100, -100]]
    left = AlignDistilCollator(pad_token_id=0, on_policy=True)(rows)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and left["attention_mask"].tolist()[1] == [0, 0, 1]
    assert (left["labels"] == -100).all() and left["row_index"].tolist() == [3, 4]


# ------------------------------------------------------------------------------- real-data smoke (section 7)


@pytest.mark.slow
def test_real_data_smoke_orca_pairs(tmp_path):
    """SFT 20 steps, DPO and reverse DPO 10 each (TRL), AlignDistil 10 off-policy + 2 on-policy (16 new tokens) on
    ../shared/data/preference/orca_dpo_pairs.jsonl.gz with a tiny BPE trained in code; all metrics finite, α in
    range."""
    if not PREFERENCE.exists():
        pytest.skip(f"{PREFERENCE} is absent (the shared data folder is not mounted)")
    from trl import SFTConfig, SFTTrainer

    with gzip.open(PREFERENCE, "rt") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    assert len(raw) == 284
    rows = [
        {"prompt": r["input"]["messages"], "chosen": r["preferred_output"], "rejected": r["non_preferred_output"]}
        for r in raw
    ]
    texts = [m["content"] for r in rows for m in r["prompt"] + r["chosen"] + r["rejected"]]
    tok = train_tokenizer(texts + ["user assistant system"], vocab_size=512)
    common = {"bf16": False, "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "max_length": 512}
    common.update(per_device_train_batch_size=4, learning_rate=1e-3, gradient_checkpointing=False, logging_steps=1)
    model = tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=600)
    sft_rows = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    sft_args = SFTConfig(str(tmp_path / "sft"), max_steps=20, **common)
    SFTTrainer(model, args=sft_args, train_dataset=sft_rows, processing_class=tok).train()
    folders = {}
    for name, data in (
        ("dpo", rows),
        ("reverse", [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]),
    ):
        policy = copy.deepcopy(model)
        args = DPOConfig(str(tmp_path / name), max_steps=10, beta=0.1, **common)
        DPOTrainer(
            policy,
            ref_model=copy.deepcopy(model),
            args=args,
            train_dataset=Dataset.from_list(data),
            processing_class=tok,
        ).train()
        folders[name] = tmp_path / name / "model"
        policy.save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    for config in ({"max_steps": 10}, {"max_steps": 2, "on_policy": True, "max_new_tokens": 16}):
        args = AlignDistilConfig(
            str(tmp_path / "aligndistil"), dpo_model=str(folders["dpo"]), reverse_model=str(folders["reverse"]),
            **{**common, **config},
        )  # fmt: skip
        trainer = AlignDistilTrainer(copy.deepcopy(model), args, Dataset.from_list(rows), processing_class=tok)
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "aligndistil/kl" in entry]
        assert len(logs) == config["max_steps"]
        for entry in logs:
            assert all(math.isfinite(v) for v in entry.values()), entry
            assert 0.001 <= entry["aligndistil/alpha_mean"] <= 20.001
            assert entry["aligndistil/beta_t_max"] <= 100 * 0.1 + 1e-6


def test_dataclass_fields_have_help():
    for f in dataclasses.fields(AlignDistilConfig):
        if f.name in {"dpo_model", "reverse_model", "reference_model", "teacher", "alpha", "r", "eps", "ratio"}:
            assert f.metadata.get("help"), f.name
