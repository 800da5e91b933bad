"""Tests for tokentrain/trainers/unlearning.py on the shared base (trainers/base.py).

Spec: specs/unlearning.md sections 2.6, 3, 6 (WHP limit = SFTTrainer, batch 4 x GA 1 = batch 1 x GA 4 = 2 x 2 for every
loss, padding changes nothing) and 9 (config and labels-dataset errors). Tiny conftest Llama (2 layers, hidden 32) and
its 12 prompt/completion rows. "One step" is Trainer's real loop followed by one SGD step with lr 1, no clipping, so
comparing the weights after it compares the step's gradients. Naive references run each row alone with full logits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from tokentrain.data import SignalAlignmentError, completion_ids_of, target_positions, tokenize_row
from tokentrain.signals.anchors import AnchorTerms
from tokentrain.signals.whp_labels import score_whp_labels
from tokentrain.trainers.unlearning import UnlearningConfig, UnlearningTrainer

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
def scored_rows(pc_rows, tiny_tokenizer, tiny_model_factory):
    """pc_rows + completion_ids, random generic labels (a third kept equal to the input), 0/1 weights with zeros,
    and ref_logps = the start model's own log-probs + N(0, 0.3^2) noise (so NPO's Delta is O(1), its gradient alive)."""
    g = torch.Generator().manual_seed(0)
    model = tiny_model_factory(0).eval()
    rows = []
    for row in pc_rows:
        tokens = tokenize_row(row, tiny_tokenizer)
        ids = completion_ids_of(tokens["input_ids"], tokens["labels"])
        k = len(ids)
        targets = torch.randint(0, len(tiny_tokenizer), (k,), generator=g)
        keep = torch.rand(k, generator=g) < 0.33
        targets[keep] = torch.tensor(ids)[keep]
        weights = (torch.rand(k, generator=g) > 0.25).float()
        weights[0] = 1.0
        with torch.no_grad():
            logp_all = torch.log_softmax(model(input_ids=torch.tensor([tokens["input_ids"]])).logits[0], -1)
        own = torch.stack([logp_all[j - 1, tokens["input_ids"][j]] for j in target_positions(tokens["labels"])])
        ref = (own + 0.3 * torch.randn(k, generator=g)).clamp(max=0.0)
        rows.append(
            {
                **row,
                "completion_ids": ids,
                "target_ids": targets.tolist(),
                "token_weights": weights.tolist(),
                "ref_logps": ref.tolist(),
            }
        )
    return rows


# The untrained model's mean NLL is ~5.7: SimNPO's margin near it keeps sigmoid(beta (lbar - gamma)) off saturation, so
# its gradient is not ~0 and the comparisons below are not vacuous.
EXTRA = {"simnpo": {"simnpo_gamma": 5.5}}
COLUMNS = {"whp": ("target_ids", "token_weights"), "ga": (), "npo": ("ref_logps",), "simnpo": ()}


def dataset_for(rows, loss, identity=False):
    """Rows with the columns `loss` reads; identity: target_ids = completion_ids and weights 1 (WHP's SFT limit)."""
    data = []
    for r in rows:
        row = {"prompt": r["prompt"], "completion": r["completion"]}
        if COLUMNS[loss]:
            row["completion_ids"] = r["completion_ids"]
        for c in COLUMNS[loss]:
            row[c] = r[c]
        if identity:
            row["target_ids"], row["token_weights"] = r["completion_ids"], [1.0] * len(r["completion_ids"])
        data.append(row)
    return Dataset.from_list(data)


@pytest.fixture(scope="module")
def make_trainer(tiny_model_factory, tiny_tokenizer):
    def make(dataset, out, retain_rows=None, **config):
        args = UnlearningConfig(output_dir=str(out), **config_kwargs(**config))
        return UnlearningTrainer(
            tiny_model_factory(0),
            args=args,
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
            retain_dataset=retain_rows,
        )

    return make


def one_step(trainer):
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert max((after[n] - before[n]).abs().max().item() for n in after) > 1e-4, "vacuous: the step moved nothing"
    return loss, after


def assert_same_step(a, b, atol=ATOL):
    (loss_a, params_a), (loss_b, params_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=atol)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], atol=atol, rtol=0, msg=name)


