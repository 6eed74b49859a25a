#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests: slurm/local_cluster.sh start|stop
#
# start: installs slurm-wlm and munge if missing (apt), writes a munge key and /etc/slurm/slurm.conf,
# starts munged, slurmctld and slurmd, and waits until `sinfo` shows the node idle. Safe to rerun.
# stop: kills the daemons that `start` started, by their pid files; daemons it found running are left alone.
# Needs root (it writes /etc and starts system daemons). Settings follow /work/shared/local-slurm.md:
# no systemd, no cgroups, no accounting database.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by spd slurm/local_cluster.sh"
STATE=/run/spd-local-slurm  # one file per daemon that start started: its pid file's path
declare -A PIDFILE=([munged]=/run/munge/munged.pid [slurmctld]=/run/slurmctld.pid [slurmd]=/run/slurmd.pid)

running() {  # the daemon named $1 is alive per its pid file
  local pid
  pid=$(cat "${PIDFILE[$1]}" 2>/dev/null) && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

start_daemon() {  # start daemon $1 with command "${@:2}" unless it runs already; remember that we started it
  if running "$1"; then echo "$1 already running"; return; fi
  "${@:2}"
  for _ in $(seq 50); do running "$1" && break; sleep 0.2; done
  running "$1" || { echo "error: $1 did not start; see its log under /var/log" >&2; exit 1; }
  echo "${PIDFILE[$1]}" > "$STATE/$1"
}

write_conf() {
  local host cpus mem_mb
  host=$(hostname)
  cpus=$(nproc)
  mem_mb=$(( $(awk '/^MemTotal/ {print $2}' /proc/meminfo) * 9 / 10 / 1024 ))  # slurmd drains a node that has less than RealMemory
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "error: $CONF exists and was not written by this script; not overwriting a real cluster's config" >&2
    exit 1
  fi
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > "$CONF" <<EOF
$MARK
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=${PIDFILE[slurmd]}
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  [ "$(id -u)" = 0 ] || { echo "error: run as root (it writes /etc/slurm and starts daemons)" >&2; exit 1; }
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge
  fi
  mkdir -p "$STATE"
  if [ ! -s /etc/munge/munge.key ]; then
    head -c 1024 /dev/urandom > /etc/munge/munge.key
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge /run/munge /var/lib/munge /var/log/munge  # /run is empty without systemd
  start_daemon munged runuser -u munge -- /usr/sbin/munged
  munge -n | unmunge > /dev/null
  write_conf
  start_daemon slurmctld slurmctld
  start_daemon slurmd slurmd
  for _ in $(seq 60); do
    [ "$(sinfo -h -o %t 2>/dev/null)" = idle ] && { sinfo; return; }
    sleep 1
  done
  echo "error: the node did not become idle in 60 s; see /var/log/slurm/slurmd.log and slurmctld.log" >&2
  sinfo >&2 || true
  exit 1
}

stop() {
  local name pid
  for name in slurmd slurmctld munged; do  # reverse start order
    [ -f "$STATE/$name" ] || continue
    if running "$name"; then
      pid=$(cat "${PIDFILE[$name]}")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      echo "stopped $name ($pid)"
    fi
    rm -f "$STATE/$name"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
