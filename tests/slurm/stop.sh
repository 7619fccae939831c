#!/usr/bin/env bash
# Stop the test cluster that tests/slurm/start.sh started: only the daemons whose PID files it wrote
# in $TULIP_SLURM_DIR (default /tmp/tulip-slurm). Jobs still on the cluster are cancelled first so no
# slurmstepd is orphaned. SIGTERM (slurmctld saves its state); SIGKILL only if a daemon ignores it.
#
#   bash tests/slurm/stop.sh                # jobs, slurmd, slurmctld, and munged if start.sh started it
#   bash tests/slurm/stop.sh --slurm-only   # keep munged (start.sh uses this before a restart)
#   TULIP_SLURM_WIPE=1 bash tests/slurm/stop.sh   # also delete the state folder
set -uo pipefail

STATE=${TULIP_SLURM_DIR:-/tmp/tulip-slurm}
SLURM_ONLY=0
[[ ${1:-} == --slurm-only ]] && SLURM_ONLY=1
[[ -d $STATE ]] || exit 0
export SLURM_CONF=$STATE/slurm.conf

# alive PID: exists and is not a zombie (PID 1 may reap late).
alive() {
    [[ -r /proc/$1/stat ]] && [[ $(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) != Z ]]
}

# stop NAME: the PID in $STATE/NAME.pid, if it is still that program.
stop() {
    local name=$1 file=$STATE/$1.pid pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    if alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$name"; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 150); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then
            echo "stop.sh: $name ($pid) ignored SIGTERM for 15 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    rm -f "$file"
}

# Cancel what is left on the cluster (a private one: every job on it is a test's), bounded.
if [[ -s $STATE/slurmctld.pid ]] && alive "$(cat "$STATE/slurmctld.pid")"; then
    jobs=$(timeout 5 squeue -h -o %A 2>/dev/null)
    if [[ -n $jobs ]]; then
        timeout 5 scancel $jobs 2>/dev/null
        for _ in $(seq 100); do
            [[ -z $(timeout 5 squeue -h -o %A 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
fi

stop slurmd
stop slurmctld
(( SLURM_ONLY )) || stop munged
[[ ${TULIP_SLURM_WIPE:-0} == 1 ]] && rm -rf "$STATE"
exit 0
