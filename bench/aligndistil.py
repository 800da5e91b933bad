"""AlignDistil against a plain SFT step: step time and step peak memory of `AlignDistilTrainer` vs TRL's `SFTTrainer` on
the same model and batch, and the loss's peak memory vs a naive full-logits implementation, at vocab 32k and 128k.

    python -m bench.aligndistil [--quick]

Prints one `bench: <name> <value> <unit>` line per figure; lines starting with `#` give the setup and the spread.
The timing and memory machinery is bench/weighted_ntp.py's (interleaved turns, `torch.profiler` peak bytes), imported.

1. Step. A Llama of hidden 256, 4 layers, 4 heads, MLP 688 (tied embeddings) with a vocabulary of 32,768 or 131,072
   rows (the tokenizer, a BPE of 8192 trained in code, uses the first rows; every logit row is computed all the
   same), float32, TRL's config defaults otherwise (gradient checkpointing on). 32 prompt/chosen rows of 256 tokens
   (prompt 24); batch 4. TRL's `SFTTrainer` trains on prompt + chosen (completion-only loss); `AlignDistilTrainer`
   (off-policy, contrastive, adaptive r 20, chunk 256) on the same rows, with two frozen copies (other seeds) of the
   model as the DPO and reverse-DPO models: an AlignDistil step is one SFT-sized student step plus two frozen
   backbone forwards and three heads per chunk (the student's recomputed in backward). Both shuffle with seed 0, so
   step k gets the same batch. Interleaved turns, one optimizer step each, order rotated per cycle; per cycle ratio =
   AlignDistil step / SFT step; the figure is the median over the kept cycles. The last cycle's step runs under the
   profiler: peak bytes allocated during the step.
2. Loss. N = 1024 response positions (4 sequences of 256), hidden 256, three heads of V rows: (a) `aligndistil_loss`
   (chunked, 256 positions at a time, recomputed in backward) and (b) `naive_aligndistil_loss` on full (N, V) logits of
   all three models, each forward + backward; peak bytes as in 1 (the inputs exist before the window), the two losses
   checked equal. Also the time of each (median of 2 runs outside the profiler).
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

import datasets
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback
from transformers.utils import logging as hf_logging

from bench.weighted_ntp import PeakWindow, common_args, emit, interleaved_steps, make_corpus, note, spread
from tokentrain.losses.aligndistil import TeacherSettings, aligndistil_loss, naive_aligndistil_loss
from tokentrain.models import train_tokenizer

VOCABS = {"v32k": 32768, "v128k": 131072}
TOKENIZER_VOCAB = 8192
BATCH, SEQ, PROMPT, N_ROWS = 4, 256, 24, 32
MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=688)
LOSS_SEQS, LOSS_LEN, LOSS_H, CHUNK = 4, 256, 256, 256
SETTINGS = TeacherSettings(r=20.0)


def make_model(tokenizer, vocab: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=SEQ,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MODEL,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_rows(tokenizer) -> list[dict]:
    """prompt/chosen/rejected rows whose prompt is PROMPT tokens and prompt + chosen (+ EOS) exactly SEQ tokens."""
    rows = []
    for line in make_corpus(N_ROWS, 600, seed=2):
        ids = tokenizer(line)["input_ids"]
        prompt = tokenizer.decode(ids[: PROMPT - 1])
        chosen = tokenizer.decode(ids[PROMPT - 1 : SEQ - 2])
        rows.append({"prompt": "<s>" + prompt, "chosen": chosen, "rejected": chosen[: len(chosen) // 2]})
    return rows


def build_trainers(out_dir: str, vocab: int) -> dict:
    from trl import SFTConfig, SFTTrainer

    from tokentrain.trainers.aligndistil import AlignDistilConfig, AlignDistilTrainer

    tokenizer = train_tokenizer(make_corpus(400, 400, seed=1), vocab_size=TOKENIZER_VOCAB)
    rows = make_rows(tokenizer)
    common = common_args(BATCH, SEQ)
    sft_rows = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    trainers = {
        "trl": SFTTrainer(
            model=make_model(tokenizer, vocab, 0),
            args=SFTConfig(output_dir=os.path.join(out_dir, "sft"), **common),
            train_dataset=sft_rows,
            processing_class=tokenizer,
        ),
        "aligndistil": AlignDistilTrainer(
            make_model(tokenizer, vocab, 0),
            AlignDistilConfig(output_dir=os.path.join(out_dir, "ad"), r=20.0, chunk_tokens=CHUNK, **common),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            dpo_model=make_model(tokenizer, vocab, 1),
            other_model=make_model(tokenizer, vocab, 2),
        ),
    }
    for trainer in trainers.values():
        trainer.remove_callback(PrinterCallback)
    lengths = sorted({len(x) for x in trainers["trl"].train_dataset["input_ids"]})
    n_params = sum(p.numel() for p in trainers["trl"].model.parameters())
    note(
        f"model: Llama hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, vocab {vocab:,}: "
        f"{n_params:,} parameters (x3 for AlignDistil: student, DPO, reverse DPO); batch {BATCH} x {lengths} tokens, "
        f"float32, {torch.get_num_threads()} threads, gradient checkpointing {trainers['trl'].args.gradient_checkpointing}"
    )
    return trainers


def bench_step(tag: str, vocab: int, quick: bool) -> None:
    warmup, cycles = (1, 3) if quick else (2, 8)
    with tempfile.TemporaryDirectory() as out_dir:
        trainers = build_trainers(out_dir, vocab)
        timers = interleaved_steps(trainers, warmup + cycles + 1)  # + 1: the memory probe
    kept = slice(warmup, warmup + cycles)
    steps = {n: t.steps[kept] for n, t in timers.items()}
    turns = {n: t.turns[kept] for n, t in timers.items()}
    note(f"{tag}: {cycles} interleaved cycles kept after {warmup} warm-up")
    emit(f"trl_sft/step_time_{tag}_s", statistics.median(steps["trl"]), "s")
    emit(f"aligndistil/step_time_{tag}_s", statistics.median(steps["aligndistil"]), "s")
    ratios = [a / b for a, b in zip(steps["aligndistil"], steps["trl"])]
    emit(f"aligndistil/step_time_vs_sft_{tag}", statistics.median(ratios), "ratio")
    note(f"{tag} step-time ratio per cycle: {spread(ratios)}")
    iters = [a / b for a, b in zip(turns["aligndistil"], turns["trl"])]
    emit(f"aligndistil/iter_time_vs_sft_{tag}", statistics.median(iters), "ratio")
    peaks = {n: t.peak for n, t in timers.items()}
    emit(f"aligndistil/peak_mem_vs_sft_{tag}", peaks["aligndistil"] / peaks["trl"], "ratio")
    emit(f"aligndistil/peak_mem_{tag}_bytes", peaks["aligndistil"], "bytes")
    emit(f"trl_sft/peak_mem_{tag}_bytes", peaks["trl"], "bytes")


# ---------------------------------------------------------------------------------------------------------- loss


def loss_inputs(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = LOSS_SEQS * LOSS_LEN
    hidden = [torch.randn(n, LOSS_H, generator=g) for _ in range(3)]  # student, DPO, other  (N, H)
    heads = [torch.randn(vocab, LOSS_H, generator=g) * LOSS_H**-0.5 for _ in range(3)]  # (V, H)
    hidden[0].requires_grad_()
    heads[0].requires_grad_()
    return hidden, heads


def chunked(hidden, heads) -> float:
    seq_index = torch.arange(hidden[0].shape[0]) // LOSS_LEN  # (N,)
    out = aligndistil_loss(
        hidden[0],
        heads[0],
        None,
        hidden[1],
        heads[1],
        None,
        hidden[2],
        heads[2],
        None,
        seq_index,
        LOSS_SEQS,
        SETTINGS,
        CHUNK,
    )
    out.loss.backward()
    return out.loss.item()


def naive(hidden, heads) -> float:
    """Full (B, T, V) logits of all three models, the naive reference's loss, backward."""
    logits = [(h @ w.T).view(LOSS_SEQS, LOSS_LEN, -1) for h, w in zip(hidden, heads)]  # 3 x (B, T, V)
    mask = torch.ones(LOSS_SEQS, LOSS_LEN, dtype=torch.bool)
    loss, _ = naive_aligndistil_loss(logits[0], logits[1].detach(), logits[2].detach(), mask, LOSS_SEQS, SETTINGS)
    loss.backward()
    return loss.item()


