"""Tests for tokentrain/trainers/weighted_ntp.py and the shared plumbing in trainers/base.py.

Spec: specs/weighted_ntp.md sections 2, 3 and 6 (P2, P3, P4, the reduction half of P5) and 9 (config errors).
Everything runs on the conftest tiny Llama (2 layers, hidden 32) and its 12 prompt/completion rows. The stored
`completion_ids` come from TRL 1.16's own SFT preparation of the rows, not from tokentrain's tokeniser. "One step"
is Trainer's real loop (collation, `num_items_in_batch`, accumulation) followed by one SGD step with lr 1, no clipping
and no schedule, so the final weights are w0 - gradient: comparing them compares the step's gradients.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from tokentrain.trainers.weighted_ntp import WeightedNTPConfig, WeightedNTPTrainer

ATOL = 1e-6
SIGNAL = {"prior": "ref_logps", "rho1": "ref_logps", "column": "token_weights"}
ONE_SGD_STEP = {
    "optim": "sgd",
    "learning_rate": 1.0,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "max_grad_norm": 0.0,  # no clipping
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


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and several OpenMP threads on a busy 2-core machine spin-wait for each
    other (steps 100x slower, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scored_rows(pc_rows, tiny_tokenizer, tiny_model_factory, tmp_path_factory):
    """pc_rows + `completion_ids` (TRL's own tokenisation) and random signals, tie-free for Rho-1.

    Each row gets `token_weights` in [0, 2) with some exact zeros, and `ref_logps` = log U(0.02, 0.98).
    """
    out = tmp_path_factory.mktemp("trl_split")
    plain = [{"prompt": r["prompt"], "completion": r["completion"]} for r in pc_rows]
    split = SFTTrainer(
        tiny_model_factory(0),
        SFTConfig(output_dir=str(out), **config_kwargs()),
        train_dataset=Dataset.from_list(plain),
        processing_class=tiny_tokenizer,
    ).train_dataset
    g = torch.Generator().manual_seed(0)
    rows = []
    for row, ids, labels in zip(plain, split["input_ids"], split["labels"]):
        completion_ids = [t for t, lab in zip(ids[1:], labels[1:]) if lab != -100]
        k = len(completion_ids)
        weights = 2 * torch.rand(k, generator=g)
        weights[torch.rand(k, generator=g) < 0.25] = 0.0
        ref_logps = torch.log(0.02 + 0.96 * torch.rand(k, generator=g))
        rows.append(
            {
                **row,
                "completion_ids": completion_ids,
                "token_weights": weights.tolist(),
                "ref_logps": ref_logps.tolist(),
            }
        )
    assert len(rows) == 12 and all(len(r["completion_ids"]) > 0 for r in rows)
    return rows


def dataset_for(rows, weighting, signal="random"):
    """Rows with `completion_ids` and the weighting's signal column: 'random' (the fixture's), 'ones' (w = 1) or
    'constant' (P_ref = 0.3 everywhere, so PRIOR's weights are all 1)."""
    column = SIGNAL[weighting]
    data = []
    for r in rows:
        k = len(r["completion_ids"])
        values = {"random": r[column], "ones": [1.0] * k, "constant": [math.log(0.3)] * k}[signal]
        data.append({"prompt": r["prompt"], "completion": r["completion"], "completion_ids": r["completion_ids"]})
        data[-1][column] = values
    return Dataset.from_list(data)


@pytest.fixture(scope="module")
def make_trainer(tiny_model_factory, tiny_tokenizer):
    """callable(dataset, out, eval_dataset=None, **config) -> a WeightedNTPTrainer on a fresh tiny Llama (seed 0)."""

    def make(dataset, out, eval_dataset=None, **config):
        args = WeightedNTPConfig(output_dir=str(out), **config_kwargs(**config))
        return WeightedNTPTrainer(
            tiny_model_factory(0),
            args=args,
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            processing_class=tiny_tokenizer,
        )

    return make


def one_step(trainer):
    """Run Trainer's loop for one optimiser step; return the logged loss and every parameter after the step."""
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    moved = max((after[n] - before[n]).abs().max().item() for n in after)
    assert moved > 1e-3, "the step did not change the weights: the comparison would be vacuous"
    return loss, after


def assert_same_step(a, b, atol=ATOL):
    (loss_a, params_a), (loss_b, params_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=atol)  # a float32 sum of micro-batch losses of about 5.7
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], atol=atol, rtol=0, msg=name)


