"""launch.sh and accelerate_configs/: the commands launch.sh builds (dry runs, locally and under a fake SLURM), the
five topology configs, and one real 2-process CPU launch through accelerate_configs/cpu.yaml."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch.sh"
CONFIGS = ROOT / "accelerate_configs"


def run_launch(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run launch.sh with a clean environment: no SLURM_* or launch.sh variables leak in from the machine running the
    tests (they may themselves run inside a SLURM job)."""
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_")
        and k not in {"ACCEL_CONFIG", "DRY_RUN", "GPUS_PER_NODE", "MASTER_PORT", "ACCELERATE_USE_CPU"}
    }
    return subprocess.run(
        ["bash", str(LAUNCH), *args], env={**keep, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=30
    )


def printed_command(proc: subprocess.CompletedProcess) -> list[str]:
    """The argv launch.sh printed on its `launch.sh: ` line (the line is shell-quoted)."""
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("launch.sh: ")]
    assert len(lines) == 1, proc.stdout
    return shlex.split(lines[0].removeprefix("launch.sh: "))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# ------------------------------------------------------------------------------------------------ launch.sh


def test_dry_run_local():
    argv = printed_command(run_launch("--dry-run", "recipes/x", "--max_steps", "3"))
    assert argv == [
        "accelerate",
        "launch",
        "--config_file",
        str(CONFIGS / "ddp.yaml"),  # default, found beside the script whatever the current directory
        "-m",
        "tokentrain.cli",
        "run",
        "recipes/x",
        "--max_steps",
        "3",
    ]


def test_dry_run_env_var_and_cpu_config(tmp_path):
    # DRY_RUN=1 = --dry-run; a relative ACCEL_CONFIG is found beside the script; `use_cpu: true` adds the variable
    # that makes torchrun's workers CPU processes (accelerate does not pass use_cpu on to them).
    proc = run_launch("recipes/x", env={"DRY_RUN": "1", "ACCEL_CONFIG": "accelerate_configs/cpu.yaml"}, cwd=tmp_path)
    argv = printed_command(proc)
    assert argv[:5] == ["ACCELERATE_USE_CPU=true", "accelerate", "launch", "--config_file", str(CONFIGS / "cpu.yaml")]
    assert argv[5:] == ["-m", "tokentrain.cli", "run", "recipes/x"]


def test_dry_run_slurm(tmp_path):
    # A fake `scontrol show hostnames NODELIST` that expands the list the way SLURM does.
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-[07-08]" ] || exit 1\necho gpu-07\necho gpu-08\n'
    )
    scontrol.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "1",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu-[07-08]",
        "GPUS_PER_NODE": "4",
    }
    argv = printed_command(run_launch("--dry-run", "recipes/x", "--max_steps", "3", env=env))
    assert flag(argv, "--num_machines") == "2"
    assert flag(argv, "--machine_rank") == "1"
    assert flag(argv, "--main_process_ip") == "gpu-07"  # the first host: the same on every node
    assert flag(argv, "--main_process_port") == "29500"
    assert flag(argv, "--num_processes") == "8"  # 2 nodes x 4 GPUs
    assert flag(argv, "--rdzv_backend") == "c10d"
    assert argv[argv.index("-m") :] == ["-m", "tokentrain.cli", "run", "recipes/x", "--max_steps", "3"]


def test_dry_run_slurm_fallbacks(tmp_path):
    # scontrol gives nothing -> SLURM_LAUNCH_NODE_IPADDR; no GPUS_PER_NODE -> SLURM_GPUS_ON_NODE; rank from SLURM_PROCID.
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\nexit 1\n")
    scontrol.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "1",
        "SLURM_NNODES": "3",
        "SLURM_PROCID": "2",
        "SLURM_JOB_NODELIST": "n[1-3]",
        "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.5",
        "SLURM_GPUS_ON_NODE": "8",
        "MASTER_PORT": "12345",
    }
    argv = printed_command(run_launch("--dry-run", "recipes/x", env=env))
    assert [
        flag(argv, f) for f in ("--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port")
    ] == [
        "3",
        "2",
        "10.0.0.5",
        "12345",
    ]
    assert flag(argv, "--num_processes") == "24"


