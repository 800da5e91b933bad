"""Tests for tokentrain/trainers/critical_dpo.py: TRL parity, global normalisation, alignment, collation, reference.

Spec: specs/critical_dpo.md sections 2, 3, 6 (properties 1, 4, 5, 6, 8, 9) and 9. One tiny Llama (2 layers, hidden 32)
and one tokenizer per module; the stored ids come from TRL 1.16's own DPO preparation of the same rows.
"""

import copy
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

import tokentrain.trainers.critical_dpo as cdpo
from tokentrain.data import SignalAlignmentError
from tokentrain.losses.critical_dpo import REDUCTIONS
from tokentrain.models import tiny_llama, train_tokenizer
from tokentrain.trainers.critical_dpo import CriticalDPOCollator, CriticalDPOConfig, CriticalDPOTrainer

ATOL = 1e-6
LOG2 = math.log(2.0)
# Completions of different lengths on both sides, so pairs pad differently and columns hold real and pad tokens.
ROWS = [
    {"prompt": "Q: 12+7=", "chosen": " 19", "rejected": " 18 or so"},
    {"prompt": "Q: 3+4=", "chosen": " 7 because 3 and 4 make 7", "rejected": " 8"},
    {"prompt": "Q: 40+2 is what?=", "chosen": " 42", "rejected": " 41 since 40 and 1"},
    {"prompt": "Q: 5+5=", "chosen": " 10 so", "rejected": " 11 so"},
    {"prompt": "Q: 100+23=", "chosen": " 123 exactly", "rejected": " 132"},
    {"prompt": "Q: 8+1=", "chosen": " 9", "rejected": " 9 no wait 10 then 11"},
]
PAIRS = [0, 1, 2, 3]  # the batch most tests use


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.manual_seed(0)
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS] * 4
    tok = train_tokenizer(texts, vocab_size=300)
    policy = tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)
    ref = copy.deepcopy(policy)  # a reference that differs from the policy, so rewards are not all 0
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = str(tmp_path_factory.mktemp("critical_dpo"))
    # The stored ids exactly as TRL 1.16's DPO preparation splits the rows (what the score stage writes).
    trl_split = DPOTrainer(
        copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=DPOConfig(output_dir=out, **base_kwargs()),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tok,
    ).train_dataset
    g = torch.Generator().manual_seed(1)
    weights = {}
    for side in ("chosen", "rejected"):
        rows = []
        for ids in trl_split[f"{side}_ids"]:
            w = torch.rand(len(ids), generator=g)
            w[torch.rand(len(ids), generator=g) < 0.3] = 0.0  # some exact zeros
            rows.append(w.tolist())
        weights[side] = rows
    return dataclasses.make_dataclass("Env", ["tok", "policy", "ref", "out", "split", "weights"])(
        tok, policy, ref, out, trl_split, weights
    )


def base_kwargs(**kwargs):
    return {
        "bf16": False,
        "report_to": "none",
        "max_length": None,
        "per_device_train_batch_size": 4,
        "disable_tqdm": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        **kwargs,
    }


def scored(env, chosen=None, rejected=None, rows=ROWS):
    """Rows + stored ids + weights (None: column absent, 'ones': all 1, 'random': the fixture's weights)."""
    n = len(rows)
    data = {key: [r[key] for r in rows] for key in ("prompt", "chosen", "rejected")}
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):  # the split the score stage stores
        data[column] = env.split[column][:n]
    for side, kind in (("chosen", chosen), ("rejected", rejected)):
        if kind == "ones":
            data[f"{side}_weights"] = [[1.0] * len(ids) for ids in data[f"{side}_ids"]]
        elif kind == "random":
            data[f"{side}_weights"] = env.weights[side][:n]
    return Dataset.from_dict(data)


def make_trainer(env, dataset, ref=True, peft_config=None, **config):
    args = CriticalDPOConfig(output_dir=env.out, **base_kwargs(**config))
    return CriticalDPOTrainer(
        copy.deepcopy(env.policy),
        ref_model=copy.deepcopy(env.ref) if ref else None,
        args=args,
        train_dataset=dataset,
        processing_class=env.tok,
        peft_config=peft_config,
    )


