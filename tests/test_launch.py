"""launch.sh and accelerate_configs/: the commands launch.sh builds (dry runs, locally and under a fake SLURM), the
five topology configs, and one real 2-process CPU launch through accelerate_configs/cpu.yaml."""

from __future__ import annotations

import json
import os
import shlex
import shutil
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
        if not k.startswith(("SLURM_", "SLURMD_"))
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


# ------------------------------------------------------------------------------------------------ launch.sh under SLURM

# The programs launch.sh runs, and nothing else: a PATH made of links to them, so that a real `scontrol` or
# `nvidia-smi` on the machine running the tests cannot leak in.
TOOLS = ("bash", "cat", "dirname", "grep", "head", "hostname", "ls", "sed", "tr")


@pytest.fixture
def bin_dir(tmp_path):
    path = tmp_path / "bin"
    path.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (path / tool).symlink_to(found)
    return path


def fake_scontrol(bin_dir: Path, nodelist: str, hosts: list[str]) -> Path:
    """`scontrol show hostnames NODELIST` as SLURM answers it, for this one node list: anything else exits 1, so a
    test also checks which node list launch.sh passed. Every call is logged to scontrol.log."""
    log = bin_dir / "scontrol.log"
    script = bin_dir / "scontrol"
    script.write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> {shlex.quote(str(log))}\n'
        f'[ "$1 $2" = "show hostnames" ] && [ "$3" = {shlex.quote(nodelist)} ] && [ $# -eq 3 ] || exit 1\n'
        f"printf '%s\\n' {' '.join(shlex.quote(h) for h in hosts)}\n"
    )
    script.chmod(0o755)
    return log


def slurm_env(bin_dir: Path, nodes: int, rank: int, nodelist: str, job_id: str = "4242", **extra: str) -> dict:
    """The variables `srun --ntasks-per-node=1` sets in each task of a `nodes`-node job (the ones launch.sh reads)."""
    env = {
        "PATH": str(bin_dir),
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NNODES": str(nodes),
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_NTASKS": str(nodes),
        "SLURM_STEP_NUM_TASKS": str(nodes),
        "SLURM_NODEID": str(rank),
        "SLURM_PROCID": str(rank),
        "SLURM_STEP_ID": "0",
        "SLURM_STEPID": "0",
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NODELIST": nodelist,
        "SLURM_STEP_NODELIST": nodelist,
    }
    env.update(extra)
    return env


def topology(argv: list[str]) -> list[str]:
    """The flags launch.sh put between the config file and `-m tokentrain.cli`."""
    return argv[argv.index("--config_file") + 2 : argv.index("-m")]


# (node list, its hosts as scontrol expands it): the forms SLURM prints
NODELISTS_2 = [
    ("gpu-[07-08]", ["gpu-07", "gpu-08"]),
    ("a100-node1,a100-node2", ["a100-node1", "a100-node2"]),
    ("node[9-10]", ["node9", "node10"]),
]
NODELISTS_4 = [
    ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
    ("rack[1-2]-gpu[3-4]", ["rack1-gpu3", "rack1-gpu4", "rack2-gpu3", "rack2-gpu4"]),
    ("node[008-010],login1", ["node008", "node009", "node010", "login1"]),
    ("h1,h2,h3,h4", ["h1", "h2", "h3", "h4"]),
]


@pytest.mark.parametrize(("nodelist", "hosts"), NODELISTS_2)
@pytest.mark.parametrize("rank", [0, 1])
def test_slurm_two_nodes(bin_dir, nodelist, hosts, rank):
    log = fake_scontrol(bin_dir, nodelist, hosts)
    env = slurm_env(bin_dir, 2, rank, nodelist, GPUS_PER_NODE="4")
    argv = printed_command(run_launch("--dry-run", "recipes/x", "--max_steps", "3", env=env))
    assert argv[:4] == ["accelerate", "launch", "--config_file", str(CONFIGS / "ddp.yaml")]
    assert topology(argv) == [
        "--num_machines",
        "2",
        "--machine_rank",
        str(rank),
        "--main_process_ip",
        hosts[0],  # the first host: the same on every node
        "--main_process_port",
        str(15000 + 4242),  # 15000 + job ID mod 15000
        "--num_processes",
        "8",  # 2 nodes x 4 GPUs
        "--rdzv_backend",
        "c10d",
        "--rdzv_conf",
        f"is_host={int(rank == 0)}",  # the main node hosts torchrun's rendezvous store
    ]
    assert argv[argv.index("-m") :] == ["-m", "tokentrain.cli", "run", "recipes/x", "--max_steps", "3"]
    assert log.read_text().splitlines() == [f"show hostnames {nodelist}"]


