"""Scoring passes against the plain forward: throughput ratio and peak-memory ratio of every scoring pass
(ref_logps, contrastive, whp_labels, aligndistil_alpha) vs the naive code over the same batches, at V = 8k, 32k, 128k.

    python -m bench.scoring [--quick] [--rows N] [--reps R] [--vocabs 8192,32768,131072]

Prints `bench: scoring/<pass>/v<k>/throughput_ratio <x> ratio` and `bench: scoring/<pass>/v<k>/peak_mem_ratio <x>
ratio`; lines starting with `#` give the setup, each side's median seconds and the spread of the ratios.

Setup (issue 15): Llamas with hidden 256, 4 layers, 4 heads, MLP 688, tied embeddings, float32, vocabulary V (the
rows use the first 512 ids: a BPE trained in code; the head is V wide all the same); rows of 40-600 tokens (prompt 12
pseudo-words, the rest completion), batches of 8 sorted by length, one torch thread (`--threads`).

- The pass: the scoring function itself, from the dataset rows (tokenisation, sorting, padding and `.tolist()`
  included), with two different models (seeds 0, 1) for the two-model passes; `head_path` "auto".
- The plain forward: the same rows tokenised beforehand (not timed: the plain side is favoured), padded into the same
  batches, then per batch `model(input_ids, attention_mask).logits` of each model, the scored positions selected, and
  the pass's arithmetic on those full logits: log_softmax -> gather (ref_logps); `contrastive_scores`
  (contrastive); `generic_labels` and the baseline argmax (whp_labels); log_softmax of both, `distribution_distance`,
  `token_alpha` (aligndistil_alpha); results to lists.
- Throughput ratio = plain seconds / pass seconds (> 1: the pass is faster). The two sides alternate (ABBA order
  across repetitions) after one warm-up each, so load on the shared machine falls on both; the figure is the median
  of `--reps` per-repetition ratios, the spread is printed.
- Peak memory: one run of each side under `torch.profiler` (`profile_memory=True`), the CPU allocator's alloc/free
  events summed in time order, maximum taken (`bench.weighted_ntp.PeakWindow`): the peak of live tensor bytes
  allocated during the run, the CPU analogue of `torch.cuda.max_memory_allocated()`. Chosen over RSS high-water
  (which counts the interpreter, the models and allocator caching, and needs a process per figure) and tracemalloc
  (which does not see torch's allocations). Ratio = pass peak / plain peak (< 1: the pass uses less).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from bench.weighted_ntp import PeakWindow, emit, make_corpus, note, spread  # noqa: E402
from tokentrain.data import split_preference_row, tokenize_row  # noqa: E402
from tokentrain.losses.aligndistil import TeacherSettings, distribution_distance, token_alpha  # noqa: E402
from tokentrain.losses.critical_dpo import contrastive_scores  # noqa: E402
from tokentrain.losses.unlearning import generic_labels  # noqa: E402
from tokentrain.models import train_tokenizer  # noqa: E402
from tokentrain.signals.aligndistil_alpha import score_aligndistil_alpha  # noqa: E402
from tokentrain.signals.contrastive import score_contrastive  # noqa: E402
from tokentrain.signals.ref_logps import score_ref_logps  # noqa: E402
from tokentrain.signals.whp_labels import score_whp_labels  # noqa: E402
from tokentrain.tokens import IGNORE_INDEX  # noqa: E402

PASSES = ("ref_logps", "contrastive", "whp_labels", "aligndistil_alpha")
FULL = dict(vocabs=(8192, 32768, 131072), rows=16, reps=5, lengths=(40, 600), hidden=256, layers=4, mlp=688)
QUICK = dict(vocabs=(1024, 2048, 4096), rows=8, reps=5, lengths=(20, 80), hidden=64, layers=2, mlp=128)
BATCH = 8
ALPHA = 5.0
SETTINGS = TeacherSettings(r=5.0)


# ---------------------------------------------------------------------------------------------------------- setup


def make_rows(tokenizer, n_rows: int, lengths: tuple[int, int]) -> list[dict]:
    """prompt/completion rows of evenly spread token counts in `lengths`, plus `chosen` (the completion) and
    `rejected` (the completion + " no") for the preference passes, which score prompt + rejected (contrastive) or
    prompt + chosen (aligndistil_alpha): every pass scores about the same tokens."""
    lines = make_corpus(n_rows, 2 * lengths[1], seed=3)
    rows = []
    for k, line in enumerate(lines):
        target = lengths[0] + (lengths[1] - lengths[0]) * k // max(n_rows - 1, 1)
        words = line.split(" ")
        prompt = "<s>" + " ".join(words[:12]) + "<sep>"
        lo, hi = 13, len(words)  # the completion's word count giving about `target` tokens in all
        while lo < hi:
            mid = (lo + hi) // 2
            n = len(
                tokenize_row({"prompt": prompt, "completion": " " + " ".join(words[12:mid])}, tokenizer)["input_ids"]
            )
            lo, hi = (mid + 1, hi) if n < target else (lo, mid)
        completion = " " + " ".join(words[12:lo])
        rows.append({"prompt": prompt, "completion": completion, "chosen": completion, "rejected": completion + " no"})
    return rows


def make_model(vocab: int, sizes: dict, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=sizes["hidden"],
        num_hidden_layers=sizes["layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=sizes["mlp"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def batches_of(seqs: list[tuple[list[int], int]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask, predicts) per batch of 8, longest first, right-padded; `seqs` holds (ids, index of
    the first scored position); predicts (B, T-1) marks the positions whose next token is scored."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out = []
    for start in range(0, len(order), BATCH):
        batch = [seqs[i] for i in order[start : start + BATCH]]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        predicts = torch.zeros((len(batch), width - 1), dtype=torch.bool)
        for b, (ids, first) in enumerate(batch):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
            predicts[b, first - 1 : len(ids) - 1] = True
        out.append((input_ids, attention_mask, predicts))
    return out


# ------------------------------------------------------------------------------------------ the two sides, per pass


def plain_logits(model, input_ids, attention_mask, predicts) -> torch.Tensor:
    """The naive code's (N, V) logits of the scored positions: full (B, T, V) logits, then the selection."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][predicts]