def batch_of(trainer, idx=PAIRS):
    return trainer.data_collator([trainer.train_dataset[i] for i in idx])


def loss_and_grads(trainer, batch, ours=True):
    """One training micro-batch as Trainer runs it (GA 1, one process): the loss and every parameter's gradient."""
    model = trainer.model
    model.train()
    model.zero_grad()
    num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu")) if ours else None
    loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(loss_a, grads_a, loss_b, grads_b, atol=ATOL):
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=0, msg=name)


# ------------------------------------------------------------------------- property 1: parity with TRL's DPOTrainer


@pytest.mark.parametrize(
    "case, ours, theirs",
    [
        ("dpo", {"weighting": "none"}, {"loss_type": ["sigmoid"]}),
        ("ones", {"weighting": "rejected"}, {"loss_type": ["sigmoid"]}),
        ("rpo", {"weighting": "none", "rpo_alpha": 0.7}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]}),
    ],
)
def test_parity_with_trl_dpo(env, case, ours, theirs):
    trl_trainer = DPOTrainer(
        copy.deepcopy(env.policy),
        ref_model=copy.deepcopy(env.ref),
        args=DPOConfig(output_dir=env.out, **base_kwargs(**theirs)),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=env.tok,
    )
    dataset = scored(env, rejected="ones") if case == "ones" else Dataset.from_list(ROWS)
    trainer = make_trainer(env, dataset, reduction="sequence", **ours)
    batch, trl_batch = batch_of(trainer), batch_of(trl_trainer)
    for key in ("input_ids", "attention_mask", "completion_mask"):  # the very same batch
        assert torch.equal(batch[key], trl_batch[key]), key

    assert_same(*loss_and_grads(trainer, batch), *loss_and_grads(trl_trainer, trl_batch, ours=False))
    ours_metrics, trl_metrics = trainer._metrics["train"], trl_trainer._metrics["train"]
    for key, value in trl_metrics.items():  # rewards/*, logps/*, entropy, logits/*, accuracy, num_tokens
        assert ours_metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert ours_metrics["critical_dpo/rejected_weight_mean"] == [1.0]
    assert ours_metrics["critical_dpo/weighted_margin"] == pytest.approx(trl_metrics["rewards/margins"], abs=1e-7)
    assert ("critical_dpo/nll" in ours_metrics) == (case == "rpo")


# ----------------------------------------------------------------------- property 5: padding and accumulation


def test_sequence_extra_padding_changes_nothing(env):
    trainer = make_trainer(env, scored(env, rejected="random"), reduction="sequence", rpo_alpha=0.5)
    rows = [trainer.train_dataset[i] for i in PAIRS]
    batch = trainer.data_collator(rows)
    padded = dataclasses.replace(trainer.data_collator, pad_to_multiple_of=32)(rows)
    assert padded["input_ids"].shape[1] == 32 > batch["input_ids"].shape[1]
    assert_same(*loss_and_grads(trainer, batch), *loss_and_grads(trainer, padded))


def test_position_mean_padding_adds_log2_units(env):
    # Vector C's rule on a real batch: each padding column is one more unit with loss log 2 (u = 0 there).
    trainer = make_trainer(env, scored(env, rejected="random"), reduction="position_mean")
    rows = [trainer.train_dataset[i] for i in PAIRS]
    batch = trainer.data_collator(rows)
    padded = dataclasses.replace(trainer.data_collator, pad_to_multiple_of=32)(rows)
    num_pairs, cols, padded_cols = len(rows), batch["input_ids"].shape[1] - 1, 31
    loss, grads = loss_and_grads(trainer, batch)
    padded_loss, padded_grads = loss_and_grads(trainer, padded)
    expected = (loss * num_pairs * cols + num_pairs * (padded_cols - cols) * LOG2) / (num_pairs * padded_cols)
    torch.testing.assert_close(padded_loss, expected, atol=ATOL, rtol=0)
    for name in grads:  # same gradient, divided by more units
        torch.testing.assert_close(padded_grads[name], grads[name] * cols / padded_cols, atol=ATOL, rtol=0)


