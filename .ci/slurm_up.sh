#!/usr/bin/env bash
# Start a real 2-node Slurm cluster on THIS machine, for tests/cluster/test_slurm.py.
#
#   bash .ci/slurm_up.sh        # installs Debian's slurm + munge if missing, starts
#                               # munged, slurmctld, `slurmd -N node1`, `slurmd -N node2`
#   bash .ci/slurm_down.sh      # stops exactly the daemons this script started
#
# Both Slurm nodes are this host (NodeHostname=localhost, one slurmd per node on its own
# port); Debian's build allows several slurmd per host. No cgroups (proctrack/linuxproc,
# task/none), so it runs in an unprivileged-cgroup container. Needs root (it writes
# /etc/slurm/slurm.conf and runs the daemons as root, munged as user munge).
#
# Environment:
#   EXPO_SLURM_STATE   state dir (conf copy, pids, logs, spool)   [/tmp/expo-slurm]
#   EXPO_SLURM_CPUS    CPUs declared per Slurm node              [nproc of this host]
#   EXPO_SLURM_INSTALL 0 = never apt-get install (fail if missing) [1]
#   EXPO_SLURM_CTLD_PORT  slurmctld port                          [16817]
#
# Idempotent-ish: if the daemons recorded in the state dir are alive and sinfo answers,
# it says so and exits 0. It fails loudly (non-zero exit, log tails) otherwise.
set -euo pipefail

STATE=${EXPO_SLURM_STATE:-/tmp/expo-slurm}
CTLD_PORT=${EXPO_SLURM_CTLD_PORT:-16817}
CONF=/etc/slurm/slurm.conf
MARK="# expo_dist .ci/slurm_up.sh"

die() { echo "slurm_up: ERROR: $*" >&2; exit 1; }
log() { echo "slurm_up: $*" >&2; }

[[ $(id -u) -eq 0 ]] || die "must run as root (writes $CONF, starts slurmctld/slurmd)"

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ---- already up? -----------------------------------------------------------------------
if [[ -d $STATE ]] && { [[ ! -s $STATE/munged.pid ]] || alive "$STATE/munged.pid"; } \
   && alive "$STATE/slurmctld.pid" \
   && alive "$STATE/slurmd.node1.pid" && alive "$STATE/slurmd.node2.pid" \
   && sinfo -h >/dev/null 2>&1; then
    log "already up (state in $STATE)"; sinfo; exit 0
fi
if [[ -d $STATE ]] && ls "$STATE"/*.pid >/dev/null 2>&1; then
    log "stale state in $STATE: stopping what is left first"
    bash "$(dirname "$0")/slurm_down.sh" || true
fi

# ---- packages ----------------------------------------------------------------------------
t0=$SECONDS
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    [[ ${EXPO_SLURM_INSTALL:-1} == 1 ]] || die "slurm/munge not installed and EXPO_SLURM_INSTALL=0"
    log "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    log "installed in $((SECONDS - t0)) s"
fi

mkdir -p "$STATE"/{ctld,spool,log}
chmod 755 "$STATE"

# ---- munge -------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --force --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; fi
fi
chown -R munge:munge /etc/munge; chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    # munged -F stays in the foreground, so $! is munged itself (setpriv execs).
    setsid setpriv --reuid=munge --regid=munge --init-groups \
        munged -F --log-file="$STATE/log/munged.log" >>"$STATE/log/munged.out" 2>&1 &
    echo $! >"$STATE/munged.pid"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || { tail -20 "$STATE/log/munged.log" >&2; die "munged did not start"; }
else
    log "a munged is already running (not ours: slurm_down.sh will leave it alone)"
    : >"$STATE/munged.pid"
fi

# ---- slurm.conf -------------------------------------------------------------------------
CPUS=${EXPO_SLURM_CPUS:-$(nproc)}
MEM_MB=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
NODE_MEM=$((MEM_MB * 45 / 100))     # each slurmd sees all memory; declare < half per node
if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; move it away first"
fi
cat >"$STATE/slurm.conf" <<EOF
$MARK — two Slurm nodes on one host, no cgroups. Do not edit; regenerated on each start.
ClusterName=expo-ci
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Let a cancelled job's trap clean up before SIGKILL (sbatch's trap needs a few seconds).
KillWait=30
# sbatch --wait polls the job after 2, 10, 42, 74 ... s, but every 2 s when MinJobAge < 8:
# then it returns within ~2 s of the job's end. Finished jobs stay visible for >= 4 s.
MinJobAge=4
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.daemon.pid
SlurmdPidFile=$STATE/slurmd.%n.daemon.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$CPUS RealMemory=$NODE_MEM State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
mkdir -p /etc/slurm
cp "$STATE/slurm.conf" "$CONF"
mkdir -p "$STATE/spool/node1" "$STATE/spool/node2"

# ---- daemons ------------------------------------------------------------------------------
# -D: foreground, so $! is the daemon; setsid: survives the shell that started it.
setsid slurmctld -D -i -f "$CONF" >>"$STATE/log/slurmctld.out" 2>&1 &
echo $! >"$STATE/slurmctld.pid"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q "is UP" && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q "is UP" \
    || { tail -30 "$STATE/log/slurmctld.log" "$STATE/log/slurmctld.out" >&2; die "slurmctld did not come up"; }

for n in node1 node2; do
    setsid slurmd -D -N "$n" -f "$CONF" >>"$STATE/log/slurmd.$n.out" 2>&1 &
    echo $! >"$STATE/slurmd.$n.pid"
done

# ---- wait until both nodes answer (idle; mixed/allocated when jobs survived a restart) ---
ok=0
for _ in $(seq 150); do
    up=$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2=="idle" || $2=="mix" || $2=="alloc"' | wc -l)
    [[ $up -ge 2 ]] && { ok=1; break; }
    sleep 0.2
done
if [[ $ok != 1 ]]; then
    sinfo -N -l >&2 || true
    for f in "$STATE/log/slurmctld.log" "$STATE"/log/slurmd.node*.log "$STATE"/log/slurmd.node*.out; do
        echo "--- $f" >&2; tail -n 20 "$f" >&2 || true
    done
    die "both Slurm nodes did not come up within 30 s"
fi
log "up in $((SECONDS - t0)) s: 2 nodes x $CPUS CPUs, ${NODE_MEM} MB; state in $STATE"
sinfo
