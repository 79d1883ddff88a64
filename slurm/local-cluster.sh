#!/usr/bin/env bash
# A real Slurm on this host for tests: munged, slurmctld and four slurmd emulating nodes n1..n4.
#
#   slurm/local-cluster.sh start     install slurm-wlm, munge and libpmix-dev if missing (root, apt-get), start the daemons,
#                                    wait until every node is idle (does nothing if already up)
#   slurm/local-cluster.sh stop      cancel this cluster's jobs, stop the daemons by their pid files
#   slurm/local-cluster.sh status    daemons up or down, then sinfo; exit 0 only when all are up
#   slurm/local-cluster.sh env       shell lines to use the cluster: eval "$(slurm/local-cluster.sh env)"
#
# Everything (config, munge key and socket, state, spool, logs, pid files) lives in one folder:
# $PILOT_SLURM_DIR, default <repo>/.slurm-local. Ports: $PILOT_SLURM_PORT (slurmctld) and the four after
# it (slurmd n1..n4), default 16817. Node size: $PILOT_SLURM_CPUS CPUs (default 2) and $PILOT_SLURM_MEM MB
# (default 2000) per node; the four emulated nodes share this host's cores and memory. A node declaring
# more CPUs than the host has gets SlurmdParameters=config_overrides.
# JobRequeue=0, as at sites where jobs are not requeued by default: the pilot's batch script asks
# for --requeue itself.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${PILOT_SLURM_DIR:-$REPO/.slurm-local}"
PORT="${PILOT_SLURM_PORT:-16817}"
CPUS="${PILOT_SLURM_CPUS:-2}"
MEM="${PILOT_SLURM_MEM:-2000}"
NODES=(n1 n2 n3 n4)
CONF="$DIR/etc/slurm.conf"
MUNGE_SOCKET="$DIR/munge-run/munge.socket"
GRACE=10          # seconds between TERM and KILL when stopping a daemon
START_TIMEOUT=60  # seconds to wait for the controller and for idle nodes

say() { echo "local-cluster: $*" >&2; }
die() { say "$*"; exit 1; }

# Poll a command until it succeeds or the deadline passes.
wait_until() {
    local timeout=$1 what=$2; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${timeout}s waiting for $what (logs in $DIR/log)"
        sleep 0.2
    done
}

pid_alive() { local pid; pid="$(cat "$1" 2>/dev/null)" && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

install_packages() {
    local needed="" wanted=""
    { command -v slurmctld && command -v munged; } >/dev/null || needed="slurm-wlm munge"
    # Slurm's mpi/pmix plugin loads libpmix.so, which only the -dev package has: `srun --mpi=pmix`
    # (how Open MPI starts under Slurm) needs it, nothing else does
    dpkg -s libpmix-dev >/dev/null 2>&1 || wanted="libpmix-dev"
    [ -n "$needed$wanted" ] || return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        [ -n "$needed" ] || return 0
        [ "$(id -u)" -eq 0 ] || die "slurm-wlm and munge are not installed and installing them needs root"
        die "slurm-wlm and munge are not installed and apt-get is not available"
    fi
    say "installing $needed $wanted with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086  # one word per package
    if ! apt-get install -y -qq --no-install-recommends $needed $wanted >/dev/null 2>&1; then
        apt-get update -qq >/dev/null || true
        apt-get install -y -qq --no-install-recommends $needed $wanted >/dev/null \
            || { [ -z "$needed" ] && say "libpmix-dev could not be installed: srun --mpi=pmix will fail"; } \
            || die "apt-get could not install $needed $wanted"
    fi
}

write_config() {
    mkdir -p "$DIR"/{etc,state,log,run,spool,munge-run}
    install -d -m 0700 "$DIR/munge"
    chmod 0755 "$DIR/munge-run"
    [ -s "$DIR/munge/munge.key" ] || mungekey -c -k "$DIR/munge/munge.key"
    chmod 0600 "$DIR/munge/munge.key"
    local host; host="$(hostname)"
    cat >"$CONF" <<EOF
# Written by slurm/local-cluster.sh: four emulated nodes on host $host.
ClusterName=pilotlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
TmpFS=$DIR/tmp_%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MpiDefault=pmi2
ReturnToService=2
JobRequeue=0
MinJobAge=300
KillWait=15
InactiveLimit=0
SlurmdTimeout=300
SchedulerType=sched/backfill
$([ "$CPUS" -le "$(nproc)" ] || echo "SlurmdParameters=config_overrides")
NodeName=n[1-4] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((PORT + 1))-$((PORT + 4))] CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=n[1-4] Default=YES MaxTime=INFINITE State=UP
EOF
    for node in "${NODES[@]}"; do mkdir -p "$DIR/spool/$node" "$DIR/tmp_$node"; done
}