ONE_STEP = {  # `sequence` with weights and the RPO term: one plain SGD step, no clipping, no schedule
    "reduction": "sequence",
    "rpo_alpha": 0.5,
    "max_steps": 1,
    "optim": "sgd",
    "learning_rate": 0.5,
    "lr_scheduler_type": "constant",
    "max_grad_norm": 0.0,
}


def one_step(env, batch_size, accumulation):
    trainer = make_trainer(
        env,
        scored(env, rejected="random", rows=ROWS[:4]),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        **ONE_STEP,
    )
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_batch4_ga1_equals_batch1_ga4(env):
    start = dict(env.policy.named_parameters())
    big, small = one_step(env, 4, 1), one_step(env, 1, 4)
    assert any(not torch.equal(big[n], start[n]) for n in big)  # the step moved the weights
    for name in big:
        torch.testing.assert_close(big[name], small[name], atol=ATOL, rtol=0, msg=name)


WORKER = """
import json, sys
import torch
from datasets import load_from_disk
from transformers import AutoTokenizer, LlamaForCausalLM
from tokentrain.runtime import exit_process
from tokentrain.trainers.critical_dpo import CriticalDPOConfig, CriticalDPOTrainer

folder = sys.argv[1]
kwargs = json.loads(open(f"{folder}/kwargs.json").read())
trainer = CriticalDPOTrainer(
    LlamaForCausalLM.from_pretrained(f"{folder}/policy"),
    ref_model=LlamaForCausalLM.from_pretrained(f"{folder}/ref"),
    args=CriticalDPOConfig(output_dir=f"{folder}/out", **kwargs),
    train_dataset=load_from_disk(f"{folder}/data"),
    processing_class=AutoTokenizer.from_pretrained(f"{folder}/policy"),
)
assert trainer.accelerator.num_processes == 2
trainer.train()
if trainer.accelerator.is_main_process:
    torch.save({n: p.detach() for n, p in trainer.model.named_parameters()}, f"{folder}/after.pt")
exit_process(0)  # a gloo rank can abort at interpreter exit after its work is done: see its docstring
"""


@pytest.mark.slow
def test_two_processes_batch2_equal_batch4(env, tmp_path):
    # 2 processes x batch 2 (gloo, CPU) = batch 4 x GA 1: the x num_processes convention and the gathered counts.
    config = Path(__file__).resolve().parents[1] / "accelerate_configs" / "cpu.yaml"
    if not config.exists():
        pytest.skip(f"{config} is absent")
    env.policy.save_pretrained(tmp_path / "policy")
    env.tok.save_pretrained(tmp_path / "policy")
    env.ref.save_pretrained(tmp_path / "ref")
    scored(env, rejected="random", rows=ROWS[:4]).save_to_disk(str(tmp_path / "data"))
    kwargs = base_kwargs(per_device_train_batch_size=2, **ONE_STEP)
    (tmp_path / "kwargs.json").write_text(json.dumps(kwargs))
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


def test_num_items_counts_units_and_chosen_tokens(env):
    trainer = make_trainer(env, scored(env, rejected="random"), reduction="position_mean", rpo_alpha=1.0)
    a, b = batch_of(trainer, [0, 1]), batch_of(trainer, [2])
    counts = trainer._get_num_items_in_batch([a, b], torch.device("cpu"))
    # units: Σ_m B_m·P_m; chosen tokens: Σ over the chosen rows' completion_mask[:, 1:]
    units = 2 * (a["input_ids"].shape[1] - 1) + 1 * (b["input_ids"].shape[1] - 1)
    chosen = int(a["completion_mask"][:2, 1:].sum() + b["completion_mask"][:1, 1:].sum())
    assert counts.tolist() == [units, chosen]


# ------------------------------------------------------------------- properties 8 and 9: alignment and collation


@pytest.fixture(scope="module")
def both_trainer(env):
    return make_trainer(env, scored(env, chosen="random", rejected="random"), reduction="sequence", weighting="both")


