"""Every objective under ddp, fsdp2, zero2 and zero3: a short training each, the saved weights reloaded, and the step
time, tokens/s and peak memory of each objective and config.

    bash bench/gpu_check.sh                        # on a machine with 1+ GPUs: the full check, under 10 minutes
    python -m bench.gpu_check [--quick] [--configs ddp,zero3] [--objectives weighted_ntp] [--processes N]
    python -m bench.gpu_check --cpu --quick        # the same code on CPU (gloo, a tiny model): a smoke run

GPU: a random Qwen2-style policy with Qwen2.5-0.5B's width and vocabulary (151,936 rows, 4 layers, tied embeddings,
196M parameters: bench/objective_cases.py QWEN2_SHAPE), bf16 (TRL's autocast over float32 weights), AdamW at lr 1e-4,
batch 4 per GPU of ~500 tokens, activation checkpointing on (TRL's default): 2 warm-up steps then 6 timed ones
(`--quick`: 1 + 3). Every GPU of the machine is a process (`--processes` to change), through the shipped accelerate
configs (ddp.yaml, fsdp2.yaml, zero2.yaml, zero3.yaml with `--num_processes` set on the command line). Each config is
one `accelerate launch` that trains every objective's case (bench/objective_cases.py: the rows with their signals
and the frozen auxiliary models), saves the final model with `trainer.save_model` (full weights from the shards),
reloads the folder as a model and checks it holds every weight and that training moved them.

Printed, per config and objective (the main process's figures; times are synchronised with the device):
    bench: gpu_check/<config>/<stem>/step_time_s <median of the timed steps> s
    bench: gpu_check/<config>/<stem>/tokens_per_s <non-padding input tokens of all processes / step time> tokens/s
    bench: gpu_check/<config>/<stem>/peak_mem_bytes <max over processes of torch.cuda.max_memory_allocated> bytes
(on CPU: peak_rss_bytes, the largest resident set size seen at a step end). A failing objective prints its error on a
`# ` line and `bench: gpu_check/<config>/<stem>/failed 1 run`, the other objectives go on, and the exit status is 1.

`--cpu` runs the configs on CPU processes (default 2): ddp with cpu.yaml; fsdp2 through accelerate's FSDP2 path, which
accelerate 1.16 only takes on an accelerator (`objective_cases.force_fsdp_on_cpu`); zero2/zero3 with DeepSpeed's CPU
accelerator and `ddp_backend: gloo`. bench/scaling.py reuses `prepare` and `run_config`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("ddp", "fsdp2", "zero2", "zero3")
CONFIG_DIR = REPO / "tokentrain" / "shipped" / "accelerate_configs"

# (policy shape, tokenizer vocab, sentences per completion, batch per process, warm-up steps, timed steps)
SETTINGS = {
    "gpu": dict(shape="qwen2", vocab=2048, sentences=32, batch=4, warmup=2, timed=6),
    "gpu_quick": dict(shape="qwen2", vocab=2048, sentences=32, batch=4, warmup=1, timed=3),
    "cpu": dict(shape="small", vocab=4096, sentences=8, batch=4, warmup=2, timed=6),
    "cpu_quick": dict(shape="tiny", vocab=300, sentences=1, batch=2, warmup=1, timed=2),
}


def note(message: str) -> None:
    print(f"# {message}", flush=True)


def emit(name: str, value, unit: str) -> None:
    value = f"{value:.4g}" if isinstance(value, float) else value
    print(f"bench: {name} {value} {unit}", flush=True)


# ------------------------------------------------------------------------------------------------- the parent


def prepare(work: Path, settings: dict, objectives: list[str], processes: int) -> tuple[Path, Path]:
    """Build the policy and every objective's case into `work` (kept and reused when `work/prepared.json` says the
    same settings); returns (policy folder, cases folder)."""
    from bench.objective_cases import build_case, build_policy

    work = Path(work)
    rows = settings["batch"] * processes * (settings["warmup"] + settings["timed"])
    wanted = {**settings, "objectives": objectives, "rows": rows}
    stamp = work / "prepared.json"
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return work / "policy", work / "cases"
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    policy = build_policy(work / "policy", shape=settings["shape"], vocab=settings["vocab"])
    for stem in objectives:
        build_case(stem, policy, work / "cases" / stem, rows=rows, sentences=settings["sentences"])
    stamp.write_text(json.dumps(wanted))
    note(
        f"policy ({settings['shape']}) and {len(objectives)} cases of {rows} rows built in {time.time() - start:.0f} s"
    )
    return policy, work / "cases"


def launch_command(config: str, processes: int, cpu: bool) -> tuple[list[str], dict]:
    """`accelerate launch` of the worker with the shipped config `config`, and its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_", "RANK", "WORLD_SIZE"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    shipped = "cpu" if cpu and config == "ddp" else config
    if cpu:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
        if config in ("ddp", "fsdp2"):
            env["ACCELERATE_USE_CPU"] = "true"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / f"{shipped}.yaml")]
    command += ["--num_processes", str(processes), "--main_process_port", "0", "-m", "bench.gpu_check", "--worker"]
    return command, env