def bench_loss(tag: str, vocab: int, quick: bool) -> None:
    for fn in (naive, chunked):  # warm-up at a small vocabulary: lazy inits
        fn(*loss_inputs(1024))
    peaks, losses, times = {}, {}, {}
    for name, fn in (("naive", naive), ("chunked", chunked)):
        inputs = loss_inputs(vocab)  # allocated before the window: not counted
        with PeakWindow("cpu") as window:
            losses[name] = fn(*inputs)
        peaks[name] = window.peak
        runs = []
        for _ in range(1 if quick else 2):
            inputs = loss_inputs(vocab)
            t = time.perf_counter()
            fn(*inputs)
            runs.append(time.perf_counter() - t)
        times[name] = statistics.median(runs)
        del inputs
    if abs(losses["naive"] - losses["chunked"]) > 1e-4 * abs(losses["naive"]):
        raise AssertionError(f"{tag}: naive loss {losses['naive']} != chunked loss {losses['chunked']}")
    emit(f"aligndistil/loss_peak_mem_naive_vs_chunked_{tag}", peaks["naive"] / peaks["chunked"], "ratio")
    emit(f"aligndistil/loss_peak_mem_naive_{tag}_bytes", peaks["naive"], "bytes")
    emit(f"aligndistil/loss_peak_mem_chunked_{tag}_bytes", peaks["chunked"], "bytes")
    emit(f"aligndistil/loss_time_chunked_vs_naive_{tag}", times["chunked"] / times["naive"], "ratio")
    one_chunk = CHUNK * vocab * 4
    note(
        f"{tag}: one fp32 [chunk, V] buffer {one_chunk:,} bytes, one [N, V] {LOSS_SEQS * LOSS_LEN * vocab * 4:,}; "
        f"chunked peak = {peaks['chunked'] / one_chunk:.1f} chunk buffers, naive peak = "
        f"{peaks['naive'] / (LOSS_SEQS * LOSS_LEN * vocab * 4):.1f} [N, V] buffers; times {times['naive']:.2f}s naive, "
        f"{times['chunked']:.2f}s chunked"
    )


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aligndistil", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed cycles instead of 8, vocab 32k only")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("tokentrain").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    note(f"torch {torch.__version__}, {os.cpu_count()} CPUs, quick={args.quick}, load average {os.getloadavg()[0]:.1f}")
    vocabs = {"v32k": VOCABS["v32k"]} if args.quick else VOCABS
    for tag, vocab in vocabs.items():
        bench_loss(tag, vocab, args.quick)
    for tag, vocab in vocabs.items():
        bench_step(tag, vocab, args.quick)
    note(f"done in {time.perf_counter() - t0:.0f}s, load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