def prepare(trainer, dataset, **config):
    args = CriticalDPOConfig(output_dir=trainer.args.output_dir, **base_kwargs(**{"weighting": "both", **config}))
    return trainer._prepare_dataset(dataset, trainer.processing_class, args, "train")


def edit(dataset, column, row, fn):
    values = list(dataset[column])
    values[row] = fn(list(values[row]))
    return dataset.remove_columns(column).add_column(column, values)


def test_changed_stored_id_raises_with_row_and_position(env, both_trainer):
    ds = edit(scored(env, "random", "random"), "rejected_ids", 2, lambda ids: ids[:1] + [ids[1] + 1] + ids[2:])
    with pytest.raises(SignalAlignmentError, match=r"row 2: stored 'rejected_ids' differ .* at position 1 "):
        prepare(both_trainer, ds)


def test_changed_stored_prompt_id_raises(env, both_trainer):
    ds = edit(scored(env, "random", "random"), "prompt_ids", 0, lambda ids: ids[:-1] + [ids[-1] + 1])
    n = len(env.split["prompt_ids"][0])
    with pytest.raises(SignalAlignmentError, match=rf"row 0: stored 'prompt_ids' differ .* at position {n - 1} "):
        prepare(both_trainer, ds)


def test_shorter_stored_ids_raise_at_the_first_missing_position(env, both_trainer):
    n = len(env.split["chosen_ids"][3])
    ds = edit(scored(env, "random", "random"), "chosen_ids", 3, lambda ids: ids[:-1])
    with pytest.raises(SignalAlignmentError, match=rf"row 3: stored 'chosen_ids' .* position {n - 1} .*<end>"):
        prepare(both_trainer, ds)


def test_row_index_is_the_input_row_after_trl_drops_rows(env, both_trainer):
    # max_length 9: TRL drops row 2 (its prompt fills 9 tokens); the error still names input row 4
    assert len(env.split["prompt_ids"][2]) >= 9 > max(len(p) for i, p in enumerate(env.split["prompt_ids"]) if i != 2)
    ds = edit(scored(env, "random", "random"), "rejected_ids", 4, lambda ids: [ids[0] + 1] + ids[1:])
    with pytest.raises(SignalAlignmentError, match=r"row 4: .* position 0 "):
        prepare(both_trainer, ds, max_length=9)


@pytest.mark.parametrize(
    "column, row, fn, pattern",
    [
        (
            "rejected_weights",
            1,
            lambda w: w[:-1],
            r"row 1: column 'rejected_weights' has \d+ values but 'rejected_ids'",
        ),
        ("chosen_weights", 0, lambda w: w + [0.5], r"row 0: column 'chosen_weights' has \d+ values but 'chosen_ids'"),
        (
            "chosen_weights",
            5,
            lambda w: w[:1] + [1.5] + w[2:],
            r"row 5, column 'chosen_weights' \(chosen side\), position 1: weight 1.5",
        ),
        (
            "rejected_weights",
            4,
            lambda w: [float("nan")] + w[1:],
            r"row 4, column 'rejected_weights' \(rejected side\), position 0: weight nan",
        ),
        (
            "rejected_weights",
            3,
            lambda w: w[:2] + [-0.1] + w[3:],
            r"position 2: weight -0.1 must be finite and in \[0, 1\]",
        ),
    ],
)
def test_bad_weights_raise(env, both_trainer, column, row, fn, pattern):
    with pytest.raises(ValueError, match=pattern):
        prepare(both_trainer, edit(scored(env, "random", "random"), column, row, fn))


@pytest.mark.parametrize(
    "weighting, drop, pattern",
    [
        ("rejected", "rejected_weights", r"'rejected_weights'.*tokentrain score"),
        ("both", "chosen_weights", r"'chosen_weights'.*score_chosen: true"),
        ("rejected", "rejected_ids", r"'rejected_ids'"),
    ],
)
def test_missing_columns_raise_naming_them(env, both_trainer, weighting, drop, pattern):
    with pytest.raises(KeyError, match=pattern):
        prepare(both_trainer, scored(env, "random", "random").remove_columns(drop), weighting=weighting)


