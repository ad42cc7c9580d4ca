#!/usr/bin/env bash
# Stop the Slurm started by .ci/slurm_up.sh: cancel the jobs still queued or running,
# then stop exactly the daemons whose PIDs slurm_up.sh recorded (nothing by name).
set -uo pipefail

STATE=${EXPO_SLURM_STATE:-/tmp/expo-slurm}
log() { echo "slurm_down: $*" >&2; }

[[ -d $STATE ]] || { log "no state dir $STATE: nothing to do"; exit 0; }

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Jobs first, while slurmctld and slurmd can still deliver the signals: their batch traps
# stop the Ray clusters they started.
if alive "$STATE/slurmctld.pid" && command -v squeue >/dev/null; then
    if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
        log "cancelling jobs: $(squeue -h -o %i | tr '\n' ' ')"
        scancel --full $(squeue -h -o %i) 2>/dev/null || true
        for _ in $(seq 60); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 1; done
    fi
fi

rc=0
for f in slurmd.node1 slurmd.node2 slurmctld munged; do
    p="$STATE/$f.pid"
    [[ -s $p ]] || { rm -f "$p"; continue; }
    pid=$(cat "$p")
    comm=$(ps -o comm= -p "$pid" 2>/dev/null || true)
    if [[ -n $comm && $comm != "${f%%.*}" ]]; then   # a recycled PID: not ours any more
        log "$f: pid $pid is now '$comm', leaving it alone"; rm -f "$p"; continue
    fi
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$f ($pid) ignored SIGTERM: SIGKILL"; kill -KILL "$pid" 2>/dev/null || rc=1
        fi
        log "stopped $f ($pid)"
    fi
    rm -f "$p"
done
exit $rc
