"""tokentrain on a real Slurm cluster: the recipes/slurm/ sbatch scripts, submitted with `sbatch`, on CPUs.

Needs a cluster whose default partition has at least 2 nodes that take CPU jobs and share this machine's files: CI
starts one here (`bash .ci/start_slurm.sh`, as root: Debian's Slurm, with two slurmd daemons, nodes tt1 and tt2, on
loopback). Skipped, saying why, when `sinfo` is missing or fails or the partition is too small, unless
TOKENTRAIN_REQUIRE_SLURM=1 (set by .ci/run) makes that a failure. On another cluster, point
TOKENTRAIN_SLURM_TEST_DIR at a folder on a shared filesystem (the default is pytest's tmp folder).

Three jobs run the mini recipe (recipes/slurm/mini: prepare, then a 40-step SFT with checkpoints every 10 steps) with
2 gloo processes through launch.sh, submitted together:

- single:  single_node.sbatch, 1 node x 2 processes (cpu.yaml's count)
- multi:   multi_node.sbatch, 2 nodes x 1 process: c10d rendezvous on the first node of the job's node list
- requeue: requeue.sbatch, 2 nodes x 1 process. Once its first checkpoint is complete, the test sends the batch
           script USR1 (`scancel --batch --signal=USR1`), which is what `--signal=B:USR1@300` does before the time
           limit: the script's trap requeues the job, Slurm kills it and starts it again with the same job ID, and the
           second attempt skips the finished prepare stage and resumes SFT from the last complete checkpoint.

All three end with the same weights and loss history, bit for bit: 1 node x 2 = 2 nodes x 1 = 2 nodes x 1 killed and
resumed. About 3 minutes on 2 cores (the jobs share them).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "recipes" / "slurm"
MINI = EXAMPLES / "mini"
MAX_STEPS, SAVE_STEPS, LOGGING_STEPS = 40, 10, 10  # recipes/slurm/mini/01_sft.yaml
TIMEOUT = 900  # seconds for all three jobs
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _cluster_problem() -> str | None:
    """Why there is no usable cluster (None: there is one)."""
    for tool in ("sinfo", "sbatch", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} not found: no Slurm client on this machine"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P %D %a"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s"
    if proc.returncode != 0:
        return f"sinfo failed: {proc.stderr.strip() or proc.stdout.strip()}"
    default = [line.split() for line in proc.stdout.splitlines() if line.split()[0].endswith("*")]
    if not default:
        return f"no default partition in sinfo's answer: {proc.stdout.strip()!r}"
    nodes = sum(int(fields[1]) for fields in default if fields[2] == "up")
    if nodes < 2:
        return f"the default partition has {nodes} node(s) up; the test needs 2"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        message = f"no Slurm cluster: {problem} (start one here with `sudo bash .ci/start_slurm.sh`)"
        if os.environ.get("TOKENTRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _job_info(job_id: str) -> dict[str, str]:
    """A few fields of `scontrol show job` (kept MinJobAge seconds after the end: 600 on the CI cluster)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    info = {}
    for key in ("JobState", "Restarts", "ExitCode", "NodeList", "BatchFlag"):
        m = re.search(rf"\b{key}=(\S+)", out)
        if m:
            info[key] = m.group(1)
    return info


