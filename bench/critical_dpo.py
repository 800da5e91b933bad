"""Critical-token DPO against TRL: step time and step peak memory of `CriticalDPOTrainer` vs TRL's `DPOTrainer`.

    python -m bench.critical_dpo [--quick]

Prints one `bench: <name> <value> <unit>` line per figure; lines starting with `#` give the setup and the spread.
Method, figures and caveats: bench/RESULTS.md. The timing and memory machinery is bench/weighted_ntp.py's, imported.

A tiny Llama (hidden 256, 4 layers, tied embeddings, vocab 8192 from a BPE trained in code) as the policy and a frozen
copy of it as the explicit `ref_model`; 64 preference rows (shop-arithmetic word problems: the chosen answer works
them out correctly, the rejected one slips at one step and carries the error on), every prompt + completion longer
than 256 tokens, so each batch is 8 pairs = 16 x 256 tokens; float32, TRL's DPOConfig defaults otherwise (gradient
checkpointing on, no padding multiple on CPU). Three trainers: TRL's `DPOTrainer` (loss_type ["sigmoid"]) on
prompt/chosen/rejected, and `CriticalDPOTrainer` (weighting "rejected") with reduction `position_mean` (the default)
and `sequence`, on the same rows plus `prompt_ids`/`chosen_ids`/`rejected_ids` (`tokentrain.data.split_preference_row`)
and random `rejected_weights` in [0, 1]. All three shuffle with seed 0, so step k gets the same batch in each.

1. Step time: interleaved turns (`bench.weighted_ntp.interleaved_steps`: one thread per trainer, a turnstile lets one
   optimizer step run at a time, order rotated each cycle); per cycle, ratio = tokentrain step / TRL step; the figure
   is the median over the kept cycles. "loss overhead": `compute_loss` time outside the policy's and the reference's
   forwards (loss math, metrics, `.item()`).
2. Step peak memory: the last cycle's step of each trainer under `torch.profiler` (`bench.weighted_ntp.PeakWindow`).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import time
import warnings

import datasets
import torch
from datasets import Dataset
from transformers import PrinterCallback
from transformers.utils import logging as hf_logging

from bench.weighted_ntp import (
    common_args,
    emit,
    interleaved_steps,
    make_corpus,
    note,
    report_times,
    time_loss_overhead,
)
from tokentrain.data import split_preference_row
from tokentrain.models import tiny_llama, train_tokenizer

VOCAB = 8192
PAIRS = 8  # per_device_train_batch_size: 8 pairs = 16 sequences
SEQ = 256
N_ROWS = 64
MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688, max_positions=SEQ)
REDUCTIONS = ("position_mean", "sequence")

# ---------------------------------------------------------------------------------------------------------- data

NAMES = ["Mara", "Tomas", "Aisha", "Lena", "Kofi", "Ines", "Ravi", "Sofia", "Jonas", "Mei", "Omar", "Clara"]
SHOPS = ["bakery stall", "hardware shop", "flower stand", "book kiosk", "fruit market", "tea house", "craft fair table"]
GOODS = [
    ("loaves of rye bread", "loaf"),
    ("jars of plum jam", "jar"),
    ("boxes of nails", "box"),
    ("bunches of tulips", "bunch"),
    ("second-hand novels", "novel"),
    ("bags of green apples", "bag"),
    ("tins of black tea", "tin"),
    ("hand-painted mugs", "mug"),
    ("rolls of tape", "roll"),
    ("pots of basil", "pot"),
    ("bars of soap", "bar"),
    ("paper lanterns", "lantern"),
    ("wooden spoons", "spoon"),
    ("cartons of eggs", "carton"),
    ("packets of seeds", "packet"),
    ("woollen scarves", "scarf"),
]
DAYS = ["Saturday", "Sunday", "Friday", "Tuesday"]


def word_problem(g: torch.Generator) -> dict:
    """One prompt/chosen/rejected row: a sales sum worked out step by step; the rejected answer gets one product
    wrong and carries the error through the running totals to a wrong final answer (the critical token)."""

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=g))]

    def num(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    name, shop, day = pick(NAMES), pick(SHOPS), pick(DAYS)
    n_items = num(6, 8)
    order = torch.randperm(len(GOODS), generator=g)[:n_items].tolist()
    items = [(GOODS[i], num(3, 24), num(2, 15)) for i in order]
    fee = num(20, 60)
    listing = ", ".join(f"{q} {goods} at {p} dollars each" for (goods, _), q, p in items)
    prompt = (
        f"<s>Question: {name} runs a {shop} at the {day} market. This week {name} sold {listing}. The market "
        f"charges {fee} dollars for the stall. How much money did {name} take in, and how much is left after paying "
        f"for the stall?<sep>"
    )
    slip = num(0, 2)  # the step where the rejected answer goes wrong: inside the first 256 tokens
    error = pick([-10, -3, -2, -1, 1, 2, 3, 10])

    def answer(wrong: bool) -> str:
        parts = [" Let us work through the sales one item at a time and keep a running total."]
        total = 0
        for k, ((goods, unit), q, p) in enumerate(items):
            amount = q * p + (error if wrong and k == slip else 0)
            before, total = total, total + amount
            parts.append(f"The {goods} bring in {q} times {p}, which is {amount} dollars, at {p} dollars per {unit}.")
            if k == 0:
                parts.append(f"So the running total starts at {total} dollars.")
            else:
                parts.append(f"Adding that to {before} dollars gives a running total of {total} dollars.")
        parts.append(f"So {name} took in {total} dollars in all.")
        parts.append(f"After paying the stall fee of {fee} dollars, {total} minus {fee} leaves {total - fee} dollars.")
        parts.append(f"The answer is {total} dollars taken in and {total - fee} dollars left.")
        return " ".join(parts)

    return {"prompt": prompt, "chosen": answer(False), "rejected": answer(True)}


def make_pairs(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [word_problem(g) for _ in range(n)]


def add_signals(rows: list[dict], tokenizer, seed: int = 0) -> list[dict]:
    """The columns `tokentrain score` (`signal: contrastive`) writes: the stored split and one weight per rejected id."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for row in rows:
        ids = split_preference_row(row, tokenizer)
        weights = torch.rand(len(ids["rejected_ids"]), generator=g).tolist()
        out.append({**row, **ids, "rejected_weights": weights})
    return out