@contextlib.contextmanager
def quiet():
    """The passes print their setup line and progress bars: not part of the figures."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def sides(name: str, rows: list[dict], tokenizer, models, accelerator):
    """(pass(), plain()) callables of one scoring pass over `rows`."""
    data = Dataset.from_list(rows)
    a, b = models
    if name == "ref_logps":
        tokens = [tokenize_row(r, tokenizer) for r in rows]
        seqs = [(t["input_ids"], next(j for j, x in enumerate(t["labels"]) if x != IGNORE_INDEX)) for t in tokens]

        def run_pass():
            with quiet():
                return score_ref_logps(data, a, tokenizer, batch_size=BATCH, accelerator=accelerator)

        def arithmetic(batch, logits):
            targets = batch[0][:, 1:][batch[2]]
            return torch.log_softmax(logits[0], dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)

        one_model = True
    else:
        splits = [split_preference_row(r, tokenizer) for r in rows]
        side = "rejected" if name == "contrastive" else "chosen"
        if name == "whp_labels":
            tokens = [tokenize_row(r, tokenizer) for r in rows]
            seqs = [(t["input_ids"], next(j for j, x in enumerate(t["labels"]) if x != IGNORE_INDEX)) for t in tokens]
        else:
            seqs = [(s["prompt_ids"] + s[f"{side}_ids"], len(s["prompt_ids"])) for s in splits]
        one_model = False

        def run_pass():
            with quiet():
                if name == "contrastive":
                    kw = dict(max_prompt_length=None, max_length=None, batch_size=BATCH, accelerator=accelerator)
                    return score_contrastive(data, a, b, tokenizer, **kw)
                if name == "whp_labels":
                    return score_whp_labels(
                        data, a, b, tokenizer, None, ALPHA, batch_size=BATCH, accelerator=accelerator
                    )
                pc = data.select_columns(["prompt", "chosen"])
                return score_aligndistil_alpha(pc, a, b, tokenizer, SETTINGS, BATCH, accelerator=accelerator)

        def arithmetic(batch, logits):
            if name == "contrastive":
                targets = batch[0][:, 1:][batch[2]]
                return contrastive_scores(logits[0], logits[1], targets, torch.ones_like(targets, dtype=torch.bool))
            if name == "whp_labels":
                return logits[0].argmax(dim=-1), generic_labels(logits[0], logits[1], ALPHA)
            logp_d = torch.log_softmax(logits.pop(0), dim=-1)  # each (N, V) selection freed once log-softmaxed
            logp_o = torch.log_softmax(logits.pop(0), dim=-1)
            d = distribution_distance(logp_d, logp_o, SETTINGS.distance)
            return d, token_alpha(d, SETTINGS)

    batches = batches_of(seqs)

    def run_plain():
        results = []
        with torch.no_grad():
            for batch in batches:
                logits = [plain_logits(m, *batch) for m in (models[:1] if one_model else models)]
                out = arithmetic(batch, logits)
                counts = batch[2].sum(dim=1).tolist()
                for t in out if isinstance(out, tuple) else (out,):
                    results.append([x.tolist() for x in t.split(counts)])
        return results

    return run_pass, run_plain


# ---------------------------------------------------------------------------------------------------- measurement


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, vocab: int, rows, tokenizer, sizes, reps: int, accelerator) -> None:
    models = (make_model(vocab, sizes, 0), make_model(vocab, sizes, 1))
    run_pass, run_plain = sides(name, rows, tokenizer, models, accelerator)
    run_pass(), run_plain()  # warm-up: allocator, oneDNN primitives
    t_pass, t_plain, ratios = [], [], []
    for rep in range(reps):
        if rep % 2 == 0:
            tp, tn = timed(run_pass), timed(run_plain)
        else:
            tn, tp = timed(run_plain), timed(run_pass)
        t_pass.append(tp)
        t_plain.append(tn)
        ratios.append(tn / tp)
    peaks = []
    for fn in (run_pass, run_plain):
        with PeakWindow("cpu") as window:
            fn()
        peaks.append(window.peak)
    tag = f"scoring/{name}/v{vocab // 1024}k"
    note(
        f"{tag}: pass {statistics.median(t_pass):.2f}s, plain {statistics.median(t_plain):.2f}s (medians); "
        f"ratios {spread(ratios)}; peak pass {peaks[0] / 2**20:.1f} MiB, plain {peaks[1] / 2**20:.1f} MiB"
    )
    emit(f"{tag}/throughput_ratio", statistics.median(ratios), "ratio")
    emit(f"{tag}/peak_mem_ratio", peaks[0] / peaks[1], "ratio")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and rows, V = 1k, 2k, 4k (seconds)")
    parser.add_argument("--rows", type=int, help="rows per pass (full: 16, quick: 8)")
    parser.add_argument("--reps", type=int, help="timed repetitions per side (default 5)")
    parser.add_argument("--vocabs", help="comma-separated vocabulary sizes (full: 8192,32768,131072)")
    parser.add_argument("--passes", default=",".join(PASSES), help="comma-separated passes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core machine)")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    logging.getLogger("tokentrain").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    sizes = dict(QUICK if args.quick else FULL)
    vocabs = [int(v) for v in args.vocabs.split(",")] if args.vocabs else sizes["vocabs"]
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(make_corpus(400, 40, seed=1), vocab_size=512)
    rows = make_rows(tokenizer, args.rows or sizes["rows"], sizes["lengths"])
    n_tokens = sum(len(tokenize_row(r, tokenizer)["input_ids"]) for r in rows)
    note(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} thread(s), load {os.getloadavg()}; "
        f"{len(rows)} rows, {n_tokens} tokens, batch {BATCH}; hidden {sizes['hidden']}, {sizes['layers']} layers"
    )
    accelerator = Accelerator(cpu=True)
    for vocab in vocabs:
        for name in args.passes.split(","):
            measure(name, vocab, rows, tokenizer, sizes, args.reps or sizes["reps"], accelerator)
    note(f"done in {time.perf_counter() - t0:.0f}s, load {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
