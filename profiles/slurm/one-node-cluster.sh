#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, to try profiles/slurm against a real scheduler:
#   profiles/slurm/one-node-cluster.sh start    # install (Debian packages) if needed, configure, start
#   profiles/slurm/one-node-cluster.sh status   # sinfo
#   profiles/slurm/one-node-cluster.sh stop     # stop the daemons it started, by pid
# Needs root (or sudo) and Debian's slurmctld, slurmd, slurm-client and munge. There is no systemd
# here: munged runs as user munge, then slurmctld and slurmd as root. No accounting daemon
# (slurmdbd) is configured, so the profile must check job states with `squeue`
# (`--slurm-status-command squeue`). The node advertises one count-only GPU (gres.conf points it
# at /dev/null), so rules asking for a GPU schedule; whether CUDA sees a GPU is another matter.
# Idempotent: `start` on a running cluster leaves it running.
set -euo pipefail

STATE=${MEMDISTILL_SLURM_STATE:-/var/lib/memdistill-slurm}
CONF_DIR=/etc/slurm
NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=${MEMDISTILL_SLURM_MEM_MB:-20000}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sinfo >/dev/null \
      || ! command -v munged >/dev/null; then
    $SUDO apt-get update -qq || true
    $SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
  fi
}

write_config() {
  $SUDO mkdir -p "$STATE/ctld" "$STATE/d" "$CONF_DIR"
  $SUDO tee "$CONF_DIR/slurm.conf" >/dev/null <<EOF
# written by memdistill profiles/slurm/one-node-cluster.sh
ClusterName=memdistill
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SchedulerType=sched/backfill
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
  echo "Name=gpu File=/dev/null" | $SUDO tee "$CONF_DIR/gres.conf" >/dev/null
}

start() {
  install_packages
  write_config
  $SUDO mkdir -p /run/munge
  $SUDO chown munge:munge /run/munge
  if ! running /run/munge/munged.pid; then
    $SUDO runuser -u munge -- /usr/sbin/munged
  fi
  running "$STATE/slurmctld.pid" || $SUDO slurmctld
  running "$STATE/slurmd.pid" || $SUDO slurmd
  for _ in $(seq 30); do
    if sinfo -h -o "%t" 2>/dev/null | grep -qE "^(idle|mix|alloc)"; then
      sinfo
      return 0
    fi
    sleep 1
  done
  echo "the node did not come up; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
  exit 1
}

stop() {
  for pid in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
    if running "$pid"; then $SUDO kill "$(cat "$pid")"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