def loss_and_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------- WHP limit = SFT


def test_whp_identity_labels_equal_trl_sft_compute_loss(
    scored_rows, make_trainer, tiny_model_factory, tiny_tokenizer, tmp_path
):
    """target_ids = completion_ids and w = 1: exactly TRL 1.16 SFTTrainer's loss and gradients on the same batch."""
    rows = scored_rows[:4]
    ours = make_trainer(dataset_for(rows, "whp", identity=True), tmp_path / "ours", unlearning_loss="whp")
    plain = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trl = SFTTrainer(
        tiny_model_factory(0),
        SFTConfig(output_dir=str(tmp_path / "trl"), **config_kwargs()),
        train_dataset=plain,
        processing_class=tiny_tokenizer,
    )
    batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    trl_batch = trl.data_collator([trl.train_dataset[i] for i in range(4)])
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(batch[key], trl_batch[key]), key
    loss, grads = loss_and_grads(ours, batch)
    trl_loss, trl_grads = loss_and_grads(trl, trl_batch)
    torch.testing.assert_close(loss, trl_loss, atol=ATOL, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("batch, accumulation", [(4, 1), (1, 4)])
def test_whp_identity_step_equals_trl_sft_step(
    scored_rows, make_trainer, tiny_model_factory, tiny_tokenizer, tmp_path, batch, accumulation
):
    rows = scored_rows[:4]
    step = {**ONE_SGD_STEP, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation}
    plain = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trl = SFTTrainer(
        tiny_model_factory(0),
        SFTConfig(output_dir=str(tmp_path / "trl"), **config_kwargs(**step)),
        train_dataset=plain,
        processing_class=tiny_tokenizer,
    )
    ours = make_trainer(dataset_for(rows, "whp", identity=True), tmp_path / "ours", unlearning_loss="whp", **step)
    assert_same_step(one_step(ours), one_step(trl))


# ------------------------------------------------------------------------------------- naive references per loss


def naive_step(model, rows, tokenizer, loss_name, args, retain_rows=()):
    """Loss of one step over `rows` with full logits, row by row, and the weights after one SGD step with lr 1."""
    model.train()
    per_token, per_row = [], []
    for r in rows:
        tokens = tokenize_row(r, tokenizer)
        ids, positions = tokens["input_ids"], target_positions(tokens["labels"])
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # (T, V)
        logp_all = torch.log_softmax(logits, -1)
        if loss_name == "whp":
            keep = [(j, t) for j, t, w in zip(positions, r["target_ids"], r["token_weights"]) if w > 0]
            per_token.append(torch.stack([logp_all[j - 1, t] for j, t in keep]))
        else:
            logps = torch.stack([logp_all[j - 1, ids[j]] for j in positions])
            per_token.append(logps)
            per_row.append((logps, torch.tensor(r["ref_logps"])))
    n_tokens = sum(x.numel() for x in per_token)
    S = len(rows)
    if loss_name == "whp":
        loss = -torch.cat(per_token).sum() / n_tokens
    elif loss_name == "ga":
        loss = torch.cat(per_token).sum() / n_tokens
    elif loss_name == "npo":
        beta = args["npo_beta"]
        loss = sum(-(2 / beta) * F.logsigmoid(-beta * (lp - ref).sum()) for lp, ref in per_row) / S
    else:
        beta, gamma = args["simnpo_beta"], args["simnpo_gamma"]
        loss = sum(-(2 / beta) * F.logsigmoid(beta * (-lp.mean() - gamma)) for lp, _ in per_row) / S
    if retain_rows:
        nll, count = 0.0, 0
        for r in retain_rows:
            tokens = tokenize_row(r, tokenizer)
            ids, positions = tokens["input_ids"], target_positions(tokens["labels"])
            logp_all = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            nll = nll - sum(logp_all[j - 1, ids[j]] for j in positions)
            count += len(positions)
        loss = loss + args["retain_weight"] * nll / count
    loss.backward()
    with torch.no_grad():
        after = {n: p - p.grad for n, p in model.named_parameters()}
    return loss.item(), after


@pytest.mark.parametrize(
    "loss_name, extra",
    [
        ("whp", {}),
        ("ga", {}),
        ("npo", {"npo_beta": 0.5}),
        ("simnpo", {"simnpo_beta": 2.5, "simnpo_gamma": 5.3}),
    ],
)
def test_step_matches_naive_reference(
    scored_rows, make_trainer, tiny_model_factory, tiny_tokenizer, tmp_path, loss_name, extra
):
    rows = scored_rows[:4]
    trainer = make_trainer(
        dataset_for(rows, loss_name),
        tmp_path,
        unlearning_loss=loss_name,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        **ONE_SGD_STEP,
        **extra,
    )
    got = one_step(trainer)
    args = {"npo_beta": 0.1, "simnpo_beta": 2.5, "simnpo_gamma": 0.0, **extra}
    expected = naive_step(tiny_model_factory(0), rows, tiny_tokenizer, loss_name, args)
    assert_same_step(got, expected, atol=1e-5)


def test_whp_weights_matter(scored_rows, make_trainer, tmp_path):
    """Guard: the random labels and weights make WHP differ from its SFT limit (so the tests above are not vacuous)."""
    rows = scored_rows[:4]
    step = {**ONE_SGD_STEP, "per_device_train_batch_size": 4}
    a = one_step(make_trainer(dataset_for(rows, "whp"), tmp_path / "a", unlearning_loss="whp", **step))
    b = one_step(make_trainer(dataset_for(rows, "whp", identity=True), tmp_path / "b", unlearning_loss="whp", **step))
    # an untrained model gives every token an NLL near log 300, so the losses are close; the gradients are not
    assert max((a[1][n] - b[1][n]).abs().max().item() for n in a[1]) > 1e-2


# -------------------------------------------------------------------------------------- global reduction, layout


@pytest.mark.parametrize("loss_name", ["whp", "ga", "npo", "simnpo"])
def test_batch4_equals_batch1_times_ga4_equals_2x2(scored_rows, make_trainer, tmp_path, loss_name):
    data = dataset_for(scored_rows[:4], loss_name)
    results = {}
    for batch, accumulation in ((4, 1), (1, 4), (2, 2)):
        trainer = make_trainer(
            data,
            tmp_path / f"{batch}x{accumulation}",
            unlearning_loss=loss_name,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            **ONE_SGD_STEP,
            **EXTRA.get(loss_name, {}),
        )
        results[batch, accumulation] = one_step(trainer)
    assert_same_step(results[1, 4], results[4, 1])
    assert_same_step(results[2, 2], results[4, 1])


LAYOUTS = {
    "padding_free_pad64": {"padding_free": True, "pad_to_multiple_of": 64},
    "packed": {"packing": True, "max_length": 4096},
    "padded_pad64": {"pad_to_multiple_of": 64},
}


_PADDED: dict = {}


def _layout_step(make_trainer, rows, loss_name, layout, out):
    config = dict(LAYOUTS.get(layout, {}))
    trainer = make_trainer(
        dataset_for(rows, loss_name),
        out,
        unlearning_loss=loss_name,
        per_device_train_batch_size=1 if config.get("packing") else len(rows),
        **ONE_SGD_STEP,
        **config,
        **EXTRA.get(loss_name, {}),
    )
    if config.get("packing"):  # one bfd pack holding every row
        assert len(trainer.train_dataset) == 1 and len(trainer.train_dataset[0]["seq_lengths"]) == len(rows)
    return one_step(trainer)


@pytest.mark.parametrize("loss_name", ["whp", "npo", "simnpo"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_give_the_same_step(scored_rows, make_trainer, tmp_path, loss_name, layout):
    """Per-sequence sums follow the segments of a flattened row; extra padding changes nothing."""
    rows = scored_rows[:5]
    if loss_name not in _PADDED:
        _PADDED[loss_name] = _layout_step(make_trainer, rows, loss_name, "padded", tmp_path / "padded")
    assert_same_step(_layout_step(make_trainer, rows, loss_name, layout, tmp_path / layout), _PADDED[loss_name])


# ---------------------------------------------------------------------------------------------------- retain term


@pytest.mark.parametrize("loss_name", ["ga", "npo"])
def test_retain_term_value_and_reduction(
    scored_rows, make_trainer, tiny_model_factory, tiny_tokenizer, tmp_path, loss_name
):
    """A one-row retain set makes the draws deterministic: each forget row brings one copy of it. The step equals the
    naive forget loss + lambda x token-mean retain NLL, for 4 x 1 and 1 x 4 alike."""
    rows = scored_rows[:4]
    retain_row = {"prompt": scored_rows[8]["prompt"], "completion": scored_rows[8]["completion"]}
    retain = Dataset.from_list([retain_row])
    extra = {"retain_weight": 0.7, "retain_dataset": "in-memory", "npo_beta": 0.5}
    expected = naive_step(tiny_model_factory(0), rows, tiny_tokenizer, loss_name, extra, retain_rows=[retain_row] * 4)
    for batch, accumulation in ((4, 1), (1, 4)):
        trainer = make_trainer(
            dataset_for(rows, loss_name),
            tmp_path / f"{batch}x{accumulation}",
            retain_rows=retain,
            unlearning_loss=loss_name,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            **ONE_SGD_STEP,
            **extra,
        )
        got = one_step(trainer)
        assert_same_step(got, expected, atol=1e-5)
        assert "unlearning/retain_nll" in trainer.state.log_history[0]


def test_retain_draws_are_seeded_and_sized(scored_rows, make_trainer, tmp_path):
    retain = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in scored_rows[6:12]])
    drawn = []
    for run in range(2):
        trainer = make_trainer(
            dataset_for(scored_rows[:4], "ga"),
            tmp_path / str(run),
            retain_rows=retain,
            unlearning_loss="ga",
            retain_weight=1.0,
            retain_dataset="x",
            per_device_train_batch_size=3,
            gradient_accumulation_steps=1,
        )
        batches, _ = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 1, "cpu")
        drawn.append(batches[0]["retain"]["input_ids"])
        assert batches[0]["retain"]["input_ids"].shape[0] == 3  # as many retain rows as forget rows
    assert torch.equal(drawn[0], drawn[1])


