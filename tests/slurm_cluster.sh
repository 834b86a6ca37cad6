#!/usr/bin/env bash
# A throwaway one-node SLURM cluster on this machine, for testing cot2's submitit_slurm sweeps.
#
#   tests/slurm_cluster.sh run DIR -- CMD...   start, run CMD with SLURM_CONF set, stop (also on failure)
#   tests/slurm_cluster.sh start DIR           start slurmctld + slurmd; prints the SLURM_CONF to export
#   tests/slurm_cluster.sh stop DIR            stop the daemons that `start DIR` started
#
# Everything lives in DIR: slurm.conf, state, spool, logs and pid files. Debian's slurm-wlm
# (and munge) are installed when missing; the cluster itself uses auth/none, so no munged runs.
# Ports: SLURM_TEST_PORT (default 16817) for slurmctld and the next one for slurmd.
set -euo pipefail

PARTITION=${SLURM_TEST_PARTITION:-cot2}
PORT=${SLURM_TEST_PORT:-16817}

die() { echo "slurm_cluster: $*" >&2; exit 1; }

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && return
    [ "$(id -u)" = 0 ] || die "slurm-wlm is not installed and this is not root: apt-get install slurm-wlm munge"
    echo "slurm_cluster: installing slurm-wlm and munge" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
    local dir=$1 host node
    host=$(hostname -s)
    # slurmd -C prints this machine's NodeName line (CPUs, sockets, cores, RealMemory) as slurmd will see it.
    node=$(slurmd -C | head -n 1)
    [[ $node == NodeName=* ]] || die "slurmd -C printed no node line: $node"
    rm -rf "$dir/state" "$dir/spool"  # a fresh cluster: no jobs recovered from an earlier one
    mkdir -p "$dir/state" "$dir/spool"
    cat >"$dir/slurm.conf" <<EOF
ClusterName=cot2test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
$node State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -N -o %t 2>/dev/null | head -n 1; }

start() {
    local dir=$1
    install_slurm
    [ ! -e "$dir/slurmctld.pid" ] || die "$dir already has a cluster; stop it first: $0 stop $dir"
    write_conf "$dir"
    export SLURM_CONF=$dir/slurm.conf
    trap 'stop "$dir"' EXIT  # a start that fails half-way stops what it started
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    # The node registers with slurmctld within seconds; wait for it to accept jobs.
    local deadline=$((SECONDS + 60)) state=""
    until [ "$(node_state)" = idle ]; do
        state=$(node_state)
        if [ $SECONDS -ge $deadline ] || [[ $state == down* || $state == drain* ]]; then
            tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
            die "node did not become idle (state: ${state:-none})"
        fi
        sleep 0.5
    done
    trap - EXIT
    echo "slurm_cluster: up, partition $PARTITION; export SLURM_CONF=$SLURM_CONF" >&2
}

stop() {
    local dir=$1 name pid
    for name in slurmd slurmctld; do
        [ -s "$dir/$name.pid" ] || continue
        pid=$(cat "$dir/$name.pid")
        if kill "$pid" 2>/dev/null; then
            # wait for the daemon to exit (it is not our child, so `wait` cannot)
            local deadline=$((SECONDS + 30))
            while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
        fi
        rm -f "$dir/$name.pid"
    done
    echo "slurm_cluster: stopped ($dir)" >&2
}

run() {
    local dir=$1
    shift
    [ "${1:-}" = -- ] && shift
    [ $# -gt 0 ] || die "run DIR -- CMD...: no command"
    start "$dir"
    trap 'stop "$dir"' EXIT
    trap 'exit 130' INT TERM
    SLURM_CONF=$dir/slurm.conf SLURM_TEST_PARTITION=$PARTITION "$@"
}

[ $# -ge 2 ] || die "usage: $0 start|stop|run DIR [-- CMD...]"
cmd=$1
dir=$(realpath -m "$2")
shift 2
mkdir -p "$dir"
case $cmd in
    start) start "$dir" ;;
    stop) stop "$dir" ;;
    run) run "$dir" "$@" ;;
    *) die "unknown command $cmd: start, stop or run" ;;
esac