@pytest.mark.parametrize(("nodelist", "hosts"), NODELISTS_4)
@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_slurm_four_nodes(bin_dir, nodelist, hosts, rank):
    fake_scontrol(bin_dir, nodelist, hosts)
    # no GPUS_PER_NODE: SLURM's count of the node's GPUs, in its "type:count" form
    env = slurm_env(bin_dir, 4, rank, nodelist, job_id="123456", SLURM_GPUS_ON_NODE="h100:8")
    argv = printed_command(run_launch("--dry-run", "recipes/x", env=env))
    assert topology(argv) == [
        "--num_machines",
        "4",
        "--machine_rank",
        str(rank),
        "--main_process_ip",
        hosts[0],
        "--main_process_port",
        str(15000 + 123456 % 15000),  # 21456
        "--num_processes",
        "32",
        "--rdzv_backend",
        "c10d",
        "--rdzv_conf",
        f"is_host={int(rank == 0)}",
    ]


def test_slurm_step_variables_win_over_the_job_ones(bin_dir):
    # `srun -N2` inside a 4-node job: the step's nodes, not the job's (there SLURM_NODELIST is the job's list).
    fake_scontrol(bin_dir, "n[3-4]", ["n3", "n4"])
    env = slurm_env(
        bin_dir, 4, 1, "n[1-4]", SLURM_STEP_NUM_NODES="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="n[3-4]"
    )
    env["SLURM_NNODES"] = "2"  # what srun sets in a step
    argv = printed_command(run_launch("--dry-run", "recipes/x", env={**env, "GPUS_PER_NODE": "2"}))
    assert flag(argv, "--num_machines") == "2"
    assert flag(argv, "--main_process_ip") == "n3"
    assert flag(argv, "--num_processes") == "4"


def test_slurm_port_per_job(bin_dir):
    """MASTER_PORT = 15000 + job ID mod 15000 (15000-29999, under the ephemeral range): jobs sharing a node differ."""
    fake_scontrol(bin_dir, "n[1-2]", ["n1", "n2"])

    def port(job_id, **extra):
        argv = printed_command(run_launch("--dry-run", "r", env=slurm_env(bin_dir, 2, 0, "n[1-2]", job_id, **extra)))
        return int(flag(argv, "--main_process_port"))

    assert [port(j) for j in ("1", "101", "102", "14999", "15000", "29999", "30000", "987654321")] == [
        15001,
        15101,
        15102,
        29999,
        15000,
        29999,
        15000,
        15000 + 987654321 % 15000,
    ]
    assert port("101", MASTER_PORT="12345") == 12345  # MASTER_PORT wins
    bad = run_launch("--dry-run", "r", env=slurm_env(bin_dir, 2, 0, "n[1-2]", "101", MASTER_PORT="http"))
    assert bad.returncode == 2 and "MASTER_PORT must be a port number, got 'http'" in bad.stderr
    odd = run_launch("--dry-run", "r", env=slurm_env(bin_dir, 2, 0, "n[1-2]", "12_3"))
    assert odd.returncode == 2 and "SLURM_JOB_ID '12_3' is not a number: set MASTER_PORT" in odd.stderr