# ------------------------------------------------------------------------------------ end to end from the scorer


def test_trainer_reads_the_scoring_pass_columns(pc_rows, tiny_model_factory, tiny_tokenizer, make_trainer, tmp_path):
    anchors = AnchorTerms.from_pairs([("Aromi", "Bistro"), ("Zizzi", "Zed"), ("riverside", "shore")])
    rows = [dict(r) for r in pc_rows[:6]]
    columns, _ = score_whp_labels(
        rows, tiny_model_factory(0).eval(), tiny_model_factory(1).eval(), tiny_tokenizer, anchors
    )
    data = Dataset.from_list([{**r, **{k: v[i] for k, v in columns.items()}} for i, r in enumerate(rows)])
    trainer = make_trainer(data, tmp_path, unlearning_loss="whp", per_device_train_batch_size=3, **ONE_SGD_STEP)
    loss, _ = one_step(trainer)
    assert math.isfinite(loss)
    assert 0 < trainer.state.log_history[0]["unlearning/changed"] <= 1
    # the labels depend on the whole context: a row whose prompt changed after scoring is refused (`prompt_ids`)
    edited = data.to_list()
    edited[2]["prompt"] = edited[2]["prompt"].replace("name[", "name [")
    with pytest.raises(SignalAlignmentError, match=r"row 2: stored 'prompt_ids' differ"):
        make_trainer(Dataset.from_list(edited), tmp_path / "edited", unlearning_loss="whp")


