"""Concept heads (CAFT) against TRL: phase-2 step time and step peak memory of `ConceptHeadsTrainer` vs TRL's
`SFTTrainer` on the same model and batch, and the heads' loss peak memory vs a naive all-heads full-logits loss.

    python -m bench.concept_heads [--quick]

Prints one `bench: <name> <value> <unit>` line per figure; lines starting with `#` give the setup and the spread.
Method, figures and caveats: bench/RESULTS.md. The timing and memory machinery is bench/weighted_ntp.py's, imported.

1. Phase-2 step time and peak memory. A tiny Llama (hidden 256, 4 layers, tied embeddings, vocab 8192 from a BPE
   trained in code), the same 64 prompt/completion rows cut to 256 tokens, batch 8 x 256, float32, TRL's SFTConfig
   defaults otherwise (activation checkpointing on, fused AdamW). Three trainers: TRL's `SFTTrainer` (every weight
   trains), `ConceptHeadsTrainer` phase finetune, full, beta 0 ("ntp": no heads; lm_head and embeddings frozen, the
   NTP baseline of the recipes) and beta 0.01 with 4 decoder-layer heads ("caft": heads frozen, each a copy of the
   last layer, each scoring every valid target through TRL's chunked kernel). Interleaved turns
   (`bench.weighted_ntp.interleaved_steps`: one thread per trainer, one optimizer step at a time, order rotated
   each cycle); per cycle, ratio = tokentrain step / TRL step (and caft / ntp: the heads' own cost); the figure is
   the median over the kept cycles. The last cycle's step of each runs under `torch.profiler` for its peak bytes.
2. Heads' loss peak memory. Hidden states 2 x 512 x 256 (the captured input of the last layer, a leaf with gradient)
   of a 2-layer Llama with vocab 32k or 128k and 4 decoder-layer heads: the heads' term sum_i 0.8^i CE_i and its
   backward, (a) as tokentrain computes it (`AuxHeads.head_nll`: one head at a time, the valid rows through TRL's
   chunked log-prob kernel in tiles of at most 4096 x 32768), (b) naively as the official code does: every head's
   full logits lm_head(norm(head_i(h))) (B, T, V), log_softmax, gather, all alive until the backward. The two losses
   are checked equal; the heads' own layer activations are in both windows.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from datasets import Dataset
from transformers import PrinterCallback
from transformers.utils import logging as hf_logging

from bench.weighted_ntp import (
    PeakWindow,
    common_args,
    emit,
    interleaved_steps,
    make_corpus,
    note,
    report_times,
    spread,
    time_loss_overhead,
)
from tokentrain.heads import AuxHeads, AuxHeadsConfig, causal_lm, final_norm
from tokentrain.losses.concept_heads import IGNORE_INDEX, concept_heads_loss, head_targets
from tokentrain.models import tiny_llama, train_tokenizer

VOCAB = 8192
BATCH = 8
SEQ = 256
N_ROWS = 64
HEADS = 4
MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688, max_positions=SEQ)
LOSS_SHAPE = (2, 512, 256)  # B, T, d for the heads' loss memory
LOSS_VOCABS = {"v32k": 32768, "v128k": 131072}
ALPHA = 0.8


# ------------------------------------------------------------------------------------------------------ trainers


def build_trainers(out_dir: str, head_rows: int = 0) -> dict:
    """The three trainers; `head_rows` > the tokenizer's size widens the (tied) embedding and LM head to that many rows
    (a real vocabulary's share of the work in the heads; the rows' ids stay below the tokenizer's size)."""
    from trl import SFTConfig, SFTTrainer

    from tokentrain.trainers.concept_heads import ConceptHeadsConfig, ConceptHeadsTrainer

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(make_corpus(400, 400, seed=1), vocab_size=VOCAB)
    note(f"tokenizer: vocab {len(tokenizer)} trained in {time.perf_counter() - t0:.1f}s")
    rows = []
    for line in make_corpus(N_ROWS, 120, seed=2):
        words = line.split(" ")
        rows.append({"prompt": "<s>" + " ".join(words[:12]) + "<sep>", "completion": " " + " ".join(words[12:])})
    data = Dataset.from_list(rows)
    heads_dir = os.path.join(out_dir, "heads")
    model = _widened(tiny_llama(tokenizer, seed=0, **MODEL), head_rows)
    AuxHeads.attach(model, AuxHeadsConfig(HEADS, "decoder_layer")).save(heads_dir)  # phase-1 heads (at init)
    common = common_args(BATCH, SEQ)
    trainers = {}
    model = _widened(tiny_llama(tokenizer, seed=0, **MODEL), head_rows)
    n_params = sum(p.numel() for p in model.parameters())
    args = SFTConfig(output_dir=os.path.join(out_dir, "trl"), **common)
    trainers["trl"] = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    for name, beta in (("ntp", 0.0), ("caft", 0.01)):
        args = ConceptHeadsConfig(
            output_dir=os.path.join(out_dir, name),
            phase="finetune",
            finetune="full",
            beta=beta,
            num_aux_heads=HEADS,
            heads_path=heads_dir if beta > 0 else None,
            **common,
        )
        model = _widened(tiny_llama(tokenizer, seed=0, **MODEL), head_rows)
        trainers[name] = ConceptHeadsTrainer(model, args, train_dataset=data, processing_class=tokenizer)
    for trainer in trainers.values():
        trainer.remove_callback(PrinterCallback)
    lengths = {len(x) for x in trainers["trl"].train_dataset["input_ids"]}
    head_params = sum(p.numel() for p in trainers["caft"].aux_heads.parameters())
    note(
        f"model: tiny Llama, {n_params:,} parameters, hidden {MODEL['hidden_size']}, {MODEL['num_layers']} layers; "
        f"{HEADS} decoder-layer heads ({head_params:,} parameters, frozen); batch {BATCH} x {SEQ} tokens (row lengths "
        f"{sorted(lengths)}), float32, {torch.get_num_threads()} threads"
    )
    return trainers


def _widened(model, head_rows: int):
    if head_rows and head_rows > model.get_output_embeddings().weight.shape[0]:
        model.resize_token_embeddings(head_rows, mean_resizing=False)
    return model


def bench_trainers(quick: bool, head_rows: int = 0) -> None:
    warmup, cycles = (1, 3) if quick else (2, 16)
    tag = f"_v{head_rows // 1024}k" if head_rows else ""  # figure names: concept_heads_v32k/..., trl_sft_v32k/...
    with tempfile.TemporaryDirectory() as out_dir:
        trainers = build_trainers(out_dir, head_rows)
        overheads = {n: time_loss_overhead(t) for n, t in trainers.items()}
        timers = interleaved_steps(trainers, warmup + cycles + 1)  # + 1: the memory probe
    kept = slice(warmup, warmup + cycles)
    base, prefix = f"trl_sft{tag}", f"concept_heads{tag}"
    report_times(timers, overheads, kept, base, prefix, ("ntp", "caft"))
    caft, ntp = timers["caft"].steps[kept], timers["ntp"].steps[kept]
    ratios = [a / b for a, b in zip(caft, ntp)]
    emit(f"{prefix}/caft_step_time_vs_ntp", statistics.median(ratios), "ratio")
    note(f"caft / ntp step-time ratio per cycle: {spread(ratios)}")

    peaks = {n: t.peak for n, t in timers.items()}
    emit(f"{prefix}/caft_peak_mem_vs_trl", peaks["caft"] / peaks["trl"], "ratio")
    emit(f"{prefix}/ntp_peak_mem_vs_trl", peaks["ntp"] / peaks["trl"], "ratio")
    emit(f"{prefix}/caft_peak_mem_vs_ntp", peaks["caft"] / peaks["ntp"], "ratio")
    for name, peak in peaks.items():
        emit(f"{base if name == 'trl' else prefix + '/' + name}/peak_mem_bytes", peak, "bytes")


# ---------------------------------------------------------------------------------------------------------- loss


def loss_inputs(vocab: int, device: str, seed: int = 0):
    """(model with 4 heads, capture with a leaf hidden state, targets (H + 1, B, T)) for the heads' loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    B, T, d = LOSS_SHAPE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=688,
        max_position_embeddings=T,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(device)
    model.requires_grad_(False)  # frozen heads and unembedding: the gradient goes to the trunk's hidden state
    heads = AuxHeads.attach(model, AuxHeadsConfig(HEADS, "decoder_layer"))
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (B, T), generator=g).to(device)
    labels = input_ids.clone()
    labels[:, : T // 8] = IGNORE_INDEX  # a prompt
    heads.arm()
    with torch.no_grad():
        causal_lm(model).model(input_ids=input_ids, use_cache=False)
    capture = heads.read()
    capture.hidden_in = capture.hidden_in.detach().requires_grad_()  # (B, T, d): the trunk's output, with gradient
    return model, heads, capture, head_targets(labels, HEADS)


def chunked_loss(model, heads, capture, targets) -> float:
    counts = (targets != IGNORE_INDEX).sum(dim=(1, 2))  # (H + 1,)
    sums, _ = heads.head_nll(model, capture, targets)  # (H,)
    loss, _ = concept_heads_loss(torch.cat([sums.new_zeros(1), sums]), counts, ALPHA, 0.0, 0.0, include_ntp=False)
    loss.backward()
    return loss.item()


def naive_loss(model, heads, capture, targets) -> float:
    """Every head's full (B, T, V) logits, log-softmax and gather; all kept for the backward."""
    lm = causal_lm(model)
    norm, lm_head = final_norm(lm), lm.get_output_embeddings()
    loss = 0.0
    for i in range(HEADS):
        logits = lm_head(norm(heads.head_hidden(i, capture)))  # (B, T, V)
        logps = torch.log_softmax(logits.float(), dim=-1)
        target = targets[i + 1]  # (B, T)
        valid = target != IGNORE_INDEX
        nll = -logps.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)[valid].sum()
        loss = loss + ALPHA ** (i + 1) * nll / valid.sum()
    loss.backward()
    return loss.item()


