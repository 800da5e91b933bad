"""Weighted NTP against TRL: step time and step peak memory of `WeightedNTPTrainer` vs `SFTTrainer`, and the loss's
peak memory through TRL's fused LM head vs naive full logits.

    python -m bench.weighted_ntp [--quick]

Prints one `bench: <name> <value> <unit>` line per figure; lines starting with `#` give the setup and the spread.
Method, figures and caveats: bench/RESULTS.md.

1. Step time. A tiny Llama (hidden 256, 4 layers, tied embeddings, vocab 8192 from a BPE trained in code), the same
   64 rows cut to 256 tokens, batch 8 x 256, float32, TRL's SFTConfig defaults otherwise (gradient checkpointing on,
   fused AdamW). Four trainers: TRL's `SFTTrainer` and `WeightedNTPTrainer` with weighting prior, rho1 and column.
   Each trains in its own thread and a turnstile lets exactly one run at a time, one optimizer step per turn, cycle
   after cycle (the order rotated each cycle): A, B, C, D, B, C, D, A, ... so that steps compared with each other
   ran seconds apart under the same load. A callback stamps `on_step_begin` and `on_step_end` (forward, backward,
   clipping, optimizer step, zero_grad) and the end of the turn (the next batch's loading and collation included:
   "iter"). Per cycle, ratio = tokentrain step / TRL step; the figure is the median over cycles after warm-up.
   The same run times `compute_loss` outside the model's forward ("loss overhead": loss math, metric gathers,
   `.item()`), the place where tokentrain adds work.
2. Step peak memory. The last cycle's step of each trainer runs under `torch.profiler` (`profile_memory=True`): the
   CPU allocator's alloc/free events, summed in time order, give the peak of bytes allocated during the step and
   still live, the CPU analogue of `torch.cuda.max_memory_allocated()` minus the bytes allocated at step start
   (which is what is read on CUDA). Exact and repeatable: no OS page accounting.
3. Loss peak memory. Hidden states 4 x 512 x 256 (float32) and an LM head of vocab 32k or 128k: per-token
   log-probs, weighted NLL (`losses.weighted_ntp.weighted_nll`) and backward, (a) through TRL's chunked log-prob
   function called exactly as `add_fused_lm_head` calls it (on CPU every position is scored, in tiles of 4096 tokens
   x 32768 vocab; outputs as `SFTTrainer` asks: log_probs, entropy, is_top1), (b) naively: `hidden @ W.T`,
   `log_softmax`, gather (`tokens.naive_token_logps`). Peak bytes as in 2; the inputs exist before the window.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging

from tokentrain.data import completion_ids_of, tokenize_row
from tokentrain.losses.weighted_ntp import weighted_nll
from tokentrain.models import tiny_llama, train_tokenizer
from tokentrain.tokens import naive_token_logps, target_mask

VOCAB = 8192
BATCH = 8
SEQ = 256
N_ROWS = 64
MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688, max_positions=SEQ)
WEIGHTINGS = ("prior", "rho1", "column")
LOSS_SHAPE = (4, 512, 256)  # B, T, H for the loss-memory figures
LOSS_VOCABS = {"v32k": 32768, "v128k": 131072}


def emit(name: str, value: float, unit: str) -> None:
    """One figure, in the form every bench module prints."""
    text = f"{value:d}" if isinstance(value, int) else f"{value:.3f}"
    print(f"bench: {name} {text} {unit}", flush=True)


def note(text: str) -> None:
    print(f"# {text}", flush=True)


# ---------------------------------------------------------------------------------------------------------- data


def make_corpus(n_lines: int, n_words: int, seed: int = 0) -> list[str]:
    """Lines of pseudo-words drawn Zipf-like from a 20k lexicon: enough distinct pairs for a BPE of 8192 tokens."""
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lengths = torch.randint(2, 10, (20000,), generator=g)
    lexicon = ["".join(letters[i] for i in torch.randint(0, 26, (int(n),), generator=g)) for n in lengths]
    ranks = torch.arange(1, len(lexicon) + 1, dtype=torch.float64)
    probs = 1.0 / ranks**1.05
    lines = []
    for _ in range(n_lines):
        words = torch.multinomial(probs, n_words, replacement=True, generator=g)
        lines.append(" ".join(lexicon[i] for i in words))
    return lines


def make_rows(tokenizer, lines: list[str], seed: int = 0) -> list[dict]:
    """prompt/completion rows with the signals a scoring pass writes: completion_ids, ref_logps, token_weights."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for line in lines:
        words = line.split(" ")
        row = {"prompt": "<s>" + " ".join(words[:12]) + "<sep>", "completion": " " + " ".join(words[12:])}
        ids = tokenize_row(row, tokenizer)
        target = completion_ids_of(ids["input_ids"], ids["labels"])
        n = len(target)
        row["completion_ids"] = target
        row["ref_logps"] = (-torch.empty(n).exponential_(0.5, generator=g)).tolist()  # mean NLL 2 nats
        row["token_weights"] = torch.empty(n).uniform_(0.0, 2.0, generator=g).tolist()
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------ trainers