def _first_complete_checkpoint(run_dir: Path) -> Path | None:
    done = [p.parent for p in (run_dir / "sft.tmp").glob("checkpoint-*/trainer_state.json")]
    return min(done, key=lambda p: int(p.name.split("-")[1])) if done else None


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Submit the three jobs, signal the requeue job once its first checkpoint is complete, wait for all three."""
    shared = os.environ.get("TOKENTRAIN_SLURM_TEST_DIR")
    root = Path(shared) / f"test_slurm_{os.getpid()}" if shared else tmp_path_factory.mktemp("slurm")
    root.mkdir(parents=True, exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)  # this interpreter's tokentrain and accelerate
    assert shutil.which("tokentrain", path=bin_dir), f"tokentrain is not installed beside {sys.executable}"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    export = "--export=ALL,ACCEL_CONFIG=cpu,OMP_NUM_THREADS=1"
    specs = {
        # name: (script, sbatch options overriding its #SBATCH lines (GPUs -> CPUs))
        "single": ("single_node.sbatch", ["--gpus-per-node=0", "--cpus-per-task=2", export]),
        "multi": ("multi_node.sbatch", ["--gpus-per-node=0", "--cpus-per-task=1", f"{export},GPUS_PER_NODE=1"]),
        "requeue": ("requeue.sbatch", ["--gpus-per-node=0", "--cpus-per-task=1", f"{export},GPUS_PER_NODE=1"]),
    }
    ids: dict[str, str] = {}
    try:
        for name, (script, options) in specs.items():
            cmd = ["sbatch", "--parsable", f"--job-name=tokentrain-test-{name}", "--time=20", f"--chdir={root}"]
            cmd += [f"--output={root}/{name}.out", *options, str(EXAMPLES / script), str(MINI)]
            cmd += ["--run_dir", str(root / name)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, f"{shlex.join(cmd)}: {proc.stderr}"
            ids[name] = proc.stdout.strip().split(";")[0]

        start, signalled, states = time.time(), None, {}
        while time.time() - start < TIMEOUT:
            states = {name: _job_info(job) for name, job in ids.items()}
            if signalled is None:
                if states["requeue"].get("JobState") in TERMINAL:
                    pytest.fail(f"the requeue job ended before its first checkpoint was signalled: {states['requeue']}")
                ckpt = _first_complete_checkpoint(root / "requeue")
                if ckpt is not None:
                    # what Slurm does at --signal=B:USR1@300: USR1 to the batch script alone
                    subprocess.run(["scancel", "--batch", "--signal=USR1", ids["requeue"]], check=True, timeout=30)
                    signalled = ckpt.name
            # a requeued job passes through no terminal state; Restarts counts its starts after the first
            finished = [s.get("JobState") in TERMINAL for s in states.values()]
            if all(finished) and signalled is not None:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"jobs not finished after {TIMEOUT} s: {states}\n" + _tails(root))
        yield {"root": root, "ids": ids, "states": states, "signalled": signalled}
    finally:
        running = [job for job in ids.values() if _job_info(job).get("JobState") not in TERMINAL]
        if running:
            subprocess.run(["scancel", *running], timeout=30)


def _tails(root: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(root.glob("*.out")))


def _log(jobs, name: str) -> str:
    return (jobs["root"] / f"{name}.out").read_text()


def _launch_lines(log: str) -> list[list[str]]:
    """The `accelerate launch` commands launch.sh printed (one per node and attempt)."""
    return [
        shlex.split(line.removeprefix("launch.sh: ")) for line in log.splitlines() if line.startswith("launch.sh: ")
    ]


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _first_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def _port(job_id: str) -> str:
    return str(15000 + int(job_id) % 15000)  # launch.sh's per-job port


@pytest.mark.parametrize("name", ["single", "multi", "requeue"])
def test_job_completed(jobs, name):
    state = jobs["states"][name]
    assert state.get("JobState") == "COMPLETED", f"{state}\n{_log(jobs, name)[-5000:]}"
    assert state.get("ExitCode") == "0:0"
    assert state.get("Restarts") == ("1" if name == "requeue" else "0")
    out = jobs["root"] / name / "sft"
    assert (out / "_COMPLETE").is_file() and (out / "model.safetensors").is_file()
    assert not (jobs["root"] / name / "sft.tmp").exists()
    assert not list(out.glob("checkpoint-*"))


def test_single_node_job_runs_two_processes_on_one_node(jobs):
    (argv,) = _launch_lines(_log(jobs, "single"))
    assert argv[0] == "ACCELERATE_USE_CPU=true"
    assert _flag(argv, "--num_machines") == "1" and _flag(argv, "--machine_rank") == "0"
    assert _flag(argv, "--num_processes") == "2"  # cpu.yaml's 2 processes on the node
    assert _flag(argv, "--main_process_port") == _port(jobs["ids"]["single"])
    assert "--rdzv_backend" not in argv
    assert argv[argv.index("-m") :] == [
        "-m",
        "tokentrain.cli",
        "run",
        str(MINI),
        "--run_dir",
        str(jobs["root"] / "single"),
    ]
    summary = json.loads((jobs["root"] / "single" / "sft" / "train_summary.json").read_text())
    assert [h["step"] for h in summary["log_history"] if "loss" in h] == list(range(10, MAX_STEPS + 1, LOGGING_STEPS))


def test_multi_node_job_starts_one_launcher_per_node(jobs):
    nodelist = jobs["states"]["multi"]["NodeList"]
    lines = _launch_lines(_log(jobs, "multi"))
    assert sorted(_flag(argv, "--machine_rank") for argv in lines) == ["0", "1"]
    for argv in lines:
        rank = _flag(argv, "--machine_rank")
        assert _flag(argv, "--num_machines") == "2"
        assert _flag(argv, "--num_processes") == "2"  # 2 nodes x GPUS_PER_NODE=1
        assert _flag(argv, "--main_process_ip") == _first_host(nodelist)  # the same on both nodes
        assert _flag(argv, "--main_process_port") == _port(jobs["ids"]["multi"])
        assert _flag(argv, "--rdzv_backend") == "c10d"
        assert _flag(argv, "--rdzv_conf") == f"is_host={int(rank == '0')}"


def test_requeued_job_resumes_from_its_last_checkpoint(jobs):
    log, root = _log(jobs, "requeue"), jobs["root"] / "requeue"
    job = jobs["ids"]["requeue"]
    first, sep, second = log.partition(f"tokentrain job {job}: attempt 2 on ")
    assert sep, log[-5000:]  # --open-mode=append: both attempts in one log
    assert f"tokentrain job {job}: attempt 1 on " in first
    assert f"tokentrain job {job}: time limit near, requeueing" in first  # the script's USR1 trap
    assert "DUE TO JOB REQUEUE" in first
    assert "01_sft finished" not in first
    # attempt 2: the finished prepare stage is skipped, SFT resumes from the last complete checkpoint
    assert re.search(r"00_prepare\b.* is complete and unchanged, skipped", second), second[-5000:]
    resumed = re.findall(r"01_sft: resuming from (\S+)", second)
    assert len(resumed) == 1, second[-5000:]
    step = int(Path(resumed[0]).name.split("-")[1])
    assert Path(resumed[0]).parent == root / "sft.tmp"
    assert int(jobs["signalled"].split("-")[1]) <= step < MAX_STEPS and step % SAVE_STEPS == 0
    # continued, not restarted: the main process logged the loss of the steps after the checkpoint only (the
    # Trainer's dict "{'loss': ...}", or tokentrain's "step 20/40: loss ...")
    assert len(re.findall(r"'loss':|: loss ", second)) == (MAX_STEPS - step) // LOGGING_STEPS, second[-5000:]
    assert "01_sft finished" in second
    # the same job ID, so the same port, on both attempts; 2 nodes each time
    lines = _launch_lines(log)
    assert len(lines) == 4
    assert {_flag(argv, "--main_process_port") for argv in lines} == {_port(job)}
    assert sorted(_flag(argv, "--machine_rank") for argv in lines) == ["0", "0", "1", "1"]


def test_jobs_sharing_nodes_have_their_own_ports(jobs):
    ports = {name: _port(job) for name, job in jobs["ids"].items()}
    assert len(set(ports.values())) == 3


def test_all_three_runs_end_with_the_same_weights(jobs):
    import torch
    from safetensors.torch import load_file

    root = jobs["root"]
    weights = {
        name: load_file(str(root / name / "sft" / "model.safetensors")) for name in ("single", "multi", "requeue")
    }
    initial = load_file(str(root / "single" / "data" / "init" / "model.safetensors"))
    reference = weights["single"]
    moved = max((reference[k] - initial[k]).abs().max().item() for k in reference)
    assert moved > 1e-3, "training did not move the weights: the comparison would be vacuous"
    for name in ("multi", "requeue"):
        assert weights[name].keys() == reference.keys()
        for key in reference:
            assert torch.equal(weights[name][key], reference[key]), f"{name}: {key}"
    histories = {
        name: [
            (h["step"], h["loss"])
            for h in json.loads((root / name / "sft" / "train_summary.json").read_text())["log_history"]
            if "loss" in h
        ]
        for name in weights
    }
    assert histories["multi"] == histories["single"] == histories["requeue"]
