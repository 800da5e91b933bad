"""Trainers with non-trivial weights against an independent float64 computation over full logits.

The trainer runs its real path (collation, the fused LM head, the global normaliser) on a float64 copy of the tiny
model; the reference is written here from the papers' formulas with `log_softmax` over `[B, T, V]` logits. PRIOR
weights come from random reference log-probs, column weights are random with exact zeros, and the critical_dpo
weights come from a real contrastive scoring pass of two different models.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from tokentrain.data import completion_ids_of, tokenize_row
from tokentrain.tokens import naive_token_logps

pytestmark = pytest.mark.usefixtures("one_thread")

# The trainer's fused head returns float32 log-probs (TRL's kernel accumulates in float32), the reference is float64
ATOL, RTOL = 2e-6, 1e-5


def config(out, **kwargs):
    return {
        "output_dir": str(out),
        "bf16": False,
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "no",
        "max_length": None,
        "gradient_checkpointing": False,  # TRL's default; the reference copies the model with it off
        **kwargs,
    }


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(loss, grads, ref_loss, ref_grads):
    torch.testing.assert_close(loss.double(), ref_loss, atol=ATOL, rtol=RTOL)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name].double(), ref_grads[name], atol=ATOL, rtol=RTOL, msg=name)


# ------------------------------------------------------------------------------------------------ weighted_ntp


@pytest.fixture(scope="module")
def sft_rows(pc_rows, tiny_tokenizer):
    g = torch.Generator().manual_seed(7)
    rows = []
    for row in pc_rows[:6]:
        o = tokenize_row(row, tiny_tokenizer)
        ids = completion_ids_of(o["input_ids"], o["labels"])
        weights = 3 * torch.rand(len(ids), generator=g, dtype=torch.float64)
        weights[torch.rand(len(ids), generator=g) < 0.3] = 0.0
        ref_logps = torch.log(0.01 + 0.98 * torch.rand(len(ids), generator=g, dtype=torch.float64))
        rows.append({**row, "completion_ids": ids, "token_weights": weights.tolist(), "ref_logps": ref_logps.tolist()})
    return rows


def reference_weighted_ntp(model, batch, weighting, alpha):
    """Σ w_t·(−log p_θ(y_t)) / N with N the batch's target count; PRIOR: w = (1 − P_ref)^α, mean 1 per row.
    `model`: a plain copy made before any trainer saw it (TRL patches the forward of the model it trains)."""
    labels = batch["labels"]
    logps = naive_token_logps(model(input_ids=batch["input_ids"]).logits.double(), labels)  # (B, T-1)
    mask = labels[:, 1:] != -100
    if weighting == "column":
        weights = batch["token_weights"][:, 1:].double()
    else:
        u = (1 - batch["ref_logps"][:, 1:].double().exp()) ** alpha * mask
        weights = u * mask.sum(1, keepdim=True) / u.sum(1, keepdim=True)  # row-wise mean 1 over valid targets
    loss = -(weights * logps * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach(), grads_of(model)


@pytest.mark.parametrize(("weighting", "alpha"), [("column", 1.0), ("prior", 1.0), ("prior", 0.5)])
def test_weighted_ntp_equals_float64_full_logits(
    weighting, alpha, sft_rows, tiny_model_factory, tiny_tokenizer, tmp_path
):
    from tokentrain.trainers.weighted_ntp import WeightedNTPConfig, WeightedNTPTrainer

    args = WeightedNTPConfig(**config(tmp_path, weighting=weighting, prior_alpha=alpha))
    model = tiny_model_factory(0).double()
    trainer = WeightedNTPTrainer(
        model, args, train_dataset=Dataset.from_list(sft_rows), processing_class=tiny_tokenizer
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(sft_rows))])
    ref_loss, ref_grads = reference_weighted_ntp(model, batch, weighting, alpha)
    model.train()
    model.zero_grad()
    num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
    loss.backward()
    assert_close(loss.detach(), grads_of(model), ref_loss, ref_grads)
    spread = batch["token_weights" if weighting == "column" else "ref_logps"][:, 1:]
    assert spread.std() > 0.1  # the weights are far from uniform: a wrong weighting would not pass


# ------------------------------------------------------------------------------------------------ critical_dpo

PAIRS = [
    {"prompt": "Q: 2+3=", "chosen": " 5", "rejected": " 6 or 7"},
    {"prompt": "Q: 10+4=", "chosen": " 14 done", "rejected": " 13"},
    {"prompt": "Q: 7+7=", "chosen": " 14", "rejected": " 15 maybe 16"},
    {"prompt": "Q: 9+9=", "chosen": " 18 it is", "rejected": " 17 it is"},
]


@pytest.fixture(scope="module")
def cdpo(tmp_path_factory):
    """A tokenizer, a float64 policy, a different reference, and the pairs scored by a real contrastive pass."""
    from tokentrain.models import tiny_llama, train_tokenizer
    from tokentrain.signals.contrastive import score_contrastive

    tok = train_tokenizer([p["prompt"] + p["chosen"] + p["rejected"] for p in PAIRS] * 3, vocab_size=280)
    policy = tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0).double()
    ref = tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=1).double()
    pos = tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=2)
    neg = tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3).eval()
    # The positive model learns two of the rejected chains, so its contrastive scores s_t are high there and low on
    # the others: real weights 1 - s_t spread over (0, 1), as a scoring pass gives them.
    texts = [
        tok(PAIRS[i]["prompt"] + PAIRS[i]["rejected"] + tok.eos_token, return_tensors="pt").input_ids for i in (0, 2)
    ]
    optimizer = torch.optim.AdamW(pos.parameters(), lr=1e-2)
    for _ in range(60):
        for ids in texts:
            optimizer.zero_grad()
            pos(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
    pos.eval()
    columns = score_contrastive(Dataset.from_list(PAIRS), pos, neg, tok, ce_beta=1.0, score_chosen=True)
    kept = columns.pop("kept_rows")
    assert kept == list(range(len(PAIRS)))
    data = Dataset.from_list([{**p, **{k: v[i] for k, v in columns.items()}} for i, p in enumerate(PAIRS)])
    weights = [w for row in columns["rejected_weights"] for w in row]
    assert max(weights) - min(weights) > 0.3  # real, spread weights
    return tok, policy, ref, data, tmp_path_factory.mktemp("cdpo64")


def reference_critical_dpo(policy, ref, batch, beta, reduction, weighting):
    """Token-weighted DPO from the paper (sequence) and the official code (position_mean), full logits."""
    policy, ref = copy.deepcopy(policy), copy.deepcopy(ref)
    cm = batch["completion_mask"]
    labels = batch["input_ids"].masked_fill(cm == 0, -100)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logps = naive_token_logps(policy(**kwargs).logits.double(), labels)
    with torch.no_grad():
        ref_logps = naive_token_logps(ref(**kwargs).logits.double(), labels)
    mask = cm[:, 1:].double()
    weights = batch["weights"][:, 1:].double() * mask
    pairs = mask.size(0) // 2
    if weighting == "rejected":
        assert torch.equal(weights[:pairs], mask[:pairs])  # chosen tokens weigh 1
    delta = weights * (logps - ref_logps) * mask
    chosen, rejected = delta[:pairs], delta[pairs:]
    if reduction == "sequence":
        loss = -torch.nn.functional.logsigmoid(beta * (chosen.sum(1) - rejected.sum(1))).mean()
    else:
        loss = -torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean()
    loss.backward()
    return loss.detach(), grads_of(policy)


@pytest.mark.parametrize("reduction", ["sequence", "position_mean"])
@pytest.mark.parametrize("weighting", ["rejected", "both"])
def test_critical_dpo_equals_float64_full_logits(cdpo, reduction, weighting):
    from tokentrain.trainers.critical_dpo import CriticalDPOConfig, CriticalDPOTrainer

    tok, policy, ref, data, out = cdpo
    args = CriticalDPOConfig(**config(out, reduction=reduction, weighting=weighting, beta=0.7))
    trainer = CriticalDPOTrainer(
        copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args, train_dataset=data, processing_class=tok
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    ref_loss, ref_grads = reference_critical_dpo(policy, ref, batch, 0.7, reduction, weighting)
    model = trainer.model.train()
    model.zero_grad()
    num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
    loss.backward()
    assert_close(loss.detach(), grads_of(model), ref_loss, ref_grads)