class Turnstile:
    """Lets one trainer thread run at a time, in the order of `schedule` (a list of trainer names).

    A thread holds its turn from `on_step_begin` to its next `on_step_begin` (or `on_train_end`): the step, then the
    logging and the next batch's loading and collation. Nothing of two trainers ever overlaps, so a step is timed
    alone, and consecutive steps of different trainers see the same load on the machine.
    """

    def __init__(self, schedule: list[str]):
        self.schedule = schedule
        self.pos = 0
        self.failed = False
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.failed or self.schedule[self.pos] == name)
            if self.failed:
                raise RuntimeError("another trainer thread failed")

    def advance(self) -> None:
        with self.cond:
            self.pos += 1
            self.cond.notify_all()

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()


class TurnTimer(TrainerCallback):
    """Waits for its trainer's turn at each `on_step_begin`, then stamps the step (to `on_step_end`) and the turn (to
    the release at the next `on_step_begin`: the step, logging, the next batch's loading and collation). Step
    `probe_step` (1-based) runs under a `PeakWindow`: its peak memory is measured, its time is not used."""

    def __init__(self, name: str, turnstile: Turnstile, probe_step: int):
        self.name, self.turnstile, self.probe_step = name, turnstile, probe_step
        self.steps: list[float] = []
        self.turns: list[float] = []
        self.peak: int | None = None
        self._acquired = self._window = None

    def _release(self) -> None:
        if self._acquired is not None:
            sync()
            self.turns.append(time.perf_counter() - self._acquired)
            self._acquired = None
            self.turnstile.advance()

    def on_step_begin(self, args, state, control, **kwargs):
        self._release()
        self.turnstile.wait(self.name)
        if state.global_step + 1 == self.probe_step:
            self._window = PeakWindow(args.device).__enter__()
        sync()
        self._acquired = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.steps.append(time.perf_counter() - self._acquired)
        if self._window is not None:
            self._window.__exit__(None, None, None)
            self.peak, self._window = self._window.peak, None

    def on_train_end(self, args, state, control, **kwargs):
        self._release()


def time_loss_overhead(trainer, models=None) -> list[float]:
    """Patch `trainer` so that each `compute_loss` call appends its time outside the models' forwards (seconds).

    `models`: the modules whose `forward` time is subtracted (default: the trainer's model; DPO adds its reference)."""
    times: list[float] = []
    inside = []
    compute_loss = trainer.compute_loss

    def timed(forward):
        def timed_forward(*args, **kwargs):
            sync()
            t = time.perf_counter()
            out = forward(*args, **kwargs)
            sync()
            inside.append(time.perf_counter() - t)
            return out

        return timed_forward

    def timed_compute_loss(*args, **kwargs):
        inside.clear()
        sync()
        t = time.perf_counter()
        out = compute_loss(*args, **kwargs)
        sync()
        times.append(time.perf_counter() - t - sum(inside))
        return out

    for model in [trainer.model] if models is None else models:
        model.forward = timed(model.forward)
    trainer.compute_loss = timed_compute_loss
    return times