def loss_and_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# -------------------------------------------------------------------------- P3 / P2: the limit cases equal SFT


def test_column_ones_equals_trl_sft_compute_loss(
    scored_rows, make_trainer, tiny_model_factory, tiny_tokenizer, tmp_path
):
    """P3 on one collated batch: `column` with w = 1 is TRL 1.16 SFTTrainer's loss and gradients, exactly."""
    rows = scored_rows[:4]
    ours = make_trainer(dataset_for(rows, "column", "ones"), tmp_path, weighting="column")
    plain = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trl = SFTTrainer(
        tiny_model_factory(0),
        SFTConfig(output_dir=str(tmp_path), **config_kwargs()),
        train_dataset=plain,
        processing_class=tiny_tokenizer,
    )
    batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    trl_batch = trl.data_collator([trl.train_dataset[i] for i in range(4)])
    for key in ("input_ids", "labels", "attention_mask"):  # the very same batch
        assert torch.equal(batch[key], trl_batch[key]), key
    assert torch.equal(batch["token_weights"] != 0, batch["labels"] != -100)  # ones on completion tokens only

    loss, grads = loss_and_grads(ours, batch)
    trl_loss, trl_grads = loss_and_grads(trl, trl_batch)
    torch.testing.assert_close(loss, trl_loss, atol=ATOL, rtol=0)
    assert grads.keys() == trl_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize(
    "weighting, signal, extra",
    [
        ("column", "ones", {}),  # P3
        ("prior", "constant", {}),  # P2: constant P_ref -> w~ = 1
        ("rho1", "random", {"rho1_ratio": 1.0}),  # P2: rho = 1 selects everything, D = N
    ],
)
@pytest.mark.parametrize("batch, accumulation", [(4, 1), (1, 4)])
def test_limit_cases_equal_trl_sft_step(
    scored_rows,
    make_trainer,
    tiny_model_factory,
    tiny_tokenizer,
    tmp_path,
    weighting,
    signal,
    extra,
    batch,
    accumulation,
):
    """P2/P3 through Trainer's loop: one SGD step of SFTTrainer and of the limit case give the same weights."""
    rows = scored_rows[:4]
    step = {**ONE_SGD_STEP, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation}
    plain = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trl = SFTTrainer(
        tiny_model_factory(0),
        SFTConfig(output_dir=str(tmp_path / "trl"), **config_kwargs(**step)),
        train_dataset=plain,
        processing_class=tiny_tokenizer,
    )
    ours = make_trainer(dataset_for(rows, weighting, signal), tmp_path / "ours", weighting=weighting, **step, **extra)
    assert_same_step(one_step(ours), one_step(trl))


# --------------------------------------------------------------------------------- global reduction (P5, 1 process)


@pytest.mark.parametrize("weighting", ["prior", "column"])
def test_batch4_equals_batch1_times_ga4(scored_rows, make_trainer, tmp_path, weighting):
    """Reduction is global: 4 rows in one micro-batch = 4 micro-batches of 1 = 2 of 2 (loss and gradients)."""
    data = dataset_for(scored_rows[:4], weighting)
    results = {}
    for batch, accumulation in ((4, 1), (1, 4), (2, 2)):
        trainer = make_trainer(
            data,
            tmp_path / f"{batch}x{accumulation}",
            weighting=weighting,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            **ONE_SGD_STEP,
        )
        results[batch, accumulation] = one_step(trainer)
    assert_same_step(results[1, 4], results[4, 1])
    assert_same_step(results[2, 2], results[4, 1])


