#!/usr/bin/env bash
# launch.sh: run a tokentrain recipe with `accelerate launch`, on this machine or on every node of a SLURM job.
#
#   bash launch.sh [--dry-run] [--accelerate_config NAME|PATH] RECIPE [--key value ...]
#
# runs
#
#   accelerate launch --config_file "$ACCEL_CONFIG" [topology flags] -m tokentrain.cli run RECIPE [--key value ...]
#
# Environment:
#   ACCEL_CONFIG   accelerate config: a shipped config's name (cpu, ddp, fsdp2, zero2, zero3) or a file (default: ddp;
#                  a relative path is looked up from the current directory, then from this script's directory);
#                  --accelerate_config NAME|PATH does the same and wins over the variable
#   DRY_RUN=1      print the command and exit 0 (same as --dry-run)
#   GPUS_PER_NODE  processes per node under SLURM: GPUs, or CPU processes with a `use_cpu: true` config (default:
#                  SLURM_GPUS_ON_NODE, else `nvidia-smi -L`, else 1; with `use_cpu: true`, the config's
#                  num_processes / num_machines)
#   MASTER_PORT    rendezvous port under SLURM (default: 15000 + SLURM_JOB_ID % 15000, see below)
#
# Locally the topology (processes, GPUs) is the config file's. Under SLURM (SLURM_JOB_ID set) this script adds
#   --num_machines       the step's nodes (SLURM_STEP_NUM_NODES, else SLURM_NNODES, else SLURM_JOB_NUM_NODES)
#   --machine_rank       this node's index in the step (SLURM_NODEID)
#   --main_process_ip    the first host of the step's node list (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST, else
#                        SLURM_NODELIST) expanded by `scontrol show hostnames`: every node computes the same one.
#                        On more than one node a missing or failing scontrol is an error; on one node it falls back
#                        to this node (SLURMD_NODENAME, else `hostname`).
#   --main_process_port  MASTER_PORT, else 15000 + (SLURM_JOB_ID mod 15000): a port in 15000-29999 (below Linux's
#                        ephemeral ports, 32768 and up) that differs between jobs, so that two jobs sharing a node do
#                        not collide (job IDs 15000 apart would: set MASTER_PORT then). A requeued job keeps its ID,
#                        and so its port.
#   --num_processes      nodes x processes per node (GPUS_PER_NODE)
#   --rdzv_backend c10d  on more than one node, with --rdzv_conf is_host=1 on the main node (0 on the others)
# accelerate starts the processes of its node itself, so run ONE task per node, with srun (launch.sh run by a
# multi-node batch script without srun is an error: the other nodes would never join):
#
#   #!/bin/bash
#   #SBATCH --job-name=tokentrain
#   #SBATCH --nodes=2
#   #SBATCH --ntasks-per-node=1
#   #SBATCH --gpus-per-node=8
#   #SBATCH --cpus-per-task=64
#   export ACCEL_CONFIG=accelerate_configs/zero3.yaml
#   export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK  # Slurm 22.05-23.02: srun does not inherit --cpus-per-task
#   srun bash launch.sh recipes/weighted_ntp_e2e/ --run_dir runs/e2e
#
# recipes/slurm/ has complete sbatch scripts (one node, several nodes, a requeue-safe job).
# The config's num_processes/num_machines are per-job defaults that these flags override; multi-node DeepSpeed
# needs `deepspeed_multinode_launcher: standard` in the config (the shipped zero*.yaml have it).
# A config with `use_cpu: true` (cpu.yaml) also gets ACCELERATE_USE_CPU=true: accelerate does not pass use_cpu on
# to torchrun's workers, and without it they would not form a CPU (gloo) process group.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    cat <<EOF
usage: bash launch.sh [--dry-run] [--accelerate_config NAME|PATH] RECIPE [--key value ...]

