"""Topology equivalence of every objective: 2 processes give the 1-process run's losses and weights, under DDP, FSDP2
and DeepSpeed ZeRO-2/3, on CPU.

Each objective's case comes from bench/objective_cases.py (rows with its signals, its frozen auxiliary models saved to
folders). One `accelerate launch` per topology trains every objective's 2-process run (tests/scripts/topology_train.py;
process start-up is the slow part); the 1-process references run in this process with the same code. Plain SGD,
fp32, sequential order, 5 steps of 2 processes x batch 2 against 1 process with the same global batch of 4 (batch 4,
or batch 2 x 2 accumulation micro-batches where padding is part of the loss: critical_dpo's position_mean). Compared:
every logged loss (1e-5) and every saved weight (1e-5) after `save_model` (full weights gathered from the shards, read
back by loading the folder as a model).

Topologies, each with the shipped accelerate config (`--num_processes 2 --main_process_port 0` on the command line):
- `ddp`: accelerate_configs/cpu.yaml, gloo (ACCELERATE_USE_CPU=true).
- `fsdp2`: accelerate_configs/fsdp2.yaml (FSDP2, full shard, FULL_STATE_DICT). accelerate 1.16 runs FSDP only on an
  accelerator's process group: on CPU it silently trains with DDP (`test_accelerate_ignores_fsdp_on_cpu` records
  this). `objective_cases.force_fsdp_on_cpu` lets accelerate's own FSDP2 path (fully_shard, TRL's prepare_fsdp, the
  full state dict) run on the gloo group, which PyTorch's fully_shard supports.
- `zero2`, `zero3`: accelerate_configs/zero2.yaml / zero3.yaml with DeepSpeed's CPU accelerator and
  `ddp_backend="gloo"` (without it accelerate sees a world of 1 while DeepSpeed sees 2: the AssertionError recorded in
  `test_deepspeed_on_cpu_needs_the_gloo_backend`).

Under sharding the test also checks where the weights live (`placement`): the policy and every frozen model (reference,
DPO / reverse teachers, the concept heads) hold half their elements on each process under FSDP2 and ZeRO-3 (TRL's
placement: a sharded inference engine, never a full replica), a stage-0 DeepSpeed replica under ZeRO-2, the plain
model under DDP.

The test policy ties its LM head to the embedding; `test_untied_lm_head_under_zero3` repeats the ZeRO-3 comparison
with an untied head (its own parameter, partitioned apart: what most large models have), which the tied policy cannot
show (aligndistil failed there until its loss output became a named tuple that DeepSpeed's hooks see).

Default suite: the DDP parametrisations (one launch, ~25 s, and the 1-process references, ~5 s), the case registry
check and the GPU script's CPU smoke run (~35 s). Slow (`-m slow`, run by CI): FSDP2, ZeRO-2 and ZeRO-3 (one launch
each, ~25-40 s), ZeRO-3 with the untied head (one launch), the 2-process kill and resume runs, the recorded
accelerate/DeepSpeed behaviours on CPU and the GPU script's sharded configs on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.objective_cases import CASES, Case, build_case, build_policy, missing_cases, saved_weights
from tokentrain.objectives import OBJECTIVES

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "topology_train.py"
CONFIGS = REPO / "accelerate_configs"
ATOL = 1e-5
STEPS = 5
STEMS = sorted(OBJECTIVES)

# The 2-process run of every objective; the 1-process reference overrides the layout with its case's single_process.
TRAIN_ARGS = dict(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=1,
    max_steps=STEPS,
    optim="sgd",
    learning_rate=0.3,
    lr_scheduler_type="constant",
    warmup_steps=0,
    max_grad_norm=0.0,
    weight_decay=0.0,
    logging_steps=1,
    save_strategy="no",
    train_sampling_strategy="sequential",
    max_length=None,
    bf16=False,
    report_to="none",
    disable_tqdm=True,
    seed=0,
)

# name -> (shipped config, environment, trainer args, script flags, the distributed type the run must report)
TOPOLOGIES = {
    "ddp": ("cpu.yaml", {"ACCELERATE_USE_CPU": "true"}, {}, [], "MULTI_CPU"),
    "fsdp2": ("fsdp2.yaml", {"ACCELERATE_USE_CPU": "true"}, {}, ["--cpu_fsdp"], "FSDP"),
    "zero2": ("zero2.yaml", {}, {"ddp_backend": "gloo"}, [], "DEEPSPEED"),
    "zero3": ("zero3.yaml", {}, {"ddp_backend": "gloo"}, [], "DEEPSPEED"),
}
SHARDED = ("fsdp2", "zero3")
# DDP (one launch of every objective, ~25 s on 2 cores) runs in the default suite; FSDP2, ZeRO-2 and ZeRO-3 are slow.
TOPOLOGY_PARAMS = [pytest.param(t, marks=() if t == "ddp" else pytest.mark.slow) for t in TOPOLOGIES]


def _single_process_env(extra: dict) -> dict:
    """This environment without any launcher's variables (a test may itself run under SLURM or accelerate)."""
    launcher = ("SLURM_", "ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_objective_has_a_case():
    """A new objective in OBJECTIVES needs a case in bench/objective_cases.py CASES (the topology tests, the GPU check
    and the scaling benchmark all iterate over it)."""
    assert missing_cases() == [], f"objectives without a case in bench/objective_cases.py: {missing_cases()}"
    assert set(CASES) <= set(OBJECTIVES), f"cases of unknown objectives: {sorted(set(CASES) - set(OBJECTIVES))}"


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    """callable(shape) -> (policy folder, cases folder): a tiny policy of `shape` ("tiny": tied embeddings,
    "tiny_untied": its own LM head) and every objective's case on it, built once per shape."""
    cache = {}

    def get(shape):
        if shape not in cache:
            root = tmp_path_factory.mktemp(f"topology_{shape}")
            policy = build_policy(root / "policy", shape=shape)
            for stem in CASES:
                build_case(stem, policy, root / "cases" / stem)
            cache[shape] = policy, root / "cases"
        return cache[shape]

    return get


@pytest.fixture(scope="module")
def workspace(workspaces):
    """The tests' tiny policy (tied embeddings) and every objective's case: (policy folder, cases folder)."""
    return workspaces("tiny")


def _import_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("topology_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(workspaces, tmp_path_factory):
    """callable(stem, shape="tiny") -> (log history, saved weights) of the 1-process run, trained once per stem."""
    script, cache = _import_script(), {}

    def get(stem, shape="tiny"):
        if (stem, shape) not in cache:
            policy, cases = workspaces(shape)
            out = tmp_path_factory.mktemp(f"single_{shape}")
            layout = Case.load(cases / stem).single_process
            record = script.run_one(policy, cases, out, stem, stem, {**TRAIN_ARGS, **layout})
            cache[(stem, shape)] = (record["log"], saved_weights(out / stem / "model"))
        return cache[(stem, shape)]

    return get


def launch(topology: str, policy: Path, cases: Path, out: Path) -> subprocess.CompletedProcess:
    config, env_extra, args, flags, _ = TOPOLOGIES[topology]
    runs = out / "runs.json"
    runs.write_text(json.dumps([{"name": s, "stem": s, "args": {**TRAIN_ARGS, **args}} for s in sorted(CASES)]))
    env = _single_process_env({"PYTHONPATH": str(REPO), **env_extra})
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    command += ["--num_processes", "2", "--main_process_port", "0", str(SCRIPT)]
    command += ["--policy", str(policy), "--cases", str(cases), "--runs", str(runs), "--out", str(out), *flags]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def launched(workspaces, tmp_path_factory):
    """callable(topology, shape="tiny") -> its output folder, every objective trained in one launch (once each)."""
    cache = {}

    def get(topology, shape="tiny"):
        if (topology, shape) not in cache:
            if topology.startswith("zero"):
                pytest.importorskip(
                    "deepspeed", reason="DeepSpeed is not installed (pip install tokentrain[deepspeed])"
                )
            policy, cases = workspaces(shape)
            out = tmp_path_factory.mktemp(f"{topology}_{shape}")
            start = time.time()
            proc = launch(topology, policy, cases, out)
            print(
                f"{topology} ({shape}): accelerate launch of {len(CASES)} objectives x 2 processes: "
                f"{time.time() - start:.1f} s"
            )
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
            cache[(topology, shape)] = out
        return cache[(topology, shape)]

    return get


def _losses(log):
    return [h["loss"] for h in log if "loss" in h]


def _result(out: Path, topology: str, stem: str, shape: str = "tiny") -> dict:
    """The 2-process run's record; fails with the error every rank recorded if the run raised."""
    if stem not in CASES:
        pytest.fail(f"objective {stem!r} has no case in bench/objective_cases.py CASES: add one so it is tested here")
    folder = out / stem
    errors = sorted(folder.glob("error_*.txt"))
    if errors:
        pytest.fail(f"{stem} under {topology} ({shape}) failed on every rank: {errors[0].read_text()}")
    return json.loads((folder / "log.json").read_text())


# --------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("topology", TOPOLOGY_PARAMS)
def test_two_processes_equal_one(launched, reference, workspaces, topology, stem):
    """2 processes x batch 2 (DDP, FSDP2, ZeRO-2, ZeRO-3) = 1 process, global batch 4: every step's loss and every
    saved weight within 1e-5; the saved folder reloads as a model holding exactly the saved tensors."""
    _check_two_equal_one(launched, reference, workspaces, topology, stem, "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("stem", STEMS)
def test_untied_lm_head_under_zero3(launched, reference, workspaces, stem):
    """The same comparison under ZeRO-3 with a policy whose LM head is its own parameter (most large models: Llama-3,
    Qwen2.5-7B): ZeRO-3 partitions the head apart from the embedding, so reading it outside the head's module (the
    fused LM head, aligndistil's chunked loss) must gather it and leave its gradient where DeepSpeed reduces it."""
    _check_two_equal_one(launched, reference, workspaces, "zero3", stem, "tiny_untied")


def _check_two_equal_one(launched, reference, workspaces, topology, stem, shape):
    out = launched(topology, shape)
    record = _result(out, topology, stem, shape)
    assert record["processes"] == 2 and record["distributed_type"] == TOPOLOGIES[topology][4], record
    log, weights = reference(stem, shape)
    losses = _losses(record["log"])
    assert len(losses) == STEPS and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses == pytest.approx(_losses(log), rel=0, abs=ATOL)

    saved = saved_weights(out / stem / "model")
    assert record["reloaded_parameters"] > 0
    extra = set(saved) - set(weights)
    # FSDP2's full state dict holds a tied head as its own tensor: saved twice, equal, and reloaded tied
    assert extra <= {"lm_head.weight"} and set(weights) <= set(saved), (
        sorted(extra),
        sorted(set(weights) - set(saved)),
    )
    for name in extra:
        torch.testing.assert_close(saved[name], saved["model.embed_tokens.weight"], atol=0, rtol=0)
    initial = saved_weights(workspaces(shape)[0])
    moved = max((weights[k] - initial[k]).abs().max().item() for k in weights if k in initial)
    assert moved > 100 * ATOL, f"training moved the weights by {moved}: the comparison would be vacuous"
    if shape == "tiny_untied":  # the head's own gradient reached it (concept_heads keeps lm_head frozen: CAFT)
        head = (weights["lm_head.weight"] - initial["lm_head.weight"]).abs().max().item()
        if stem == "concept_heads":
            assert head == 0 and torch.equal(saved["lm_head.weight"], initial["lm_head.weight"]), head
        else:
            assert head > 10 * ATOL, f"training moved the untied LM head by {head} only"
    for name, tensor in weights.items():
        torch.testing.assert_close(saved[name], tensor, atol=ATOL, rtol=0, msg=f"{topology} {stem}: {name}")
    loss_gap = max(abs(a - b) for a, b in zip(losses, _losses(log)))
    weight_gap = max((saved[k] - weights[k]).abs().max().item() for k in weights)
    print(f"{topology} ({shape}) {stem}: loss gap {loss_gap:.2g}, weight gap {weight_gap:.2g}, moved {moved:.2g}")


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("topology", TOPOLOGY_PARAMS)
def test_where_the_weights_live(launched, workspace, topology, stem):
    """The policy and the frozen models are placed as TRL places a reference model: sharded like the policy under
    FSDP2 and ZeRO-3 (each process holds about half, never a full replica), a DeepSpeed stage-0 replica under ZeRO-2
    (the policy is not sharded there either), the plain model under DDP (no DDP wrapper for a frozen model)."""
    out = launched(topology)
    _result(out, topology, stem)
    case = Case.load(workspace[1] / stem)
    places = [json.loads((out / stem / f"placement_{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(places[0]) == sorted(["model", *case.aux_attributes]), places[0]
    for name in places[0]:
        local = [p[name]["local"] for p in places]
        full, wrapper = places[0][name]["full"], places[0][name]["wrapper"]
        if topology in SHARDED:
            # each process holds its shard: at most half (+ ZeRO-3's alignment padding), together at least all
            assert all(0 < n <= full // 2 + 64 for n in local) and sum(local) >= full, (name, local, full)
        else:
            assert local == [full, full], (name, local, full)
        if name in ("model", "aux_heads"):
            continue  # the heads are part of the policy's module, wrapped with it
        expected = {"ddp": "LlamaForCausalLM", "zero2": "DeepSpeedEngine", "zero3": "DeepSpeedEngine"}
        if topology == "fsdp2":
            assert wrapper.startswith("FSDP"), (name, wrapper)
        else:
            assert wrapper == expected[topology], (name, wrapper)


PROBE = """
import os
from accelerate import Accelerator
accelerator = Accelerator()
print("distributed_type", str(accelerator.distributed_type).split(".")[-1], "num_processes", accelerator.num_processes)
"""


@pytest.mark.slow
def test_accelerate_ignores_fsdp_on_cpu():
    """What the README records: accelerate 1.16 given an FSDP2 config on CPU (ACCELERATE_USE_CPU=true, as torchrun's
    workers see it from `accelerate launch --config_file accelerate_configs/fsdp2.yaml`) picks MULTI_CPU, i.e. DDP,
    without a warning. If this starts to fail, accelerate runs FSDP on CPU itself and force_fsdp_on_cpu can go."""
    env = _single_process_env(
        {
            "ACCELERATE_USE_CPU": "true",
            "ACCELERATE_USE_FSDP": "true",
            "FSDP_VERSION": "2",
            "LOCAL_RANK": "0",
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
        }
    )
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_type MULTI_CPU num_processes 1" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_deepspeed_on_cpu_needs_the_gloo_backend(workspace, tmp_path):
    """Without `ddp_backend: gloo`, accelerate 1.16 on a CPU-only machine finds no backend (world of 1) while
    DeepSpeed's CPU accelerator joins both processes: the engine refuses the batch arithmetic. The README quotes this
    error; with ddp_backend gloo the same launch trains (test_two_processes_equal_one[zero2-*])."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install tokentrain[deepspeed])")
    policy, cases = workspace
    runs = tmp_path / "runs.json"
    args = {**TRAIN_ARGS, "max_steps": 1}
    runs.write_text(json.dumps([{"name": "weighted_ntp", "stem": "weighted_ntp", "args": args}]))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "zero2.yaml")]
    command += ["--num_processes", "2", "--main_process_port", "0", str(SCRIPT), "--policy", str(policy)]
    command += ["--cases", str(cases), "--runs", str(runs), "--out", str(tmp_path / "out")]
    env = {**_single_process_env({}), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the script records the error and goes on
    message = (tmp_path / "out" / "weighted_ntp" / "error_0.txt").read_text()
    assert message.startswith("AssertionError: Check batch related parameters. train_batch_size is not equal to "), (
        message
    )
    assert "2 != 2 * 1 * 2" in message


# ---------------------------------------------------------------------------------------------- resume (2 processes)

KILLER = REPO / "tests" / "scripts" / "train_until_killed_dist.py"
KILL_AFTER, RESUME_STEPS = 4, 6
# topology -> (accelerate config, environment, stage keys): DeepSpeed on CPU needs the gloo backend named
RESUME_TOPOLOGIES = {
    "ddp": ("cpu.yaml", {"ACCELERATE_USE_CPU": "true"}, {}),
    "zero3": ("zero3.yaml", {}, {"ddp_backend": "gloo"}),
}


def _resume_stage(workspace, folder: Path, topology: str) -> Path:
    """A `train` stage of weighted_ntp (prior) on the case's rows: 2 processes x batch 2 x GA 2, shuffled, AdamW with a
    linear schedule (optimiser, scheduler, RNG and data order must all come back), 6 steps of 8 rows over 24 rows
    (3 steps an epoch: the kill after checkpoint-4 falls inside the second epoch), a checkpoint every 2 steps."""
    import yaml

    policy, cases = workspace
    case = Case.load(cases / "weighted_ntp")
    rows = folder / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in case.rows))
    stage = {
        "stage": "train",
        "objective": "weighted_ntp",
        "model": str(policy),
        "dataset": str(rows),
        "output_dir": str(folder / "out"),
        "seed": 3,
        **case.config,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": RESUME_STEPS,
        "save_steps": 2,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "bf16": False,
        "disable_tqdm": True,
        **RESUME_TOPOLOGIES[topology][2],
    }
    path = folder / "stage.yaml"
    path.write_text(yaml.safe_dump(stage))
    return path


def _launch_cli(topology: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    config, env_extra, _ = RESUME_TOPOLOGIES[topology]
    env = _single_process_env({"PYTHONPATH": str(REPO), **env_extra})
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    command += ["--num_processes", "2", "--main_process_port", "0", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("topology", list(RESUME_TOPOLOGIES))
def test_killed_two_process_run_resumes_to_the_uninterrupted_weights(workspace, tmp_path, topology):
    """Kill a 2-process `tokentrain train` right after checkpoint-4 (both ranks, once both saved), run the same
    command again: it resumes from checkpoint-4 with both ranks' RNG states (and, under ZeRO-3, DeepSpeed's sharded
    optimizer checkpoint) and ends with the weights of an uninterrupted 2-process run of the same stage."""
    if topology.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install tokentrain[deepspeed])")
    stage = _resume_stage(workspace, tmp_path, topology)
    out, tmp = tmp_path / "out", tmp_path / "out.tmp"
    train = ["-m", "tokentrain.cli", "train", str(stage)]

    killed = _launch_cli(topology, [str(KILLER), "--kill_after", str(KILL_AFTER), "train", str(stage)], tmp_path)
    assert killed.returncode != 0, killed.stdout[-2000:] + killed.stderr[-4000:]
    assert f"rank 0: killing the run after checkpoint-{KILL_AFTER}" in killed.stdout, killed.stdout[-3000:]
    assert not out.exists() and tmp.is_dir()
    assert sorted(p.name for p in tmp.glob("checkpoint-*")) == ["checkpoint-2", f"checkpoint-{KILL_AFTER}"]
    checkpoint = tmp / f"checkpoint-{KILL_AFTER}"
    for rank in (0, 1):
        assert (checkpoint / f"rng_state_{rank}.pth").is_file()
    if topology.startswith("zero"):  # a DeepSpeed checkpoint: the engine's own sharded states
        assert (checkpoint / f"global_step{KILL_AFTER}").is_dir(), sorted(p.name for p in checkpoint.iterdir())

    resumed = _launch_cli(topology, train, tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    log = resumed.stdout + resumed.stderr
    assert f"resuming from {checkpoint}" in log, log[-4000:]
    assert log.count(": loss ") == RESUME_STEPS - KILL_AFTER, log[-4000:]  # steps 5-6 only: continued
    assert (out / "model.safetensors").is_file() and not tmp.exists()

    straight = _launch_cli(topology, [*train, "--output_dir", str(tmp_path / "straight")], tmp_path)
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-4000:]
    assert (straight.stdout + straight.stderr).count(": loss ") == RESUME_STEPS

    got, expected = saved_weights(out), saved_weights(tmp_path / "straight")
    assert got.keys() == expected.keys()
    initial = saved_weights(workspace[0])
    moved = max((expected[k] - initial[k]).abs().max().item() for k in expected)
    assert moved > 1e-3, "training did not move the weights: the comparison would be vacuous"
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)


# ------------------------------------------------------------------------------------ bench/gpu_check.py on CPU


def _gpu_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    env = _single_process_env({"PYTHONPATH": str(REPO)})
    command = [sys.executable, "-m", "bench.gpu_check", "--cpu", "--quick", "--work", str(tmp_path), *args]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    figures = {}
    for line in proc.stdout.splitlines():
        if line.startswith("bench: "):
            name, value = line.split()[1:3]
            figures[name] = float(value)
    return proc, figures


def test_gpu_check_runs_on_cpu(tmp_path):
    """The GPU script's driver and worker, on CPU with the tiny model, 1 process, config ddp: every objective trains,
    saves, reloads and prints its three figures (`bash bench/gpu_check.sh` runs the same code on GPUs)."""
    proc, figures = _gpu_check(tmp_path, "--configs", "ddp", "--processes", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert figures["gpu_check/device"] == 1
    for stem in STEMS:
        for key in ("step_time_s", "tokens_per_s", "peak_rss_bytes"):
            assert figures[f"gpu_check/ddp/{stem}/{key}"] > 0, (stem, key, proc.stdout[-2000:])
        assert f"gpu_check/ddp/{stem}: 1 processes" in proc.stdout and "reloaded" in proc.stdout


@pytest.mark.slow
def test_gpu_check_sharded_configs_on_cpu(tmp_path):
    """The same driver with 2 processes under fsdp2 and zero2 (its CPU settings: the FSDP2 patch, DeepSpeed with
    gloo), for an objective without and one with frozen auxiliary models."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install tokentrain[deepspeed])")
    stems = ["weighted_ntp", "aligndistil"]
    proc, figures = _gpu_check(tmp_path, "--configs", "fsdp2,zero2", "--objectives", ",".join(stems))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for config, kind in (("fsdp2", "FSDP"), ("zero2", "DEEPSPEED")):
        for stem in stems:
            assert figures[f"gpu_check/{config}/{stem}/tokens_per_s"] > 0
            assert f"gpu_check/{config}/{stem}: 2 processes ({kind})" in proc.stdout, proc.stdout[-2000:]