export_conf() { export SLURM_CONF="$CONF"; }

nodes_idle() {
    local states; states="$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)"
    [ "$(grep -c ' idle$' <<<"$states")" -eq "${#NODES[@]}" ]
}

start_munged() {
    pid_alive "$DIR/run/munged.pid" && return 0
    munged -S "$MUNGE_SOCKET" --key-file "$DIR/munge/munge.key" --pid-file "$DIR/run/munged.pid" \
        --log-file "$DIR/log/munged.log" --seed-file "$DIR/munge/munged.seed" --force
    wait_until 10 "munged" test -S "$MUNGE_SOCKET"
}

start_slurmctld() {
    pid_alive "$DIR/run/slurmctld.pid" || slurmctld -c -i -f "$CONF"
    wait_until "$START_TIMEOUT" "slurmctld (scontrol ping)" scontrol ping
}

start_slurmds() {
    local node
    for node in "${NODES[@]}"; do
        pid_alive "$DIR/run/slurmd-$node.pid" || slurmd -N "$node" -f "$CONF"
    done
    wait_until "$START_TIMEOUT" "nodes n[1-4] idle" nodes_idle
}

cmd_start() {
    install_packages
    write_config
    export_conf
    start_munged
    start_slurmctld
    start_slurmds
    say "up: SLURM_CONF=$CONF"
}

# TERM to every daemon named by the pid files at once, then KILL those still there after the grace
# period; the pid files go when their processes are gone.
stop_pidfiles() {
    local file pid pids=() left=() deadline=$((SECONDS + GRACE))
    for file in "$@"; do
        pid="$(cat "$file" 2>/dev/null || true)"
        if [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; then pids+=("$pid"); fi
    done
    while :; do
        left=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
        [ "${#left[@]}" -gt 0 ] && [ "$SECONDS" -lt "$deadline" ] || break
        sleep 0.1
    done
    for pid in "${left[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    rm -f "$@"
}

no_jobs() { [ -z "$(squeue -h -o %i 2>/dev/null)" ]; }

cancel_jobs() {
    scontrol ping >/dev/null 2>&1 || return 0
    scancel --full --signal=KILL --user="$(id -un)" 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    until no_jobs || [ "$SECONDS" -ge "$deadline" ]; do sleep 0.2; done
}

cmd_stop() {
    [ -f "$CONF" ] || { say "not configured ($DIR)"; return 0; }
    export_conf
    cancel_jobs
    local node slurmds=()
    for node in "${NODES[@]}"; do slurmds+=("$DIR/run/slurmd-$node.pid"); done
    stop_pidfiles "${slurmds[@]}" "$DIR/run/slurmctld.pid"
    stop_pidfiles "$DIR/run/munged.pid"
    say "stopped"
}

cmd_status() {
    local up=0 file
    for file in munged slurmctld "${NODES[@]/#/slurmd-}"; do
        if pid_alive "$DIR/run/$file.pid"; then echo "$file: up (pid $(cat "$DIR/run/$file.pid" 2>/dev/null))"
        else echo "$file: down"; up=1; fi
    done
    if [ "$up" -eq 0 ]; then export_conf; sinfo -N -o '%N %t %c %m'; fi
    return "$up"
}

cmd_env() {
    local bin; bin="$(dirname "$(command -v sbatch || echo /usr/bin/sbatch)")"
    echo "export SLURM_CONF='$CONF'"
    echo "export PATH='$bin':\"\$PATH\""
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