def run_config(
    work: Path,
    config: str,
    processes: int,
    cpu: bool,
    settings: dict,
    objectives: list[str],
    save: bool,
    timeout: float,
) -> list[dict]:
    """One launch of `config` training every objective; returns the worker's records (one per objective)."""
    out = Path(work) / "runs" / f"{config}_{processes}p"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    job = {"config": config, "cpu": cpu, "save": save, "objectives": objectives, **settings}
    (out / "job.json").write_text(json.dumps(job))
    command, env = launch_command(config, processes, cpu)
    command += ["--work", str(work), "--out", str(out)]
    start = time.time()
    with open(out / "launch.log", "w") as log:
        try:
            proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    results = (
        [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        if (out / "results.jsonl").exists()
        else []
    )
    done = {r["stem"] for r in results}
    for stem in objectives:
        if stem not in done:
            tail = (out / "launch.log").read_text()[-1500:]
            results.append({"stem": stem, "config": config, "error": f"launch ended ({code}) before it: ...{tail}"})
    note(f"{config} x {processes} processes: launch {time.time() - start:.0f} s (log: {out / 'launch.log'})")
    return results


def device_description(cpu: bool) -> tuple[int, str]:
    import torch

    if cpu:
        return 0, "cpu"
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run `python -m bench.gpu_check --cpu --quick` for the CPU smoke run")
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return torch.cuda.device_count(), " / ".join(names)


def main(argv: list[str] | None = None) -> int:
    from tokentrain.objectives import OBJECTIVES

    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help="folder for the policy, cases and runs (default: a temp folder)")
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", action="store_true", help="run on CPU processes (gloo) instead of GPUs")
    parser.add_argument("--quick", action="store_true", help="fewer steps (CPU: the tests' tiny model)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {','.join(CONFIGS)}")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated objective stems")
    parser.add_argument("--processes", type=int, default=None, help="processes per config (default: GPUs, or 2)")
    parser.add_argument("--timeout", type=float, default=170, help="seconds per config launch")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole check: a launch gets at most what is left, a config with under 30 s left is "
        "skipped and reported failed (bench/gpu_check.sh: 570, inside its hard 590 s stop)",
    )
    a = parser.parse_args(argv)
    from tokentrain.runtime import quiet_console

    quiet_console()
    if a.worker:
        return worker(Path(a.work), Path(a.out))

    configs = [c for c in a.configs.split(",") if c]
    objectives = [s for s in a.objectives.split(",") if s]
    unknown = [c for c in configs if c not in CONFIGS] + [s for s in objectives if s not in OBJECTIVES]
    if unknown:
        parser.error(f"unknown config or objective: {unknown}")
    if any(c.startswith("zero") for c in configs):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            note("DeepSpeed is not installed (pip install -e '.[deepspeed]'): zero2/zero3 will fail")
    gpus, device = device_description(a.cpu)
    processes = a.processes or (2 if a.cpu else gpus)
    settings = SETTINGS[("cpu" if a.cpu else "gpu") + ("_quick" if a.quick else "")]
    import tempfile

    import torch

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    note(
        f"device: {device}{f' x {gpus}' if gpus else ''}; {processes} processes per config; torch {torch.__version__}"
        f"; policy {settings['shape']}, batch {settings['batch']} per process, {settings['warmup']} warm-up + "
        f"{settings['timed']} timed steps; work folder {work}"
    )
    emit("gpu_check/device", processes, device.replace(" ", "_"))
    start = time.time()
    prepare(work, settings, objectives, processes)
    failed = 0
    for config in configs:
        timeout = a.timeout
        if a.budget is not None:
            timeout = min(timeout, a.budget - (time.time() - start))
            if timeout < 30:
                note(f"{config} skipped: {timeout:.0f} s left of the {a.budget:.0f} s budget")
                for stem in objectives:
                    failed += 1
                    emit(f"gpu_check/{config}/{stem}/failed", 1, "run")
                continue
        for r in run_config(work, config, processes, a.cpu, settings, objectives, save=True, timeout=timeout):
            name = f"gpu_check/{config}/{r['stem']}"
            if r.get("error"):
                failed += 1
                note(f"{name} failed: {r['error']}")
                emit(f"{name}/failed", 1, "run")
                continue
            emit(f"{name}/step_time_s", r["step_time_s"], "s")
            emit(f"{name}/tokens_per_s", r["tokens_per_s"], "tokens/s")
            key = "peak_rss_bytes" if a.cpu else "peak_mem_bytes"
            emit(f"{name}/{key}", r[key], "bytes")
            note(
                f"{name}: {r['processes']} processes ({r['distributed_type']}), {r['tokens_per_step']:.0f} tokens per "
                f"step, saved {r['saved_parameters']:,} parameters ({r['saved_dtype']}), reloaded, moved by up to "
                f"{r['moved']:.3g}"
            )
    note(f"total {time.time() - start:.0f} s; {failed} failed runs")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------- the worker