def _rho1_micro_batch_reference(model, rows, ref_shifted, ratio):
    """Naive Rho-1 `micro_batch` step over micro-batches of one row: full logits, python ranking per micro-batch,
    D = sum of ceil(rho * N_mb). Returns (loss, the weights after one SGD step with lr 1, D, N)."""
    model = copy.deepcopy(model)
    model.train()
    d_total, n_total = 0, 0
    picked = []
    for row, ref in zip(rows, ref_shifted):
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        logits = model(input_ids=ids).logits[0, :-1].float()  # (T-1, V)
        targets = labels[0, 1:]
        valid = (targets != -100).nonzero().flatten().tolist()
        logps = torch.log_softmax(logits, -1)[valid, targets[valid]]  # (N_mb,)
        excess = (-logps.detach() + ref[valid]).tolist()
        n = math.ceil(Fraction(str(ratio)) * len(valid))
        top = sorted(range(len(valid)), key=lambda j: (-excess[j], j))[:n]
        picked.append(-logps[top].sum())
        d_total += n
        n_total += len(valid)
    loss = torch.stack(picked).sum() / d_total
    loss.backward()
    with torch.no_grad():
        after = {n: p - p.grad for n, p in model.named_parameters()}
    return loss.item(), after, d_total, n_total


def test_rho1_micro_batch_ga_counts_ceil_per_micro_batch(scored_rows, make_trainer, tiny_model_factory, tmp_path):
    """Rho-1 `micro_batch` with GA 4 x batch 1: each micro-batch ranks its own row and D = sum_mb ceil(rho * N_mb)
    (not ceil(rho * N) over the step), checked against a naive full-logits implementation."""
    ratio = 0.5
    data = dataset_for(scored_rows[:4], "rho1")
    trainer = make_trainer(
        data,
        tmp_path,
        weighting="rho1",
        rho1_ratio=ratio,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        **ONE_SGD_STEP,
    )
    prepared = [trainer.train_dataset[i] for i in range(4)]
    refs = [torch.tensor(r["ref_logps"][1:]) for r in prepared]  # shifted frame: value of the target at p + 1
    loss, expected, d, n = _rho1_micro_batch_reference(tiny_model_factory(0), prepared, refs, ratio)
    assert d != math.ceil(ratio * n), "rows must have odd counts so that the two normalisers differ"

    got_loss, got = one_step(trainer)
    assert got_loss == pytest.approx(loss, abs=ATOL)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=ATOL, rtol=0, msg=name)
    frac = trainer.state.log_history[0]["weighted_ntp/selected_frac"]  # mean of per-micro-batch D_mb / N_mb
    assert 0.5 <= frac < 0.75


# ------------------------------------------------------------------------ P4: layouts and padding change nothing

LAYOUTS = {
    "padded": {},
    "padded_reversed": {"reverse": True},
    "padded_pad64": {"pad_to_multiple_of": 64},
    "padding_free": {"padding_free": True},
    "padding_free_pad64": {"padding_free": True, "pad_to_multiple_of": 64},
    "packed": {"packing": True, "max_length": 4096},
}
_BASELINES: dict = {}


def _layout_step(make_trainer, rows, weighting, layout, out):
    config = dict(LAYOUTS[layout])
    if config.pop("reverse", False):
        rows = rows[::-1]
    n = len(rows)
    trainer = make_trainer(
        dataset_for(rows, weighting),
        out,
        weighting=weighting,
        per_device_train_batch_size=1 if config.get("packing") else n,
        **ONE_SGD_STEP,
        **config,
    )
    if config.get("packing"):  # one bfd pack holding every row
        assert len(trainer.train_dataset) == 1 and len(trainer.train_dataset[0]["seq_lengths"]) == n
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    if "pad_to_multiple_of" in config:
        assert batch["input_ids"].shape[1] % 64 == 0
    return one_step(trainer)


@pytest.mark.parametrize("weighting", ["prior", "column", "rho1"])
@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "padded"])
def test_layouts_give_the_same_step(scored_rows, make_trainer, tmp_path, weighting, layout):
    """P4: one micro-batch holding 6 rows, padded / row order reversed / extra padding / padding-free / bfd-packed:
    same loss and gradients. PRIOR's per-sequence normalisation must follow the segments of the flattened row."""
    rows = scored_rows[:6]
    if weighting not in _BASELINES:
        _BASELINES[weighting] = _layout_step(make_trainer, rows, weighting, "padded", tmp_path / "padded")
    got = _layout_step(make_trainer, rows, weighting, layout, tmp_path / layout)
    assert_same_step(got, _BASELINES[weighting])


