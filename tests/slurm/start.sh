#!/usr/bin/env bash
# Bring up a single-node SLURM cluster on this machine for Tulip's integration tests.
#
#   bash tests/slurm/start.sh            # prints: export SLURM_CONF=/tmp/tulip-slurm/slurm.conf
#   eval "$(bash tests/slurm/start.sh)"  # ... and sets it in this shell
#
# Needs root (daemons, apt-get). Installs Debian's slurmctld/slurmd/slurm-client/munge when missing,
# writes slurm.conf for this host into a private state folder ($TULIP_SLURM_DIR, default
# /tmp/tulip-slurm), starts munged (unless one already answers), slurmctld and slurmd, waits until the
# node is idle and records the PIDs of what it started (stop.sh stops only those). Idempotent: a second
# call finds the daemons alive and only prints the export line.
#
# No accounting (slurmdbd): sacct fails, so submitit sees job states as UNKNOWN and waits for result
# files. Every test therefore bounds its own waits (see tests/system/test_slurm.py).
#
# Exit status: 0 up; 77 SLURM cannot be started here (not root, no apt-get) - the tests skip with the
# printed reason; anything else is a real failure.
set -euo pipefail

STATE=${TULIP_SLURM_DIR:-/tmp/tulip-slurm}
CONF=$STATE/slurm.conf
HOST=$(hostname -s)

cannot() { echo "tests/slurm/start.sh: cannot start SLURM: $*" >&2; exit 77; }
die() { echo "tests/slurm/start.sh: $*" >&2; exit 1; }

# alive PID: the process exists and is not a zombie (PID 1 here may reap late).
alive() {
    local pid=$1
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    [[ $(cut -d' ' -f3 "/proc/$pid/stat") != Z ]]
}
pid_in() { [[ -s $1 ]] && cat "$1" || true; }

[[ $(id -u) == 0 ]] || cannot "needs root (daemons run as root, packages via apt-get); running as $(id -un)"

# --- packages ------------------------------------------------------------------------------------
PACKAGES="slurmctld slurmd slurm-client munge"
missing=0
for binary in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged; do
    [[ -x $binary ]] || missing=1
done
if (( missing )); then
    command -v apt-get >/dev/null || cannot "SLURM is not installed and there is no apt-get to install $PACKAGES"
    export DEBIAN_FRONTEND=noninteractive
    echo "installing $PACKAGES" >&2
    # The package lists may be missing or stale on a fresh machine: update only when needed.
    if ! apt-get install -y -q --no-install-recommends $PACKAGES >&2; then
        apt-get update -q >&2 || cannot "apt-get update failed (no network?)"
        apt-get install -y -q --no-install-recommends $PACKAGES >&2 || cannot "apt-get install $PACKAGES failed"
    fi
fi

mkdir -p "$STATE"/{ctld,spool,log}
export SLURM_CONF=$CONF

# --- slurm.conf ----------------------------------------------------------------------------------
# --all: the machine's CPUs. Plain nproc honours OMP_NUM_THREADS, which the tests set to 1: a test calling
# this script again would then write another slurm.conf and restart the daemons it should find running.
CPUS=$(nproc --all)
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
cat >"$CONF.new" <<EOF
# Written by tests/slurm/start.sh: a single-node test cluster on loopback.
ClusterName=tulip
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Schedule every second (default 60 s): a requeued job starts as soon as its BeginTime passes.
SchedulerParameters=bf_interval=1,sched_interval=1
ReturnToService=2
# A job asking for more than the node has is rejected at submission instead of pending forever.
EnforcePartLimits=ALL
MpiDefault=none
MailProg=/bin/true
KillWait=5
# One placeholder GPU (gres backed by /dev/null: no real device) and a node feature, so that the slurm_gpu
# launcher's sbatch lines (--gpus-per-node, --constraint) are accepted here as on a real cluster.
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:1 Features=tulip_test State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
GRES="NodeName=$HOST Name=gpu File=/dev/null"

# --- already up with this very config? (idempotent) ------------------------------------------------
node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1 || true; }
if cmp -s "$CONF.new" "$CONF" && alive "$(pid_in "$STATE/slurmctld.pid")" \
        && alive "$(pid_in "$STATE/slurmd.pid")" \
        && [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; then
    rm -f "$CONF.new"
    echo "export SLURM_CONF=$CONF" | tee "$STATE/env.sh"
    exit 0
fi

# --- munge ---------------------------------------------------------------------------------------
# No systemd: /run/munge does not exist and nothing started munged at install.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged --force
    cp /run/munge/munged.pid "$STATE/munged.pid"   # ours: stop.sh may stop it
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n </dev/null | unmunge >/dev/null || die "munged does not answer"
fi

# --- daemons -------------------------------------------------------------------------------------
# Daemons left from an earlier start.sh (another config, or only one of them alive): stop them first.
bash "$(dirname "$0")/stop.sh" --slurm-only >&2 || true
mv "$CONF.new" "$CONF"
echo "$GRES" >"$STATE/gres.conf"   # read by slurmd from the folder of slurm.conf

/usr/sbin/slurmctld -f "$CONF" || die "slurmctld did not start; see $STATE/log/slurmctld.log"
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer; see $STATE/log/slurmctld.log"
/usr/sbin/slurmd -f "$CONF" -N "$HOST" || die "slurmd did not start; see $STATE/log/slurmd.log"

# Wait (bounded) until the node is idle; a node left down/drained by an earlier run is resumed.
for _ in $(seq 300); do
    state=$(node_state)
    case $state in
        idle|mixed|allocated|completing) break ;;
        down*|drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.1
done
[[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]] \
    || die "node $HOST is '$(node_state)', not idle after 30 s; see $STATE/log/"

echo "export SLURM_CONF=$CONF" | tee "$STATE/env.sh"
