#!/usr/bin/env bash
# A one-node Slurm on this machine, for the Slurm test (xtask/tests/slurm.rs) and for trying
# `cargo xtask sweep --slurm` without a cluster. Debian's slurm-wlm 22.05 and munge, no systemd,
# no accounting (no slurmdbd): `munged --force`, `slurmctld -i`, `slurmd`, all as root.
#
#   scripts/slurm_local.sh start DIR   writes DIR/slurm.conf, starts the daemons, waits for the node
#   scripts/slurm_local.sh stop DIR    stops them by their pid files in DIR
#
# Then `export SLURM_CONF=DIR/slurm.conf` points the Slurm commands at it. The controller
# listens on port SLURM_LOCAL_PORT (6817 unless set) and slurmd on the next one.
set -euo pipefail
action=${1:?usage: slurm_local.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: slurm_local.sh start|stop DIR}")
conf="$dir/slurm.conf"

stop() {
  for daemon in slurmd slurmctld munged; do
    pidfile="$dir/$daemon.pid"
    if [ -s "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
}

case "$action" in
stop)
  stop
  echo "slurm_local: stopped the daemons of $dir"
  ;;
start)
  [ "$(id -u)" = 0 ] || { echo "slurm_local: run as root (munged and slurmd need it)" >&2; exit 2; }
  mkdir -p "$dir/spool/ctld" "$dir/spool/d" "$dir/munge"
  node=$(hostname -s)
  cpus=$(nproc)
  port=${SLURM_LOCAL_PORT:-6817}
  # Slurm refuses a node whose memory is below the configured one: leave some headroom.
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  cat > "$conf" <<EOF
ClusterName=shrinktest
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=$port
SlurmdPort=$((port + 1))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=3600
KillWait=5
SchedulerParameters=sched_interval=1
NodeName=$node CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=2048
EOF
  stop
  munged --force --socket="$dir/munge/munge.socket" --pid-file="$dir/munged.pid" \
    --log-file="$dir/munged.log" --seed-file="$dir/munge/munge.seed"
  export SLURM_CONF="$conf"
  slurmctld -i -f "$conf"
  slurmd -f "$conf"
  for _ in $(seq 60); do
    if sinfo -h -N -o "%T" 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "slurm_local: node $node up ($cpus CPUs, ${mem_mb} MB); export SLURM_CONF=$conf"
      exit 0
    fi
    sleep 1
  done
  echo "slurm_local: the node did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
  sinfo -N -l >&2 || true
  tail -20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
  exit 1
  ;;
*)
  echo "usage: slurm_local.sh start|stop DIR" >&2
  exit 2
  ;;
esac