def _timing_callback(cuda: bool):
    import psutil
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time of each optimizer step (forward, backward, optimizer; the batch is fetched before on_step_begin),
        the device synchronised at both ends; the input tokens counted by the Trainer at each step end; RSS."""

        def __init__(self):
            self.times, self.seen, self.rss, self.t0 = [], [], 0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            self.seen.append(state.num_input_tokens_seen)
            self.rss = max(self.rss, psutil.Process().memory_info().rss)

    return StepClock()


def train_one(case_dir: Path, policy: Path, out: Path, job: dict) -> dict:
    """Train one objective's case as the job says; returns its figures (on every process)."""
    import torch

    from bench.objective_cases import Case, make_trainer, reload_check, saved_weights

    cuda = not job["cpu"]
    case = Case.load(case_dir)
    args = dict(
        per_device_train_batch_size=job["batch"],
        gradient_accumulation_steps=1,
        max_steps=job["warmup"] + job["timed"],
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=job["warmup"] + job["timed"],
        save_strategy="no",
        bf16=cuda,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=cuda,
    )
    if job["cpu"] and job["config"].startswith("zero"):
        args["ddp_backend"] = "gloo"  # accelerate finds no CPU backend of its own under DeepSpeed
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = make_trainer(case, policy, out / case.stem / "run", **args)
    clock = _timing_callback(cuda)
    trainer.add_callback(clock)
    trainer.train()
    acc = trainer.accelerator
    timed = clock.times[job["warmup"] :]
    tokens = (
        [b - a for a, b in zip(clock.seen[job["warmup"] - 1 : -1], clock.seen[job["warmup"] :])]
        if job["warmup"]
        else clock.seen
    )
    peak = torch.cuda.max_memory_allocated() if cuda else clock.rss
    peak = int(acc.gather(torch.tensor([peak], device=acc.device)).max())
    record = {
        "stem": case.stem,
        "config": job["config"],
        "processes": acc.num_processes,
        "distributed_type": str(acc.distributed_type).split(".")[-1],
        "step_time_s": statistics.median(timed),
        "tokens_per_step": sum(tokens) / len(tokens),
        "tokens_per_s": sum(tokens) / sum(timed),
        "peak_mem_bytes" if cuda else "peak_rss_bytes": peak,
        "step_times_s": timed,
    }
    if job["save"]:
        folder = out / case.stem / "model"
        trainer.save_model(str(folder))
        acc.wait_for_everyone()
        if acc.is_main_process:
            saved = saved_weights(folder)
            record["saved_parameters"] = reload_check(folder, saved)
            initial = saved_weights(policy)
            record["moved"] = max(  # against the initial weights rounded to the saved dtype (bf16 under ZeRO)
                (saved[k].float() - initial[k].to(saved[k].dtype).float()).abs().max().item()
                for k in saved
                if k in initial
            )
            record["saved_dtype"] = str(next(iter(saved.values())).dtype).removeprefix("torch.")
            if record["moved"] == 0:
                raise ValueError(f"{folder}: the saved weights equal the initial policy's: training did not move them")
        acc.wait_for_everyone()
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return record


def worker(work: Path, out: Path) -> int:
    """Inside `accelerate launch`: train every objective of the job, append one JSON line per objective (main
    process) to `<out>/results.jsonl`. An objective that raises on every rank is recorded and the next one runs."""
    job = json.loads((out / "job.json").read_text())
    if job["cpu"] and job["config"] == "fsdp2":
        from bench.objective_cases import force_fsdp_on_cpu

        force_fsdp_on_cpu()
    from accelerate import PartialState

    from tokentrain.runtime import exit_process

    for stem in job["objectives"]:
        try:
            record = train_one(work / "cases" / stem, work / "policy", out, job)
        except Exception as e:  # the same error on every rank (a config the objective does not support): go on
            message = "".join(traceback.format_exception_only(e)).strip()
            print(f"{stem} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            record = {"stem": stem, "config": job["config"], "error": message[-2000:]}
            gc.collect()
        state = PartialState()
        if state.is_main_process:
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        state.wait_for_everyone()
    return exit_process(0)


if __name__ == "__main__":
    sys.exit(main())