def test_slurm_single_node(bin_dir):
    # One node: no scontrol needed (this node is the main one), static rendezvous, the per-job port all the same.
    env = slurm_env(bin_dir, 1, 0, "gpu-03", job_id="77", SLURMD_NODENAME="gpu-03", GPUS_PER_NODE="8")
    argv = printed_command(run_launch("--dry-run", "recipes/x", env=env))
    assert topology(argv) == [
        "--num_machines",
        "1",
        "--machine_rank",
        "0",
        "--main_process_ip",
        "gpu-03",
        "--main_process_port",
        "15077",
        "--num_processes",
        "8",
    ]
    # without SLURMD_NODENAME: this host's name; outside srun (a one-node batch script) is fine
    env = {k: v for k, v in env.items() if k not in ("SLURMD_NODENAME", "SLURM_STEP_ID", "SLURM_STEPID")}
    argv = printed_command(run_launch("--dry-run", "recipes/x", env=env))
    assert (
        flag(argv, "--main_process_ip") == subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    )


def test_slurm_cpu_config_runs_its_processes_per_node(bin_dir):
    # cpu.yaml: 2 gloo processes per node unless GPUS_PER_NODE says otherwise
    fake_scontrol(bin_dir, "c[1-2]", ["c1", "c2"])
    env = slurm_env(bin_dir, 2, 1, "c[1-2]", ACCEL_CONFIG="cpu")
    argv = printed_command(run_launch("--dry-run", "recipes/x", env=env))
    assert argv[0] == "ACCELERATE_USE_CPU=true"
    assert flag(argv, "--num_processes") == "4"
    argv = printed_command(run_launch("--dry-run", "recipes/x", env={**env, "GPUS_PER_NODE": "1"}))
    assert flag(argv, "--num_processes") == "2"


@pytest.mark.parametrize("nodes", [2, 4])
def test_slurm_without_scontrol_on_several_nodes_is_an_error(bin_dir, nodes):
    proc = run_launch("--dry-run", "recipes/x", env=slurm_env(bin_dir, nodes, 1, f"n[1-{nodes}]"))
    assert proc.returncode == 2
    assert f"scontrol not found on PATH: it expands the node list 'n[1-{nodes}]'" in proc.stderr
    assert f"on {nodes} nodes" in proc.stderr
    assert "launch.sh: accelerate" not in proc.stdout  # nothing launched


def test_slurm_failing_scontrol_on_several_nodes_is_an_error(bin_dir):
    fake_scontrol(bin_dir, "other[1-2]", ["other1", "other2"])  # answers nothing for this job's list
    proc = run_launch("--dry-run", "recipes/x", env=slurm_env(bin_dir, 2, 0, "n[1-2]"))
    assert proc.returncode == 2
    assert "'scontrol show hostnames n[1-2]' gave no host" in proc.stderr


def test_slurm_several_nodes_outside_srun_is_an_error(bin_dir):
    # launch.sh run by a 2-node batch script itself: only one node would start, the other never joins
    fake_scontrol(bin_dir, "n[1-2]", ["n1", "n2"])
    env = {k: v for k, v in slurm_env(bin_dir, 2, 0, "n[1-2]").items() if not k.startswith("SLURM_STEP")}
    proc = run_launch("--dry-run", "recipes/x", env=env)
    assert proc.returncode == 2 and "not inside an srun step: run 'srun bash launch.sh ...'" in proc.stderr


def test_slurm_more_than_one_task_per_node_is_an_error(bin_dir):
    env = slurm_env(bin_dir, 2, 0, "n[1-2]", SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="16")
    proc = run_launch("--dry-run", "recipes/x", env=env)
    assert proc.returncode == 2
    assert "16 SLURM tasks on 2 node(s): run one task per node" in proc.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 is not a node index of a 2-node step"),
        ({"SLURM_STEP_NUM_NODES": "two"}, "SLURM's node count is not a number: 'two'"),
        ({"GPUS_PER_NODE": "eight"}, "GPUS_PER_NODE must be a number, got 'eight'"),
    ],
)
def test_slurm_bad_variables(bin_dir, extra, message):
    fake_scontrol(bin_dir, "n[1-2]", ["n1", "n2"])
    proc = run_launch("--dry-run", "recipes/x", env=slurm_env(bin_dir, 2, 0, "n[1-2]", **extra))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


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