def test_prior_weights_are_not_trivial(scored_rows, make_trainer, tmp_path):
    """Guard for the layout test: with the random signal, PRIOR differs from plain SFT (so segment errors would show)."""
    rows = scored_rows[:6]
    prior = _layout_step(make_trainer, rows, "prior", "padding_free", tmp_path / "prior")
    data = dataset_for(rows, "column", "ones")
    sft = one_step(
        make_trainer(
            data,
            tmp_path / "sft",
            weighting="column",
            per_device_train_batch_size=6,
            padding_free=True,
            **ONE_SGD_STEP,
        )
    )
    assert abs(prior[0] - sft[0]) > 1e-3


# ------------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "config, field",
    [
        ({}, "weighting"),
        ({"weighting": "focal"}, "weighting"),
        ({"weighting": "prior", "prior_alpha": 0.0}, "prior_alpha"),
        ({"weighting": "prior", "prior_alpha": -1.0}, "prior_alpha"),
        ({"weighting": "rho1", "rho1_ratio": 0.0}, "rho1_ratio"),
        ({"weighting": "rho1", "rho1_ratio": 1.5}, "rho1_ratio"),
        ({"weighting": "rho1", "rho1_ratio": -0.2}, "rho1_ratio"),
        ({"weighting": "rho1", "rho1_scope": "batch"}, "rho1_scope"),
    ],
)
def test_config_errors_name_the_field(tmp_path, config, field):
    with pytest.raises(ValueError, match=field):
        WeightedNTPConfig(output_dir=str(tmp_path), **config_kwargs(**config))


@pytest.mark.parametrize(
    "config, field",
    [
        ({"loss_type": "dft"}, "loss_type"),
        ({"packing": True, "packing_strategy": "wrapped", "max_length": 64}, "packing_strategy"),
        ({"completion_only_loss": False}, "completion_only_loss"),
    ],
)
def test_trainer_refuses_settings_that_change_the_loss(scored_rows, make_trainer, tmp_path, config, field):
    with pytest.raises(ValueError, match=field):
        make_trainer(dataset_for(scored_rows[:2], "column"), tmp_path, weighting="column", **config)


@pytest.mark.parametrize("weighting", ["prior", "rho1"])
def test_missing_ref_logps_names_column_and_score_stage(scored_rows, make_trainer, tmp_path, weighting):
    data = dataset_for(scored_rows[:2], weighting).remove_columns("ref_logps")
    with pytest.raises((KeyError, ValueError), match=r"ref_logps[\s\S]*tokentrain score"):
        make_trainer(data, tmp_path, weighting=weighting)


# ---------------------------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize("weighting", ["prior", "rho1", "column"])
def test_evaluate_without_signals_is_unweighted_mean_nll(
    scored_rows, make_trainer, tiny_model_factory, tmp_path, weighting
):
    """Eval rows carry no signal columns; eval_loss is the plain mean NLL over every completion token."""
    eval_rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in scored_rows[6:11]]
    trainer = make_trainer(
        dataset_for(scored_rows[:4], weighting),
        tmp_path,
        eval_dataset=Dataset.from_list(eval_rows),
        weighting=weighting,
        per_device_eval_batch_size=len(eval_rows),  # one batch: eval_loss is the token mean, not a mean of means
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
    assert count == sum(len(r["completion_ids"]) for r in scored_rows[6:11])
    assert metrics["eval_loss"] == pytest.approx(nll / count, abs=1e-5)


def test_metrics_are_gathered_once_per_log_not_per_metric(scored_rows, make_trainer, tmp_path):
    """4 steps x GA 2 with 3 metrics, logged every 2 steps: 2 gathers in all (one per log, all metrics stacked), where
    the per-metric, per-micro-batch gather made 24; the logged values are Σsum / Σcount over the window."""
    trainer = make_trainer(
        dataset_for(scored_rows[:8], "prior"),
        tmp_path,
        weighting="prior",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        **{**ONE_SGD_STEP, "max_steps": 4, "logging_steps": 2, "learning_rate": 0.01},
    )
    calls = []
    real = trainer.accelerator.gather_for_metrics
    trainer.accelerator.gather_for_metrics = lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k)
    trainer.train()
    assert calls == [(1, 3, 2), (1, 3, 2)]  # (processes, metrics: nll, ref_nll, weight_max, (sum, count))
    logged = [h for h in trainer.state.log_history if "weighted_ntp/nll" in h]
    assert len(logged) == 2 and all(h["weighted_ntp/nll"] > 0 for h in logged)