# ------------------------------------------------------------------------------------------------------ trainers


def build_trainers(out_dir: str) -> dict:
    from trl import DPOConfig, DPOTrainer

    from tokentrain.trainers.critical_dpo import CriticalDPOConfig, CriticalDPOTrainer

    t0 = time.perf_counter()
    pairs = make_pairs(N_ROWS, seed=2)
    texts = [r[k] for r in make_pairs(300, seed=1) for k in ("prompt", "chosen", "rejected")]
    tokenizer = train_tokenizer(make_corpus(400, 400, seed=1) + texts, vocab_size=VOCAB)
    rows = add_signals(pairs, tokenizer)
    note(f"tokenizer: vocab {len(tokenizer)} trained in {time.perf_counter() - t0:.1f}s")
    common = common_args(PAIRS, SEQ)
    plain = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    full = Dataset.from_list(rows)
    policy = tiny_llama(tokenizer, seed=0, **MODEL)
    n_params = sum(p.numel() for p in policy.parameters())
    trainers = {}
    args = DPOConfig(output_dir=os.path.join(out_dir, "trl"), loss_type=["sigmoid"], **common)
    trainers["trl"] = DPOTrainer(
        copy.deepcopy(policy),
        ref_model=copy.deepcopy(policy),
        args=args,
        train_dataset=plain,
        processing_class=tokenizer,
    )
    for reduction in REDUCTIONS:
        args = CriticalDPOConfig(
            output_dir=os.path.join(out_dir, reduction), reduction=reduction, weighting="rejected", **common
        )
        trainers[reduction] = CriticalDPOTrainer(
            copy.deepcopy(policy),
            ref_model=copy.deepcopy(policy),
            args=args,
            train_dataset=full,
            processing_class=tokenizer,
        )
    for trainer in trainers.values():
        trainer.remove_callback(PrinterCallback)
    split = trainers["trl"].train_dataset
    full_lengths = [
        len(p) + min(len(c), len(r))
        for p, c, r in zip(*(split[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")))
    ]
    note(
        f"model: tiny Llama, {n_params:,} parameters (x2: policy + frozen reference), hidden {MODEL['hidden_size']}, "
        f"{MODEL['num_layers']} layers; batch {PAIRS} pairs = {2 * PAIRS} x {SEQ} tokens (prompt + shorter completion "
        f"{min(full_lengths)}-{max(full_lengths)} tokens before the cut at {SEQ}), float32, "
        f"{torch.get_num_threads()} threads, gradient checkpointing {trainers['trl'].args.gradient_checkpointing}"
    )
    return trainers


def bench_trainers(quick: bool) -> None:
    warmup, cycles = (1, 3) if quick else (2, 12)
    with tempfile.TemporaryDirectory() as out_dir:
        trainers = build_trainers(out_dir)
        overheads = {n: time_loss_overhead(t, [t.model, t.ref_model]) for n, t in trainers.items()}
        timers = interleaved_steps(trainers, warmup + cycles + 1)  # + 1: the memory probe
    report_times(timers, overheads, slice(warmup, warmup + cycles), "trl_dpo", "critical_dpo", REDUCTIONS)

    peaks = {n: t.peak for n, t in timers.items()}
    emit("trl_dpo/peak_mem_bytes", peaks["trl"], "bytes")
    for r in REDUCTIONS:
        emit(f"critical_dpo/{r}_peak_mem_vs_trl", peaks[r] / peaks["trl"], "ratio")
        emit(f"critical_dpo/{r}_peak_mem_bytes", peaks[r], "bytes")


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.critical_dpo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed cycles instead of 12")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()  # TRL's per-trainer dataset preparation
    logging.getLogger("tokentrain").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    note(f"torch {torch.__version__}, {os.cpu_count()} CPUs, quick={args.quick}")
    bench_trainers(args.quick)
    note(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