def test_slurm_more_than_one_task_per_node_is_an_error():
    proc = run_launch("--dry-run", "recipes/x", env={"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_NTASKS": "16"})
    assert proc.returncode == 2
    assert "one task per node" in proc.stderr


def test_usage_and_errors():
    assert run_launch().returncode == 2  # missing RECIPE
    assert run_launch("--dry-run", "--max_steps", "3").returncode == 2  # an option where RECIPE should be
    missing = run_launch("--dry-run", "recipes/x", env={"ACCEL_CONFIG": "no/such.yaml"})
    assert missing.returncode == 2 and "no/such.yaml" in missing.stderr
    for opt in ("-h", "--help"):
        proc = run_launch(opt)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: ")


# ------------------------------------------------------------------------------------------------ accelerate_configs

EXPECTED = {
    "cpu.yaml": "MULTI_GPU",  # picks the torchrun launcher; see the file's header
    "ddp.yaml": "MULTI_GPU",
    "fsdp2.yaml": "FSDP",
    "zero2.yaml": "DEEPSPEED",
    "zero3.yaml": "DEEPSPEED",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / name
    text = path.read_text()
    assert text.startswith("# "), "each config says what it is for in a comment header"
    cfg = yaml.safe_load(text)
    assert cfg["distributed_type"] == EXPECTED[name]
    assert "mixed_precision" not in cfg  # topology only: precision is the recipe's
    load_config_from_file(str(path))  # accelerate's own loader: no unknown keys
    if name == "cpu.yaml":
        assert cfg["use_cpu"] is True and cfg["num_processes"] == 2
    else:
        assert cfg["num_processes"] == 8
    if name == "fsdp2.yaml":
        fsdp = cfg["fsdp_config"]
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # FULL_SHARD in FSDP2
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # a sharded one saves no weights through save_model
    if name.startswith("zero"):
        ds = cfg["deepspeed_config"]
        assert ds["zero_stage"] == int(name[4])
        assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
        assert ds["deepspeed_multinode_launcher"] == "standard"  # torchrun per node, as `srun bash launch.sh` needs


# ------------------------------------------------------------------------------------------------ one real launch

WORKER = """
import json, os, sys
import torch
import torch.distributed as dist
from accelerate import Accelerator

# Accelerator (and TrainingArguments) read ACCELERATE_USE_CPU; a bare PartialState() does not (it needs cpu=True).
state = Accelerator().state
rank = torch.tensor([float(dist.get_rank())])
dist.all_reduce(rank)  # 0 + 1
out = {
    "RANK": os.environ["RANK"],
    "WORLD_SIZE": os.environ["WORLD_SIZE"],
    "backend": dist.get_backend(),
    "distributed_type": str(state.distributed_type),
    "num_processes": state.num_processes,
    "rank_sum": rank.item(),
}
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(out, f)
# A gloo rank can abort at interpreter exit after its work is done (see tokentrain.runtime.exit_process).
from tokentrain.runtime import exit_process
exit_process(0)
"""


def test_cpu_config_starts_two_gloo_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env["ACCELERATE_USE_CPU"] = "true"  # what launch.sh exports for cpu.yaml (see its header)
    env["OMP_NUM_THREADS"] = "1"
    # `python -m accelerate.commands.launch` = `accelerate launch`, with this interpreter whatever PATH says.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu.yaml")]
    proc = subprocess.run(
        [*cmd, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, res in enumerate(results):
        assert res["RANK"] == str(rank)
        assert res["WORLD_SIZE"] == "2"
        assert res["backend"] == "gloo"
        assert res["distributed_type"] == "DistributedType.MULTI_CPU"
        assert res["num_processes"] == 2
        assert res["rank_sum"] == 1.0


def test_exit_process_returns_the_code_without_a_process_group():
    from tokentrain.runtime import exit_process

    assert exit_process(0) == 0 and exit_process(2) == 2


EXIT_WORKER = """
import logging, sys
import torch.distributed as dist
from tokentrain.runtime import exit_process

dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}/store", rank=0, world_size=1)
print("work done")  # buffered: exit_process must flush it
logging.basicConfig()
logging.getLogger("tokentrain").warning("last log line")
exit_process(3)
print("not reached")
"""


def test_exit_process_in_a_gloo_group_flushes_and_exits_with_the_code(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(EXIT_WORKER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["work done"]
    assert "last log line" in proc.stderr