def sync() -> None:
    """Wait for queued GPU work, so that a timestamp means the work is done (nothing to wait for on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PeakWindow:
    """`with PeakWindow(device) as w: ...` then `w.peak`: peak bytes allocated inside the block and still live.

    CUDA: `max_memory_allocated()` minus `memory_allocated()` at entry. CPU: `torch.profiler` memory events (every
    allocation and free of the CPU allocator inside the block, with its size), summed in time order, maximum taken.
    Frees of blocks allocated before the block are not reported by the profiler, so the CPU figure can only err high,
    by the bytes of earlier tensors freed inside (the batch's inputs: kilobytes here).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._prof.__exit__(*exc)
        events = [e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            peak = max(peak, live)
        self.peak = peak


def common_args(batch: int, seq: int) -> dict:
    """Trainer-config keys every benchmarked trainer shares: same batch, length, constant LR, seed; no logging,
    saving, progress bar or bf16 (CPU)."""
    return dict(
        per_device_train_batch_size=batch,
        max_length=seq,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        bf16=False,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )


def build_trainers(out_dir: str) -> dict:
    from trl import SFTConfig, SFTTrainer

    from tokentrain.trainers.weighted_ntp import WeightedNTPConfig, WeightedNTPTrainer

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(make_corpus(400, 400, seed=1), vocab_size=VOCAB)
    rows = make_rows(tokenizer, make_corpus(N_ROWS, 120, seed=2))
    note(f"tokenizer: vocab {len(tokenizer)} trained in {time.perf_counter() - t0:.1f}s")
    common = common_args(BATCH, SEQ)
    plain = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    full = Dataset.from_list(rows)
    trainers = {}
    model = tiny_llama(tokenizer, seed=0, **MODEL)
    n_params = sum(p.numel() for p in model.parameters())
    args = SFTConfig(output_dir=os.path.join(out_dir, "trl"), **common)
    trainers["trl"] = SFTTrainer(model=model, args=args, train_dataset=plain, processing_class=tokenizer)
    for w in WEIGHTINGS:
        args = WeightedNTPConfig(output_dir=os.path.join(out_dir, w), weighting=w, **common)
        model = tiny_llama(tokenizer, seed=0, **MODEL)
        trainers[w] = WeightedNTPTrainer(model, args, train_dataset=full, processing_class=tokenizer)
    for trainer in trainers.values():
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-train metrics dict
    lengths = {len(x) for x in trainers["trl"].train_dataset["input_ids"]}
    note(
        f"model: tiny Llama, {n_params:,} parameters, hidden {MODEL['hidden_size']}, {MODEL['num_layers']} layers; "
        f"batch {BATCH} x {SEQ} tokens (row lengths {sorted(lengths)}), float32, {torch.get_num_threads()} threads"
    )
    return trainers


def train_steps(trainer, steps: int, callback: TrainerCallback) -> None:
    trainer.args.max_steps = steps
    trainer.add_callback(callback)
    try:
        trainer.train()
    finally:
        trainer.remove_callback(callback)


def interleaved_steps(trainers: dict, cycles: int) -> dict[str, TurnTimer]:
    """Train every trainer for `cycles` steps, one step at a time across trainers: cycle k runs them all once, in an
    order rotated by k. Each trainer trains in its own thread; the turnstile lets one run at a time. The last cycle's
    step is the memory probe."""
    names = list(trainers)
    schedule = [n for k in range(cycles) for n in names[k % len(names) :] + names[: k % len(names)]]
    turnstile = Turnstile(schedule)
    timers = {n: TurnTimer(n, turnstile, probe_step=cycles) for n in names}
    errors = []
    with PeakWindow("cpu"):  # the profiler's first start must happen in the main thread (kineto refuses otherwise)
        pass

    def run(name):
        try:
            train_steps(trainers[name], cycles, timers[name])
        except BaseException as e:  # noqa: B036 - re-raised in the main thread
            errors.append(e)
            turnstile.fail()

    threads = [threading.Thread(target=run, args=(n,), name=f"bench-{n}") for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return timers


def report_times(timers: dict, overheads: dict, kept: slice, baseline: str, prefix: str, variants) -> None:
    """Emit the baseline's ("trl") median step time and, per variant, the median per-cycle step-time and
    iteration-time ratios to it and the loss overheads, over the `kept` cycles of `interleaved_steps`."""
    note(f"{kept.stop - kept.start} interleaved cycles kept after {kept.start} warm-up, order rotated each cycle")
    steps = {n: t.steps[kept] for n, t in timers.items()}
    turns = {n: t.turns[kept] for n, t in timers.items()}
    note("median step time: " + ", ".join(f"{n} {statistics.median(x):.3f}s" for n, x in steps.items()))
    emit(f"{baseline}/step_time_s", statistics.median(steps["trl"]), "s")
    for v in variants:
        ratios = [a / b for a, b in zip(steps[v], steps["trl"])]
        emit(f"{prefix}/{v}_step_time_vs_trl", statistics.median(ratios), "ratio")
        note(
            f"{v} step-time ratio per cycle: {spread(ratios)}; ratio of minima {min(steps[v]) / min(steps['trl']):.3f}"
        )
    for v in variants:
        ratios = [a / b for a, b in zip(turns[v], turns["trl"])]
        emit(f"{prefix}/{v}_iter_time_vs_trl", statistics.median(ratios), "ratio")
        note(f"{v} iteration-time ratio per cycle: {spread(ratios)}")
    emit(f"{baseline}/loss_overhead_ms", 1000 * statistics.median(overheads["trl"][kept]), "ms")
    for v in variants:
        emit(f"{prefix}/{v}_loss_overhead_ms", 1000 * statistics.median(overheads[v][kept]), "ms")


def bench_trainers(quick: bool) -> None:
    warmup, cycles = (1, 3) if quick else (2, 16)
    with tempfile.TemporaryDirectory() as out_dir:
        trainers = build_trainers(out_dir)
        overheads = {n: time_loss_overhead(t) for n, t in trainers.items()}
        timers = interleaved_steps(trainers, warmup + cycles + 1)  # + 1: the memory probe
    report_times(timers, overheads, slice(warmup, warmup + cycles), "trl_sft", "weighted_ntp", WEIGHTINGS)

    peaks = {n: t.peak for n, t in timers.items()}
    emit("weighted_ntp/peak_mem_vs_trl", peaks["prior"] / peaks["trl"], "ratio")
    emit("weighted_ntp/peak_mem_bytes", peaks["prior"], "bytes")
    emit("trl_sft/peak_mem_bytes", peaks["trl"], "bytes")
    note("step peak bytes: " + ", ".join(f"{n} {p:,}" for n, p in peaks.items()))


def spread(values: list[float]) -> str:
    """n, quartiles and range of per-cycle ratios, for the noise note."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"n={len(values)} median {q[1]:.3f}, IQR {q[0]:.3f}-{q[2]:.3f}, range {min(values):.3f}-{max(values):.3f}"


# ---------------------------------------------------------------------------------------------------------- loss


def fused_logps(hidden, weight, labels, outputs=("log_probs", "entropy", "is_top1")):
    """Per-token log-probs (B, T-1) exactly as `trl.trainer.utils.add_fused_lm_head` computes them."""
    from trl.kernels.chunked_logprob import _use_triton
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

    hidden, labels = hidden[:, :-1], labels[:, 1:]
    mask = labels != -100  # (B, T-1)
    compact = _use_triton(hidden.device)  # on CUDA only valid positions are scored; elsewhere every position
    h = hidden[mask] if compact else hidden.reshape(-1, hidden.size(-1))
    t = labels[mask] if compact else labels.clamp(min=0).reshape(-1)
    logps = _ChunkedLogProbFunction.apply(h, weight, None, t, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)[0]
    if compact:
        return logps.new_zeros(mask.shape).masked_scatter(mask, logps)
    return logps.view(mask.shape).masked_fill(~mask, 0.0)


def naive_logps(hidden, weight, labels):
    logits = hidden @ weight.T  # (B, T, V)
    return naive_token_logps(logits, labels)


def loss_inputs(vocab: int, device="cpu", seed: int = 0):
    B, T, H = LOSS_SHAPE
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(device).requires_grad_()
    weight = (torch.randn(vocab, H, generator=g) * H**-0.5).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[:, : T // 8] = -100  # a prompt
    weights = torch.empty(B, T - 1).uniform_(0.0, 2.0, generator=g)
    return hidden, weight, labels.to(device), weights.to(device)


def loss_step(logps_fn, hidden, weight, labels, weights) -> float:
    """Log-probs -> weighted NLL -> backward; returns the loss so that both variants can be checked equal."""
    mask = target_mask(labels)  # (B, T-1)
    loss = weighted_nll(logps_fn(hidden, weight, labels), weights, mask, mask.sum())
    loss.backward()
    return loss.item()


def bench_loss(quick: bool) -> None:
    vocabs = {"v32k": LOSS_VOCABS["v32k"]} if quick else LOSS_VOCABS
    device = "cuda" if torch.cuda.is_available() else "cpu"
    note(f"loss: B, T, H = {LOSS_SHAPE}, float32, on {device}")
    for fn in (naive_logps, fused_logps):  # warm-up at a small vocab: lazy inits
        loss_step(fn, *loss_inputs(1024, device))
    for tag, vocab in vocabs.items():
        peaks, losses = {}, {}
        for name, fn in (("naive", naive_logps), ("fused", fused_logps)):
            inputs = loss_inputs(vocab, device)  # allocated before the window: not counted
            with PeakWindow(device) as window:
                losses[name] = loss_step(fn, *inputs)
            peaks[name] = window.peak
            del inputs
        if abs(losses["naive"] - losses["fused"]) > 1e-4 * abs(losses["naive"]):
            raise AssertionError(f"{tag}: naive loss {losses['naive']} != fused loss {losses['fused']}")
        emit(f"weighted_ntp/loss_peak_mem_naive_vs_fused_{tag}", peaks["naive"] / peaks["fused"], "ratio")
        emit(f"weighted_ntp/loss_peak_mem_naive_{tag}_bytes", peaks["naive"], "bytes")
        emit(f"weighted_ntp/loss_peak_mem_fused_{tag}_bytes", peaks["fused"], "bytes")


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.weighted_ntp", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed cycles instead of 16, vocab 32k only")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    logging.getLogger("tokentrain").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    note(f"torch {torch.__version__}, {os.cpu_count()} CPUs, quick={args.quick}")
    bench_trainers(args.quick)
    bench_loss(args.quick)
    note(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