# --------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "config, message",
    [
        ({}, r"unlearning_loss must be one of \['whp', 'ga', 'npo', 'simnpo'\], got None"),
        ({"unlearning_loss": "rmu"}, r"unlearning_loss must be one of \['whp', 'ga', 'npo', 'simnpo'\], got 'rmu'"),
        ({"unlearning_loss": "npo", "npo_beta": 0.0}, r"npo_beta must be > 0, got 0\.0"),
        ({"unlearning_loss": "npo", "npo_beta": -1.0}, r"npo_beta must be > 0"),
        ({"unlearning_loss": "simnpo", "simnpo_beta": 0.0}, r"simnpo_beta must be > 0"),
        ({"unlearning_loss": "ga", "retain_weight": -0.1}, r"retain_weight must be a finite number >= 0, got -0\.1"),
        ({"unlearning_loss": "ga", "retain_weight": math.nan}, r"retain_weight must be a finite number >= 0"),
        ({"unlearning_loss": "npo", "retain_weight": 1.0}, r"retain_weight is 1\.0 but no retain_dataset is given"),
        (
            {"unlearning_loss": "whp", "retain_weight": 1.0, "retain_dataset": "r.jsonl"},
            r"retain_weight must be 0 with",
        ),
    ],
)
def test_config_errors_name_the_field(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        UnlearningConfig(output_dir=str(tmp_path), **config_kwargs(**config))


def _edit(rows, loss, **changes):
    data = dataset_for(rows, loss).to_list()
    for i, change in changes.items():
        index = int(i[1:])
        data[index] = {**data[index], **change}
    return Dataset.from_list(data)


def test_labels_dataset_errors(scored_rows, make_trainer, tmp_path):
    rows = scored_rows[:3]
    k = len(rows[1]["completion_ids"])
    cases = [
        (dataset_for(rows, "whp").remove_columns("target_ids"), r"target_ids.*written by the labels stage"),
        (dataset_for(rows, "whp").remove_columns("token_weights"), r"token_weights.*whp_labels"),
        (dataset_for(rows, "whp").remove_columns("completion_ids"), r"completion_ids"),
        (_edit(rows, "whp", r1={"target_ids": [5] * (k - 1)}), r"row 1: column 'target_ids' has \d+ values"),
        (
            _edit(rows, "whp", r1={"target_ids": [300] * k}),
            r"row 1, column 'target_ids', position 0: 300 is not a token id",
        ),
        (
            _edit(rows, "whp", r2={"token_weights": [-1.0] * len(rows[2]["completion_ids"])}),
            r"row 2, column 'token_weights'",
        ),
        (
            _edit(rows, "whp", r2={"token_weights": [math.nan] * len(rows[2]["completion_ids"])}),
            r"row 2, column 'token_w",
        ),
        (
            Dataset.from_list(
                [{**r, "token_weights": [0.0] * len(r["completion_ids"])} for r in dataset_for(rows, "whp").to_list()]
            ),
            r"every token weight of the labels dataset is 0",
        ),
    ]
    for data, message in cases:
        with pytest.raises((KeyError, ValueError), match=message):
            make_trainer(data, tmp_path, unlearning_loss="whp")
    shifted = _edit(
        rows, "whp", r1={"completion_ids": [rows[1]["completion_ids"][0] + 1] + rows[1]["completion_ids"][1:]}
    )
    with pytest.raises(SignalAlignmentError, match=r"row 1: stored 'completion_ids' differ .* at position 0"):
        make_trainer(shifted, tmp_path, unlearning_loss="whp")


def test_npo_without_ref_logps_names_the_stage(scored_rows, make_trainer, tmp_path):
    data = dataset_for(scored_rows[:2], "npo").remove_columns("ref_logps")
    with pytest.raises(
        KeyError, match=r"'ref_logps' is written by the reference stage \(`tokentrain score`, signal `ref_logps`"
    ):
        make_trainer(data, tmp_path, unlearning_loss="npo")
    k = len(scored_rows[0]["completion_ids"])
    with pytest.raises(ValueError, match=r"row 0: column 'ref_logps' has \d+ values but 'completion_ids' has"):
        make_trainer(_edit(scored_rows[:2], "npo", r0={"ref_logps": [-1.0] * (k + 1)}), tmp_path, unlearning_loss="npo")


def test_evaluate_is_unweighted_mean_nll(scored_rows, tiny_tokenizer, tiny_model_factory, tmp_path):
    eval_rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in scored_rows[6:10]]
    args = {"unlearning_loss": "whp", "per_device_eval_batch_size": 4}
    trainer = UnlearningTrainer(
        tiny_model_factory(0),
        args=UnlearningConfig(output_dir=str(tmp_path), **config_kwargs(**args)),
        train_dataset=dataset_for(scored_rows[:4], "whp"),
        eval_dataset=Dataset.from_list(eval_rows),
        processing_class=tiny_tokenizer,
    )
    metrics = trainer.evaluate()
    model = tiny_model_factory(0).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in trainer.eval_dataset:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(row["labels"][1:])
            valid = targets != -100
            nll -= torch.log_softmax(logits.double(), -1)[valid, targets[valid]].sum().item()
            count += int(valid.sum())
    assert metrics["eval_loss"] == pytest.approx(nll / count, abs=1e-5)