def test_unused_weight_columns_are_dropped(env, both_trainer):
    ds = scored(env, "random", "random")
    assert "chosen_weights" not in prepare(both_trainer, ds, weighting="rejected").column_names
    prepared = prepare(both_trainer, ds, weighting="none")
    assert not {"chosen_weights", "rejected_weights"} & set(prepared.column_names)
    assert prepared["chosen_ids"] == env.split["chosen_ids"]  # TRL's own split, stored copies gone


def expected_row(prompt, ids, weights, cut, width):
    """(ids, weights) of one collated row: prompt then completion, cut like the tokens, right-padded."""
    full_ids, full_w = (prompt + ids)[cut], ([0.0] * len(prompt) + weights)[cut]
    pad = width - len(full_ids)
    return full_ids, torch.tensor(full_w + [0.0] * pad)


def check_weights_layout(batch, rows, stored, chosen_weighted, cut=slice(None)):
    """The collated `weights` against the stored ones, position by position, in the (2B, T) layout."""
    num_pairs, width = len(rows), batch["input_ids"].shape[1]
    assert batch["weights"].shape == batch["completion_mask"].shape == (2 * num_pairs, width)
    assert batch["weights"].dtype == torch.float32
    for i, row in enumerate(rows):
        j = next(j for j in range(len(stored["prompt_ids"])) if stored["prompt_ids"][j] == row["prompt_ids"])
        assert row["chosen_ids"] == stored["chosen_ids"][j]
        for offset, side in ((0, "chosen"), (num_pairs, "rejected")):
            weights = stored[f"{side}_weights"][j] if side == "rejected" or chosen_weighted else None
            weights = weights if weights is not None else [1.0] * len(row[f"{side}_ids"])
            ids, expected = expected_row(row["prompt_ids"], row[f"{side}_ids"], weights, cut, width)
            assert batch["input_ids"][offset + i, : len(ids)].tolist() == ids
            torch.testing.assert_close(batch["weights"][offset + i], expected, atol=0, rtol=0)
    # weights live on completion tokens only: prompt and padding are 0
    assert not (batch["weights"] * (1 - batch["completion_mask"])).any()


def test_weights_survive_pruning_and_collation(env, both_trainer):
    pruned = both_trainer._remove_unused_columns(both_trainer.train_dataset)
    assert {"chosen_weights", "rejected_weights", "prompt_ids"} <= set(pruned.column_names)
    assert "prompt" not in pruned.column_names  # pruning did run
    trainer = make_trainer(
        env, scored(env, rejected="random"), reduction="sequence", per_device_train_batch_size=len(ROWS)
    )
    batch = next(iter(trainer.get_train_dataloader()))  # Trainer's own pruning, sampler and collator
    stored = {**env.split.to_dict(), "rejected_weights": env.weights["rejected"]}
    rows = []  # recover each batch row's dataset row (the sampler shuffles)
    for i in range(len(ROWS)):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        rows.append(next(r for r in env.split if r["prompt_ids"] + r["chosen_ids"] == ids))
    check_weights_layout(batch, rows, stored, chosen_weighted=False)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_weights_cut_with_the_tokens(env, mode):
    max_length = 9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL deprecates keep_end; it still supports it
        trainer = make_trainer(
            env,
            scored(env, chosen="random", rejected="random"),
            reduction="sequence",
            weighting="both",
            max_length=max_length,
            truncation_mode=mode,
        )
    collator = trainer.data_collator
    assert isinstance(collator, CriticalDPOCollator)
    assert (collator.max_length, collator.truncation_mode, collator.weighting) == (max_length, mode, "both")
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = collator(rows)
    lengths = [len(r["prompt_ids"]) + len(r[f"{s}_ids"]) for r in rows for s in ("chosen", "rejected")]
    assert max(lengths) > max_length >= batch["input_ids"].shape[1]  # truncation happened
    cut = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
    stored = {
        **env.split.to_dict(),
        "chosen_weights": env.weights["chosen"],
        "rejected_weights": env.weights["rejected"],
    }
    check_weights_layout(batch, rows, stored, chosen_weighted=True, cut=cut)


