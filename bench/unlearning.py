"""Unlearning: throughput of the WHP labels pass against a bare forward of the same two models, and the step time of
`UnlearningTrainer` (whp, ga, npo, simnpo, npo + retain term) against TRL's `SFTTrainer`.

    python -m bench.unlearning [--quick]

Prints one `bench: <name> <value> <unit>` line per figure; lines starting with `#` give the setup and the spread.

Data: Alice's Adventures in Wonderland (../shared/data/text/alice.txt.gz, when present) in blocks of <= 128 tokens with
the shipped 49-term dictionary (recipes/unlearning/alice_terms.yaml), tokenised by a byte-level BPE of 2,048 tokens
trained in code on the book (the labels pass reads the first 160 blocks); without the shared data, the quickstart's
synthetic book and its 5 terms. Models: the mini experiment's Llama (hidden 128, 4 layers, 4 heads, MLP 384, tied
embeddings), float32, baseline seed 0 and "reinforced" seed 1; the same backbone with a 32,768-row LM head for the
"v32k" figures (a real vocabulary's share of the work in the head).

1. Labels pass (`signals.whp_labels.score_whp_labels`, everything it does: tokenising each row and its translation
   with offsets, matching the dictionary, aligning, both backbones, the LM heads on the weighted positions only, argmax)
   against a bare forward of the same two models on the same token sequences in the same batches (the baseline on the
   translated rows, the reinforced model on the originals; `model(input_ids, attention_mask).logits`, as a plain HF
   scoring loop does). Throughput = (original + translated tokens) / seconds. The two alternate, order rotated each
   cycle, so each ratio compares runs seconds apart under the same load; the figure is the median over cycles of
   bare time / pass time (>= 1: the pass is as fast as a bare forward). The share of the pass spent before any model
   runs (tokenising, matching, aligning) is noted.
2. Step time: `bench.weighted_ntp.interleaved_steps` (one thread per trainer, one optimizer step per turn, order
   rotated each cycle): TRL `SFTTrainer` on the plain rows and `UnlearningTrainer` with each loss on the same rows plus
   the labels pass's columns (whp) or the reference log-probs (npo); batch 16 x <= 128 tokens; TRL's SFTConfig defaults
   otherwise. Per cycle, ratio = unlearning step / SFT step; the figure is the median. npo_retain (lambda 1) runs a
   second forward and backward on a retain micro-batch of as many rows: about 2x by construction.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import datasets
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback
from transformers.utils import logging as hf_logging

from bench.weighted_ntp import common_args, emit, interleaved_steps, note, report_times, spread, time_loss_overhead

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384, max_positions=512)
BLOCK = 128
BATCH = 16
VOCAB = 2048
LABEL_ROWS = 160  # the labels pass's rows: 10 batches
LOSSES = ("whp", "ga", "npo", "simnpo", "npo_retain")


# ---------------------------------------------------------------------------------------------------------- data


def book_rows():
    """(forget rows, anchored terms, tokenizer, what): Alice with its dictionary, or the synthetic book."""
    from tokentrain.config import default_data_dir
    from tokentrain.signals.anchors import AnchorTerms, load_anchor_terms, read_text, text_blocks
    from tokentrain.stages.prepare_unlearning import SYNTHETIC_TERMS, bpe_tokenizer, synthetic_texts

    alice = Path(default_data_dir()) / "text" / "alice.txt.gz"
    if alice.exists():
        text = read_text(alice)
        anchors = load_anchor_terms(ROOT / "recipes" / "unlearning" / "alice_terms.yaml")
        what = "Alice (49 terms)"
    else:
        text, _ = synthetic_texts(100, 25, seed=0)
        anchors = AnchorTerms.from_pairs(list(SYNTHETIC_TERMS.items()))
        what = "the synthetic book (5 terms; ../shared/data absent)"
    tokenizer = bpe_tokenizer([text], VOCAB)
    rows = [{"prompt": "", "completion": b} for b in text_blocks(text, tokenizer, BLOCK)]
    return rows, anchors, tokenizer, what


def llama(tokenizer, seed: int, vocab: int | None = None):
    config = LlamaConfig(
        vocab_size=vocab or len(tokenizer),
        hidden_size=MODEL["hidden_size"],
        num_hidden_layers=MODEL["num_layers"],
        num_attention_heads=MODEL["num_heads"],
        num_key_value_heads=MODEL["num_heads"],
        intermediate_size=MODEL["intermediate_size"],
        max_position_embeddings=MODEL["max_positions"],
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


# --------------------------------------------------------------------------------------------------- labels pass


def bench_labels(rows, anchors, tokenizer, cycles: int) -> None:
    from accelerate import Accelerator

    from tokentrain.signals.whp_labels import _prepare_row

    accelerator = Accelerator(cpu=True)
    prepared = [_prepare_row(i, r, tokenizer, anchors, None)[0] for i, r in enumerate(rows)]
    order = sorted(range(len(prepared)), key=lambda i: -max(len(prepared[i].s_ids), len(prepared[i].z_ids)))
    batches = [[prepared[i] for i in order[k : k + BATCH]] for k in range(0, len(order), BATCH)]
    n_tokens = sum(len(r.s_ids) + len(r.z_ids) for r in prepared)
    note(
        f"labels pass: {len(rows)} rows, {n_tokens:,} tokens (original + translated), batch {BATCH}, "
        f"{sum(r.n_matches for r in prepared)} anchored-term matches"
    )

    prep = min(timed(lambda: [_prepare_row(i, r, tokenizer, anchors, None) for i, r in enumerate(rows)]) for _ in "123")
    for tag, vocab in (("", None), ("_v32k", 32768)):
        baseline, reinforced = llama(tokenizer, 0, vocab), llama(tokenizer, 1, vocab)
        times = time_labels_pass(rows, anchors, tokenizer, baseline, reinforced, batches, cycles, accelerator)
        ratios = [b / p for b, p in zip(times["bare"], times["labels"])]
        emit(f"unlearning/labels_tokens_per_s{tag}", n_tokens / statistics.median(times["labels"]), "tokens/s")
        emit(f"unlearning/bare_forward_tokens_per_s{tag}", n_tokens / statistics.median(times["bare"]), "tokens/s")
        emit(f"unlearning/labels_throughput_vs_bare_forward{tag}", statistics.median(ratios), "ratio")
        note(
            f"vocab {vocab or len(tokenizer)}: per-cycle ratio {spread(ratios)}; tokenise + match + align "
            f"{prep:.2f} s of the pass's median {statistics.median(times['labels']):.2f} s"
        )


def timed(fn) -> float:
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        fn()
    return time.perf_counter() - t


def time_labels_pass(rows, anchors, tokenizer, baseline, reinforced, batches, cycles, accelerator) -> dict:
    """Seconds per run of the bare forward and of the labels pass, alternating (order rotated each cycle)."""
    from tokentrain.signals.whp_labels import _pad, score_whp_labels

    pad = tokenizer.pad_token_id

    @torch.no_grad()
    def bare():
        for batch in batches:
            for model, key in ((baseline, "z_ids"), (reinforced, "s_ids")):
                ids, mask = _pad([getattr(r, key) for r in batch], pad)
                model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V), as a plain scoring loop

    def labels():
        score_whp_labels(rows, baseline, reinforced, tokenizer, anchors, 5.0, batch_size=BATCH, accelerator=accelerator)

    timed(bare), timed(labels)  # warm-up
    times = {"bare": [], "labels": []}
    for k in range(cycles):
        runs = (("bare", bare), ("labels", labels))
        for name, fn in runs if k % 2 == 0 else runs[::-1]:
            times[name].append(timed(fn))
    return times


# ------------------------------------------------------------------------------------------------------ trainers


def build_trainers(rows, anchors, tokenizer, out_dir: str) -> dict:
    from trl import SFTConfig, SFTTrainer

    from tokentrain.signals.ref_logps import score_ref_logps
    from tokentrain.signals.whp_labels import score_whp_labels
    from tokentrain.trainers.unlearning import UnlearningConfig, UnlearningTrainer

    forget, retain = rows[:64], rows[64:128] if len(rows) >= 128 else rows[:64]
    with contextlib.redirect_stdout(io.StringIO()):
        columns, _ = score_whp_labels(forget, llama(tokenizer, 0), llama(tokenizer, 1), tokenizer, anchors, 5.0)
    _, ref = score_ref_logps(forget, llama(tokenizer, 0), tokenizer)
    signals = [{**r, **{k: v[i] for k, v in columns.items()}, "ref_logps": ref[i]} for i, r in enumerate(forget)]
    common = common_args(BATCH, BLOCK + 2)  # a block and its BOS/EOS: nothing is cut
    trainers = {"trl": SFTTrainer(
        llama(tokenizer, 0), SFTConfig(output_dir=os.path.join(out_dir, "trl"), **common),
        train_dataset=Dataset.from_list(forget), processing_class=tokenizer,
    )}  # fmt: skip
    for name in LOSSES:
        loss = name.split("_")[0]
        extra = {"retain_weight": 1.0, "retain_dataset": "retain rows"} if name == "npo_retain" else {}
        args = UnlearningConfig(output_dir=os.path.join(out_dir, name), unlearning_loss=loss, **common, **extra)
        trainers[name] = UnlearningTrainer(
            llama(tokenizer, 0),
            args,
            train_dataset=Dataset.from_list(signals),
            processing_class=tokenizer,
            retain_dataset=Dataset.from_list(retain) if extra else None,
        )
    for trainer in trainers.values():
        trainer.remove_callback(PrinterCallback)
    n_params = sum(p.numel() for p in trainers["trl"].model.parameters())
    note(
        f"trainers: {n_params:,} parameters, batch {BATCH} blocks of <= {BLOCK} tokens, float32, "
        f"{torch.get_num_threads()} threads, gradient checkpointing {trainers['trl'].args.gradient_checkpointing}"
    )
    return trainers


def bench_trainers(rows, anchors, tokenizer, quick: bool) -> None:
    warmup, cycles = (1, 3) if quick else (2, 12)
    with tempfile.TemporaryDirectory() as out_dir:
        trainers = build_trainers(rows, anchors, tokenizer, out_dir)
        overheads = {n: time_loss_overhead(t) for n, t in trainers.items()}
        timers = interleaved_steps(trainers, warmup + cycles + 1)  # + 1: the memory probe
    report_times(timers, overheads, slice(warmup, warmup + cycles), "unlearning/trl_sft", "unlearning", LOSSES)
    peaks = {n: t.peak for n, t in timers.items()}
    for name in LOSSES:
        emit(f"unlearning/{name}_peak_mem_vs_trl", peaks[name] / peaks["trl"], "ratio")


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.unlearning", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed cycles instead of 12 (labels pass: 3 not 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("tokentrain").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    note(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, quick={args.quick}")
    rows, anchors, tokenizer, what = book_rows()
    note(f"data: {what}, {len(rows)} blocks, vocab {len(tokenizer)}")
    bench_labels(rows[:LABEL_ROWS], anchors, tokenizer, 3 if args.quick else 7)
    bench_trainers(rows, anchors, tokenizer, args.quick)
    note(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