def bench_loss(quick: bool) -> None:
    vocabs = {"v32k": LOSS_VOCABS["v32k"]} if quick else LOSS_VOCABS
    device = "cuda" if torch.cuda.is_available() else "cpu"
    note(f"heads' loss: B, T, d = {LOSS_SHAPE}, {HEADS} decoder-layer heads, float32, on {device}")
    for fn in (naive_loss, chunked_loss):  # warm-up at a small vocab: lazy inits
        fn(*loss_inputs(1024, device))
    for tag, vocab in vocabs.items():
        peaks, losses = {}, {}
        for name, fn in (("naive", naive_loss), ("chunked", chunked_loss)):
            inputs = loss_inputs(vocab, device)  # allocated before the window: not counted
            with PeakWindow(device) as window:
                losses[name] = fn(*inputs)
            peaks[name] = window.peak
            del inputs
        if abs(losses["naive"] - losses["chunked"]) > 1e-4 * abs(losses["naive"]):
            raise AssertionError(f"{tag}: naive loss {losses['naive']} != chunked loss {losses['chunked']}")
        emit(f"concept_heads/heads_loss_peak_mem_vs_naive_{tag}", peaks["chunked"] / peaks["naive"], "ratio")
        emit(f"concept_heads/heads_loss_peak_mem_chunked_{tag}_bytes", peaks["chunked"], "bytes")
        emit(f"concept_heads/heads_loss_peak_mem_naive_{tag}_bytes", peaks["naive"], "bytes")


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.concept_heads", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed cycles instead of 16, vocab 32k only")
    parser.add_argument(
        "--head_rows",
        type=int,
        nargs="*",
        default=[0],
        help="LM-head widths for the step-time part (0: the tokenizer's 8,192), e.g. --head_rows 32768 131072",
    )
    parser.add_argument("--skip_loss", action="store_true", help="only the step-time part")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    logging.getLogger("tokentrain").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    note(f"torch {torch.__version__}, {os.cpu_count()} CPUs, quick={args.quick}")
    for rows in args.head_rows:
        bench_trainers(args.quick, rows)
    if not args.skip_loss:
        bench_loss(args.quick)
    note(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