# ------------------------------------------------------------- property 4: weight-0 tokens, property 6: reference


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_weight_rejected_tokens_get_no_gradient(env, monkeypatch, reduction):
    captured = {}
    real_loss = cdpo.token_weighted_dpo_loss

    def spy(policy_logps, *args, **kwargs):  # keep the (2B, P) policy log-probs the loss sees, with their grad
        policy_logps.retain_grad()
        captured["logps"] = policy_logps
        return real_loss(policy_logps, *args, **kwargs)

    monkeypatch.setattr(cdpo, "token_weighted_dpo_loss", spy)
    trainer = make_trainer(env, scored(env, rejected="random"), reduction=reduction)
    batch = batch_of(trainer)
    loss, grads = loss_and_grads(trainer, batch)
    grad = captured["logps"].grad  # (2B, P)
    num_pairs = len(PAIRS)
    weights, mask = batch["weights"][num_pairs:, 1:], batch["completion_mask"][num_pairs:, 1:].bool()
    zero, positive = mask & (weights == 0), mask & (weights > 0)
    assert zero.any() and positive.any()
    assert torch.all(grad[num_pairs:][zero] == 0)  # exactly zero
    assert torch.all(grad[num_pairs:][positive] != 0)

    # Same loss and gradients as masking those tokens out of the batch altogether.
    masked = dict(batch)
    completion_mask = batch["completion_mask"].clone()
    completion_mask[num_pairs:, 1:][zero] = 0
    masked["completion_mask"] = completion_mask
    masked_num_items = trainer._get_num_items_in_batch([masked], torch.device("cpu"))
    assert torch.equal(masked_num_items, trainer._get_num_items_in_batch([batch], torch.device("cpu")))
    assert_same(loss, grads, *loss_and_grads(trainer, masked))


@pytest.mark.parametrize("kind", ["full", "peft"])
def test_precomputed_reference_equals_online(env, kind):
    dataset = scored(env, chosen="random", rejected="random")
    config = {"reduction": "sequence", "weighting": "both", "rpo_alpha": 0.3}
    peft = {"peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])} if kind == "peft" else {}
    ref = kind == "full"  # PEFT: the reference is the policy with its adapter off
    online = make_trainer(env, dataset, ref=ref, **peft, **config)
    pre = make_trainer(
        env, dataset, ref=ref, **peft, precompute_ref_log_probs=True, precompute_ref_batch_size=3, **config
    )
    if kind == "peft":  # move the adapters off their zero init, identically, so the policy differs from the reference
        for trainer in (online, pre):
            torch.manual_seed(3)
            with torch.no_grad():
                for name, p in trainer.model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.1)
    idx = [5, 0, 2]  # another grouping and padding than the precompute batches
    batch, pre_batch = batch_of(online, idx), batch_of(pre, idx)
    assert "ref_chosen_logps" in pre_batch and "ref_chosen_logps" not in batch
    with torch.no_grad():  # the stored sums are the weighted ones Σ w·ℓ_ref, as the online pass computes them
        ref_model = online.ref_model if kind == "full" else online.model  # PEFT: the adapter is switched off inside
        online_sums = torch.cat(online.compute_ref_log_probs(ref_model, batch))
    stored_sums = torch.cat([pre_batch["ref_chosen_logps"], pre_batch["ref_rejected_logps"]])
    torch.testing.assert_close(stored_sums, online_sums, atol=ATOL, rtol=0)
    assert_same(*loss_and_grads(online, batch), *loss_and_grads(pre, pre_batch))
    m_online, m_pre = online._metrics["train"], pre._metrics["train"]
    assert m_pre["critical_dpo/weighted_margin"] == pytest.approx(m_online["critical_dpo/weighted_margin"], abs=1e-6)


def test_evaluate_reports_the_loss_and_metrics(env):
    trainer = make_trainer(env, scored(env, rejected="random"), reduction="position_mean", rpo_alpha=0.5)
    trainer.eval_dataset = trainer.train_dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_rewards/margins", "eval_critical_dpo/weighted_margin", "eval_critical_dpo/nll"):
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["eval_critical_dpo/rejected_weight_mean"] < 1


