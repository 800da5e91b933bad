#!/usr/bin/env bash
# .ci/start_slurm.sh: a Slurm cluster on this machine, for tests/test_slurm.py (and .ci/run).
#
#   bash .ci/start_slurm.sh          install (if needed), configure and start; returns once the node(s) are idle
#   bash .ci/start_slurm.sh --stop   stop the daemons this script started
#
# As root on Debian: installs Debian's slurmctld, slurmd, slurm-client and munge when missing, writes
# /etc/slurm/slurm.conf (it refuses to replace one it did not write), and starts munged, slurmctld and slurmd with
# their state, logs and pid files under $STATE_DIR (/var/lib/tokentrain-slurm). Idempotent: with the cluster up and
# the same configuration, a second call returns at once.
#
# The cluster: one partition "debug" of two nodes on this host, tt1 and tt2: two slurmd daemons (Debian's slurmd runs
# several with `slurmd -N NAME`) on ports 6818 and 6819, slurmctld on 6817, all outside launch.sh's per-job rendezvous
# ports (15000-29999). Each node declares all of this machine's CPUs: a one-node job gets every CPU, a two-node job
# shares them. The node names resolve to 127.0.0.1 through /etc/hosts (a line this script adds, marked
# "tokentrain-slurm"), as a real cluster's node names resolve to their hosts, so a two-node job is a real multi-node
# launch on loopback. Cgroups are not used (proctrack/linuxproc, task/none): this works in a container.
set -euo pipefail

STATE_DIR="${TOKENTRAIN_SLURM_DIR:-/var/lib/tokentrain-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# written by tokentrain .ci/start_slurm.sh"
NODES=(tt1 tt2)
HOSTS_MARK="# tokentrain-slurm"

say() { echo "start_slurm: $*"; }
die() {
    echo "start_slurm: error: $*" >&2
    for log in "$STATE_DIR"/slurmctld.log "$STATE_DIR"/slurmd-*.log; do
        [[ -f "$log" ]] && { echo "--- last lines of $log" >&2; tail -n 15 "$log" >&2; }
    done
    exit 1
}

# pid_alive PIDFILE NAME: the process the file names runs, and is NAME (not a later process that got its number)
pid_alive() {
    local pid
    pid="$(cat "$1" 2>/dev/null)" && [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
        [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]]
}

daemons() { # PIDFILE NAME pairs of what this script starts, in stopping order
    local node
    for node in "${NODES[@]}"; do echo "$STATE_DIR/slurmd-$node.pid slurmd"; done
    echo "$STATE_DIR/slurmctld.pid slurmctld"
    echo "$STATE_DIR/munged.pid munged"
}

stop() {
    local pidfile name
    while read -r pidfile name; do
        if pid_alive "$pidfile" "$name"; then
            kill "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
            for _ in $(seq 100); do pid_alive "$pidfile" "$name" || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done < <(daemons)
}

if [[ "${1:-}" == "--stop" ]]; then
    stop
    say "stopped"
    exit 0
fi
[[ $# -eq 0 ]] || die "usage: bash .ci/start_slurm.sh [--stop]"
[[ "$(id -u)" == 0 ]] || die "run as root (it installs packages, writes $CONF and starts daemons)"
start=$SECONDS

# ------------------------------------------------------------------------------------------------ install
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
    ! command -v munged >/dev/null; then
    say "installing Debian's slurmctld, slurmd, slurm-client and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 ||
        apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge # again, to show the error
fi

# ------------------------------------------------------------------------------------------------ configuration
# Each node declares this machine's CPUs (slurmd drains a node that declares more than it has); memory is not a
# consumable resource (CR_Core).
node_cpus="$(nproc)"
host="$(hostname -s)"
conf="$MARK
# A test cluster: two nodes on this host (see the script). Do not use it for anything else.
ClusterName=tokentrain
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it starts again (default 120)
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmctldPort=6817
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool-%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# a job's processes get SIGTERM, then SIGKILL 10 s later (default 30) when it is cancelled or requeued
KillWait=10
# finished jobs stay visible to \`scontrol show job\` for 10 minutes (there is no accounting database)
MinJobAge=600
SlurmctldDebug=info
SlurmdDebug=info"
port=6818
for node in "${NODES[@]}"; do
    conf+="
NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=$node_cpus State=UNKNOWN"
    port=$((port + 1))
done
conf+="
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"

if [[ -f "$CONF" ]] && ! head -n 1 "$CONF" | grep -qxF "$MARK"; then
    die "$CONF exists and was not written by this script: not replacing it (a real cluster's?)"
fi
changed=0
if [[ ! -f "$CONF" ]] || [[ "$(cat "$CONF")" != "$conf" ]]; then
    mkdir -p /etc/slurm
    printf '%s\n' "$conf" >"$CONF"
    changed=1
fi

# the node names resolve to this host, as on a real cluster
if ! grep -q "$HOSTS_MARK" /etc/hosts; then
    printf '127.0.0.1 %s %s\n' "${NODES[*]}" "$HOSTS_MARK" >>/etc/hosts
fi

# ------------------------------------------------------------------------------------------------ daemons
if ((changed)); then # a new configuration: restart whatever runs with the old one
    stop
fi
mkdir -p "$STATE_DIR/ctld" /run/munge
chown munge:munge /run/munge
for node in "${NODES[@]}"; do mkdir -p "$STATE_DIR/spool-$node"; done

if ! pid_alive "$STATE_DIR/munged.pid" munged; then
    # Debian's package may have started its own munged (where services start on install): reuse a working one.
    if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        rm -f /run/munge/munged.pid
        runuser -u munge -- munged --pid-file=/run/munge/munged.pid --force || die "munged did not start"
        for _ in $(seq 50); do [[ -f /run/munge/munged.pid ]] && break; sleep 0.1; done
        cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
    fi
    munge -n </dev/null | unmunge >/dev/null || die "munge does not work"
fi

if ! pid_alive "$STATE_DIR/slurmctld.pid" slurmctld; then
    slurmctld -i || die "slurmctld did not start" # -i: ignore state from an earlier configuration
fi
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer"

for node in "${NODES[@]}"; do
    if ! pid_alive "$STATE_DIR/slurmd-$node.pid" slurmd; then
        slurmd -N "$node" || die "slurmd $node did not start"
    fi
done

# ------------------------------------------------------------------------------------------------ ready
# up: idle, or running jobs (mixed, allocated, completing); a suffix (idle*: not responding) is not up
up='^[^ ]+ (idle|mixed|allocated|completing)$'
for _ in $(seq 150); do
    states="$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u)"
    if [[ -n "$states" ]] && ! grep -qvE "$up" <<<"$states"; then
        break
    fi
    # a node left down or drained by an earlier run: return it to service
    for node in $(awk '$2 ~ /^(down|drain|drained|fail)/ {print $1}' <<<"$states"); do
        scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
    done
    sleep 0.2
done
if [[ -z "$states" ]] || grep -qvE "$up" <<<"$states"; then
    die "the nodes are not up after 30 s: $(tr '\n' ' ' <<<"$states")"
fi
say "cluster up in $((SECONDS - start)) s: partition debug, nodes ${NODES[*]} with $node_cpus CPU(s) each"