Runs: accelerate launch --config_file "\$ACCEL_CONFIG" [SLURM topology flags] -m tokentrain.cli run RECIPE [--key value ...]

  RECIPE           a recipe folder or stage YAML (e.g. recipes/quickstart/)
  --key value      overrides passed on to \`tokentrain run\` (e.g. --max_steps 3)
  --dry-run        print the command and exit (or DRY_RUN=1)
  --accelerate_config NAME|PATH
                   a shipped config by name (cpu, ddp, fsdp2, zero2, zero3) or a config file (or ACCEL_CONFIG)
  -h, --help       this help

Environment: ACCEL_CONFIG (a name or file; default ddp), DRY_RUN,
and under SLURM: GPUS_PER_NODE (processes per node; default SLURM_GPUS_ON_NODE, nvidia-smi -L, 1, or the
config's for use_cpu), MASTER_PORT (default 15000 + SLURM_JOB_ID % 15000).
Under SLURM run one task per node: srun --ntasks-per-node=1 bash launch.sh RECIPE ...
EOF
}

die() { # message, exit status
    echo "launch.sh: error: $1" >&2
    exit "${2:-1}"
}

dry_run="${DRY_RUN:-0}"
accel_config="${ACCEL_CONFIG:-ddp}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        --dry-run)
            dry_run=1
            shift
            ;;
        --accelerate_config | --accelerate-config)
            [[ $# -ge 2 ]] || die "--accelerate_config needs a name (cpu, ddp, fsdp2, zero2, zero3) or a file" 2
            accel_config="$2"
            shift 2
            ;;
        *)
            break
            ;;
    esac
done
if [[ $# -eq 0 || "$1" == -* ]]; then
    usage >&2
    die "missing RECIPE (the first argument after the options of launch.sh)" 2
fi

# ---------------------------------------------------------------------------------------------------- config
# a shipped config by name (zero3 -> accelerate_configs/zero3.yaml beside this script), else a file
if [[ "$accel_config" =~ ^[A-Za-z0-9_-]+$ && -f "$SCRIPT_DIR/accelerate_configs/$accel_config.yaml" && ! -f "$accel_config" ]]; then
    accel_config="$SCRIPT_DIR/accelerate_configs/$accel_config.yaml"
elif [[ ! -f "$accel_config" && "$accel_config" != /* && -f "$SCRIPT_DIR/$accel_config" ]]; then
    accel_config="$SCRIPT_DIR/$accel_config"
fi
if [[ ! -f "$accel_config" ]]; then
    names="$(cd "$SCRIPT_DIR/accelerate_configs" 2>/dev/null && ls *.yaml 2>/dev/null | sed 's/\.yaml$//' | tr '\n' ' ')"
    die "accelerate config not found: $accel_config (shipped names: ${names% })" 2
fi

env_prefix=()
use_cpu=0
if grep -Eq '^use_cpu:[[:space:]]*true' "$accel_config"; then
    use_cpu=1
    export ACCELERATE_USE_CPU=true
    env_prefix=(ACCELERATE_USE_CPU=true)
fi

# ---------------------------------------------------------------------------------------------------- SLURM
topology=()
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    # Inside an srun step the SLURM_STEP_* variables describe the step (which may use fewer nodes than the job);
    # SLURM_NODELIST there is still the job's.
    num_machines="${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}}"
    machine_rank="${SLURM_NODEID:-0}"
    [[ "$num_machines" =~ ^[0-9]+$ && "$num_machines" -ge 1 ]] || die "SLURM's node count is not a number: '$num_machines'" 2
    [[ "$machine_rank" =~ ^[0-9]+$ && "$machine_rank" -lt "$num_machines" ]] ||
        die "SLURM_NODEID=$machine_rank is not a node index of a $num_machines-node step" 2
    num_tasks="${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:-}}"
    if [[ -n "$num_tasks" ]] && ((num_tasks > num_machines)); then
        die "$num_tasks SLURM tasks on $num_machines node(s): run one task per node (srun --ntasks-per-node=1), accelerate starts the per-GPU processes" 2
    fi
    if ((num_machines > 1)) && [[ -z "${SLURM_STEP_ID:-${SLURM_STEPID:-}}" ]]; then
        die "a $num_machines-node SLURM job, but not inside an srun step: run 'srun bash launch.sh ...' (one task per node), or the other nodes never join" 2
    fi

    # Rank 0's host: the first host of the step's node list, which every node computes the same way.
    nodelist="${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}}"
    main_process_ip=""
    if [[ -n "$nodelist" ]] && command -v scontrol >/dev/null 2>&1; then
        main_process_ip="$(scontrol show hostnames "$nodelist" 2>/dev/null | head -n 1 || true)"
    fi
    if [[ -z "$main_process_ip" ]] && ((num_machines > 1)); then
        [[ -n "$nodelist" ]] || die "no SLURM node list (SLURM_STEP_NODELIST, SLURM_JOB_NODELIST): cannot find the main node on $num_machines nodes" 2
        command -v scontrol >/dev/null 2>&1 ||
            die "scontrol not found on PATH: it expands the node list '$nodelist' into the main node's name on $num_machines nodes" 2
        die "'scontrol show hostnames $nodelist' gave no host: cannot find the main node on $num_machines nodes" 2
    fi
    if [[ -z "$main_process_ip" ]]; then # one node: this one
        main_process_ip="${SLURMD_NODENAME:-$(hostname 2>/dev/null || echo "$HOSTNAME")}"
    fi

    # A per-job port: two jobs sharing a node must not both listen on 29500.
    port="${MASTER_PORT:-}"
    if [[ -z "$port" ]]; then
        [[ "$SLURM_JOB_ID" =~ ^[0-9]+$ ]] || die "SLURM_JOB_ID '$SLURM_JOB_ID' is not a number: set MASTER_PORT" 2
        port=$((15000 + 10#$SLURM_JOB_ID % 15000))
    fi
    [[ "$port" =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || die "MASTER_PORT must be a port number, got '$port'" 2

    gpus_per_node="${GPUS_PER_NODE:-}"
    if [[ -z "$gpus_per_node" ]] && ((use_cpu)); then
        # CPU processes: the config's per-machine count (cpu.yaml: 2)
        cfg_procs="$(sed -nE 's/^num_processes:[[:space:]]*([0-9]+).*/\1/p' "$accel_config" | head -n 1)"
        cfg_machines="$(sed -nE 's/^num_machines:[[:space:]]*([0-9]+).*/\1/p' "$accel_config" | head -n 1)"
        if [[ -n "$cfg_procs" ]]; then
            gpus_per_node=$((cfg_procs / ${cfg_machines:-1}))
        fi
    fi
    if [[ -z "$gpus_per_node" && -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        gpus_per_node="${SLURM_GPUS_ON_NODE##*:}" # "8" (or "h100:8" on some setups)
    fi
    if [[ -z "$gpus_per_node" ]] && command -v nvidia-smi >/dev/null 2>&1; then
        gpus_per_node="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
    fi
    if [[ -z "$gpus_per_node" || "$gpus_per_node" == 0 ]]; then
        gpus_per_node=1
    fi
    [[ "$gpus_per_node" =~ ^[0-9]+$ ]] || die "GPUS_PER_NODE must be a number, got '$gpus_per_node'" 2

    topology=(
        --num_machines "$num_machines"
        --machine_rank "$machine_rank"
        --main_process_ip "$main_process_ip"
        --main_process_port "$port"
        --num_processes "$((num_machines * gpus_per_node))"
    )
    # c10d: torchrun's dynamic rendezvous, whose store the main node hosts; waits for late nodes. accelerate 1.15
    # ignores rdzv_backend in a config file (its CLI default "static" wins), so it is passed here. is_host says which
    # node hosts the store: torch's own guess (does the main address name this machine?) fails both ways when a node
    # name is an alias, or when several nodes share a host (then whichever starts first takes the port).
    if ((num_machines > 1)); then
        topology+=(--rdzv_backend c10d --rdzv_conf "is_host=$((machine_rank == 0 ? 1 : 0))")
    fi
fi

# ---------------------------------------------------------------------------------------------------- run
cmd=(accelerate launch --config_file "$accel_config" "${topology[@]}" -m tokentrain.cli run "$@")
printf -v line '%q ' "${env_prefix[@]}" "${cmd[@]}" # shell-quoted: the line can be pasted back into a shell
echo "launch.sh: ${line% }"
if [[ "$dry_run" == 1 ]]; then
    exit 0
fi
exec "${cmd[@]}"