# ------------------------------------------------------------------------------- 2 processes (slow, accelerate)

MP_SCRIPT = '''
"""2-process runs of UnlearningTrainer and of the whp_labels pass; the main process saves what the test compares."""
import json, os, sys
from pathlib import Path

import torch
from datasets import Dataset

from tokentrain.data import load_rows
from tokentrain.models import load_model, load_tokenizer
from tokentrain.runtime import distributed_state, exit_process
from tokentrain.signals.anchors import AnchorTerms
from tokentrain.signals.whp_labels import score_whp_labels
from tokentrain.trainers.unlearning import UnlearningConfig, UnlearningTrainer


def run_one(model_dir, rows_path, out_dir, name, loss, batch, ga, steps, retain=None, **config):
    tokenizer = load_tokenizer(model_dir)
    args = UnlearningConfig(
        output_dir=str(Path(out_dir) / name), unlearning_loss=loss, per_device_train_batch_size=batch,
        gradient_accumulation_steps=ga, max_steps=steps, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, save_strategy="no",
        train_sampling_strategy="sequential", max_length=None, bf16=False, report_to="none", disable_tqdm=True, seed=0,
        retain_dataset="in-memory" if retain else None, **config,
    )
    trainer = UnlearningTrainer(
        load_model(model_dir, dtype="float32"), args=args, train_dataset=load_rows(rows_path),
        processing_class=tokenizer, retain_dataset=Dataset.from_list(retain) if retain else None,
    )
    trainer.train()
    return trainer.state.log_history, {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters()}


def labels(model_dir, rows_path, terms):
    tokenizer = load_tokenizer(model_dir)
    base, reinforced = load_model(model_dir, dtype="float32"), load_model(model_dir, dtype="float32")
    with torch.no_grad():
        for p in reinforced.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in load_rows(rows_path)]
    return score_whp_labels(rows, base, reinforced, tokenizer, AnchorTerms.from_pairs(terms), 3.0, batch_size=2)


if __name__ == "__main__":
    model_dir, rows_path, runs_path, out = sys.argv[1:5]
    spec = json.loads(Path(runs_path).read_text())
    state = distributed_state()
    for run in spec["runs"]:
        log, weights = run_one(model_dir, rows_path, out, **run)
        if state.is_main_process:
            folder = Path(out) / run["name"]
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(weights, folder / "weights.pt")
            (folder / "log.json").write_text(json.dumps({"log": log, "processes": state.num_processes}))
        state.wait_for_everyone()
    columns, stats = labels(model_dir, rows_path, spec["terms"])
    if state.is_main_process:
        (Path(out) / "labels.json").write_text(json.dumps({"columns": columns, "stats": stats}))
    state.wait_for_everyone()
    exit_process(0)
'''