# --------------------------------------------------------------------------------------------- config (section 9)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"reduction": "mean"}, r"reduction must be one of \['sequence', 'position_mean'\], got 'mean'"),
        ({"weighting": "chosen"}, r"weighting must be one of \['rejected', 'both', 'none'\]"),
        ({"rpo_alpha": -0.5}, r"rpo_alpha must be None \(off\) or a finite value >= 0"),
        ({"beta": 0.0}, r"beta must be > 0"),
        ({"loss_type": ["sigmoid", "sft"]}, r"loss_type must be \['sigmoid'\].*rpo_alpha"),
        ({"loss_type": "ipo"}, r"loss_type must be \['sigmoid'\], got \['ipo'\]"),
        ({"loss_weights": [1.0]}, r"loss_weights must be None"),
        ({"f_divergence_type": "forward_kl"}, r"f_divergence_type must be 'reverse_kl'"),
        ({"ld_alpha": 0.5}, r"ld_alpha must be None"),
        ({"use_weighting": True}, r"use_weighting must be False"),
        ({"label_smoothing": 0.1}, r"label_smoothing must be 0"),
        ({"sync_ref_model": True}, r"sync_ref_model must be False"),
        ({"padding_free": True}, r"padding_free must be False"),
        ({"precompute_ref_log_probs": True}, r"precompute_ref_log_probs must be False with reduction='position_mean'"),
        ({"pad_to_multiple_of": 8}, r"pad_to_multiple_of must be None with reduction='position_mean'"),
        ({"max_length": 64, "truncation_mode": "keep_end"}, r"truncation_mode must be 'keep_start' with reduction="),
    ],
)
def test_config_refuses(tmp_path, kwargs, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(ValueError, match=pattern):
            CriticalDPOConfig(output_dir=str(tmp_path), **base_kwargs(**kwargs))


def test_config_defaults_and_help(tmp_path):
    args = CriticalDPOConfig(output_dir=str(tmp_path), **base_kwargs())
    assert (args.reduction, args.weighting, args.rpo_alpha, args.beta) == ("position_mean", "rejected", None, 0.1)
    # `sequence` may precompute and pad (both leave its loss unchanged)
    args = CriticalDPOConfig(
        output_dir=str(tmp_path),
        **base_kwargs(reduction="sequence", precompute_ref_log_probs=True, pad_to_multiple_of=8),
    )
    assert args.pad_to_multiple_of == 8
    inherited = {f.name for f in dataclasses.fields(DPOConfig)}
    own = [f for f in dataclasses.fields(CriticalDPOConfig) if f.name not in inherited]
    assert [f.name for f in own] == ["reduction", "weighting", "normalisation", "rpo_alpha"]
    assert all(f.metadata["help"] for f in own)


def test_chat_pairs_answering_different_prompts_are_refused(env):
    def conv(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    data = Dataset.from_dict(
        {
            "chosen": [conv("Q: 5+5=", "10"), conv("Q: 8+1=", "9")],
            "rejected": [conv("Q: 5+5=", "11"), conv("Q: 8+2=", "9")],  # row 1: another question
            "chosen_ids": [[5, 6], [7]],
            "rejected_ids": [[5, 8], [7]],
            "rejected_weights": [[1.0, 1.0], [1.0]],
        }
    )
    with pytest.raises(ValueError, match="^row 1: chosen and rejected differ from message 0 on"):
        make_trainer(env, data, weighting="rejected")


# ------------------------------------------------------------------------ normalisation: the official code's loop


def official_loop_grads(env, micro_batches, beta, rpo_alpha, accumulation):
    """The official code's step (TRL 0.9.6 DPOTrainer, its per-position loss, the old Trainer's loss / GA), written
    from its loop with full logits: each micro-batch's mean over its B·P positions (+ rpo_alpha times the mean NLL of
    its chosen tokens), divided by the accumulation steps, gradients summed."""
    from tokentrain.tokens import naive_token_logps

    model = copy.deepcopy(env.policy).float().train()
    ref = copy.deepcopy(env.ref).float().eval()
    for mb in micro_batches:
        labels = mb["input_ids"].masked_fill(mb["completion_mask"] == 0, -100)
        logps = naive_token_logps(model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits, labels)
        with torch.no_grad():
            ref_logps = naive_token_logps(
                ref(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits, labels
            )
        mask = mb["completion_mask"][:, 1:].bool()
        delta = torch.where(mask, mb["weights"][:, 1:] * (logps - ref_logps), torch.zeros(()))
        chosen, rejected = delta.chunk(2)
        loss = -torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean()
        pairs = mask.size(0) // 2
        loss = loss + rpo_alpha * -(logps[:pairs] * mask[:pairs]).sum() / mask[:pairs].sum()
        (loss / accumulation).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("normalisation", ["micro_batch", "global"])
def test_micro_batch_normalisation_is_the_official_loop(env, normalisation):
    """GA 2 over micro-batches of different padded widths: `micro_batch` gives the official code's gradient, `global`
    (one count over the step) a different one: here the largest gradient entries differ by about half the largest."""
    trainer = make_trainer(
        env,
        scored(env, rejected="random"),
        reduction="position_mean",
        rpo_alpha=0.5,
        gradient_accumulation_steps=2,
        normalisation=normalisation,
    )
    micro = [batch_of(trainer, [0, 3]), batch_of(trainer, [1, 2])]
    assert micro[0]["input_ids"].shape[1] != micro[1]["input_ids"].shape[1]  # different padded widths
    model = trainer.model.train()
    model.zero_grad()
    num_items = trainer._get_num_items_in_batch(micro, torch.device("cpu"))
    for mb in micro:
        trainer.compute_loss(model, mb, num_items_in_batch=num_items).backward()
    ours = {n: p.grad for n, p in model.named_parameters()}
    official = official_loop_grads(env, micro, trainer.beta, 0.5, 2)
    gap = max((ours[n] - official[n]).abs().max().item() for n in ours)
    scale = max(official[n].abs().max().item() for n in official)
    if normalisation == "micro_batch":
        assert gap < 1e-5
    else:
        assert gap > 0.05 * scale  # the test can tell the two normalisations apart


# ------------------------------------------------------------------------ dropped pairs are counted, never silent


def test_empty_sides_are_dropped_and_counted(env, caplog):
    rows = [dict(r) for r in ROWS]
    rows[1]["chosen"] = ""  # TRL would train the EOS alone as the chosen response
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(env, Dataset.from_list(rows), weighting="none")
    assert len(trainer.train_dataset) == len(ROWS) - 1
    n = len(ROWS)
    assert f"1 of {n} pairs have an empty chosen or rejected response and are dropped; first rows: [1]" in caplog.text
    rows = [{**r, "rejected": ""} for r in ROWS]
    with pytest.raises(ValueError, match=f"every one of the {n} pairs has an empty chosen or rejected response"):
        make_trainer(env, Dataset.from_list(rows), weighting="none")


def test_pairs_cut_by_max_length_are_counted_and_all_cut_is_an_error(env, caplog):
    rows = [dict(r) for r in ROWS]
    rows[2]["prompt"] = "Q: " + "1+" * 12 + "1="  # one prompt far longer than the others
    lengths = [len(env.tok(r["prompt"]).input_ids) for r in rows]
    limit = lengths[2]  # that prompt alone fills max_length; every other prompt is shorter
    assert all(n < limit for i, n in enumerate(lengths) if i != 2)
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(env, Dataset.from_list(rows), weighting="none", max_length=limit)
    assert len(trainer.train_dataset) == len(rows) - 1
    assert (
        f"1 of {len(rows)} pairs dropped: their prompt alone fills max_length={limit}; first rows: [2]" in caplog.text
    )
    with pytest.raises(ValueError, match=f"all {len(rows)} pairs were dropped because their prompt alone fills"):
        make_trainer(env, Dataset.from_list(rows), weighting="none", max_length=1)