# name -> 2-process run (batch per process); its 1-process reference has batch x 2 (sequential order: step s of
# 2 processes x batch 2 holds rows 4s..4s+3, as 1 process x batch 4).
MP_RUNS = {
    "whp": {"loss": "whp", "batch": 2, "ga": 1, "steps": 2},
    "ga": {"loss": "ga", "batch": 1, "ga": 2, "steps": 2},
    "npo": {"loss": "npo", "batch": 2, "ga": 1, "steps": 2, "npo_beta": 0.5},
    "simnpo": {"loss": "simnpo", "batch": 2, "ga": 1, "steps": 2, "simnpo_gamma": 5.5},
    "npo_retain": {"loss": "npo", "batch": 2, "ga": 1, "steps": 2, "retain_weight": 0.7, "npo_beta": 0.5},
}
MP_TERMS = [["Aromi", "Bistro"], ["Zizzi", "Zed"], ["riverside", "shore"]]


@pytest.mark.slow
def test_two_processes_equal_one(scored_rows, tiny_model_dir, tiny_tokenizer, tmp_path):
    """batch 2 x 2 processes (or 1 x GA 2 x 2 processes) = batch 4 x 1 process, loss and weights after 2 steps, for
    every loss and the NPO retain term (a 1-row retain set: the draws are deterministic); the whp_labels pass gives
    the same columns strided over 2 processes as in one."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "unlearning_mp.py"
    script.write_text(MP_SCRIPT)
    rows_path = tmp_path / "rows.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in scored_rows[:8]))
    retain = [{"prompt": scored_rows[9]["prompt"], "completion": scored_rows[9]["completion"]}]
    runs = [{"name": n, **r, **({"retain": retain} if "retain_weight" in r else {})} for n, r in MP_RUNS.items()]
    (tmp_path / "runs.json").write_text(json.dumps({"runs": runs, "terms": MP_TERMS}))
    out = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(repo / "accelerate_configs" / "cpu.yaml"), str(script), str(tiny_model_dir), str(rows_path)]
    command += [str(tmp_path / "runs.json"), str(out)]
    proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    spec = importlib.util.spec_from_file_location("unlearning_mp", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for run in runs:
        record = json.loads((out / run["name"] / "log.json").read_text())
        assert record["processes"] == 2
        two = ([h["loss"] for h in record["log"] if "loss" in h], torch.load(out / run["name"] / "weights.pt"))
        config = {**run, "batch": run["batch"] * 2}
        log, weights = module.run_one(tiny_model_dir, rows_path, tmp_path / "single", **config)
        one = ([h["loss"] for h in log if "loss" in h], weights)
        assert len(two[0]) == 2 and two[0] == pytest.approx(one[0], rel=1e-5, abs=ATOL), run["name"]
        for name in one[1]:
            torch.testing.assert_close(two[1][name], one[1][name], atol=ATOL, rtol=0, msg=f"{run['name']}: {name}")
    labels = json.loads((out / "labels.json").read_text())
    columns, stats = module.labels(tiny_model_dir, rows_path, MP_TERMS)
    assert labels["columns"] == columns and labels["stats"] == pytest.approx(stats)
    assert stats["weighted"] > 0 and stats["changed"] > 0
