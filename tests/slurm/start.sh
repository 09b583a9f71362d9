#!/usr/bin/env bash
# Start a real one-node SLURM cluster (Debian 12 packages: Slurm 22.05 + munge) on loopback, for
# tests/test_slurm.py and CI. Run as root. Idempotent: installs what is missing, writes the config,
# starts only the daemons that are not running, waits until the node takes jobs, prints sinfo.
#
# The PIDs of the daemons it starts go to $UNICOM_SLURM_DIR/pids/, so that tests/slurm/stop.sh
# ends exactly those (by PID) -- call it from a trap or a test finalizer.
#
# Settings (environment):
#   UNICOM_SLURM_DIR     state, logs and PID files           (default /tmp/unicom-slurm)
#   UNICOM_SLURM_MEM_MB  memory the node offers              (default 85% of the machine's)
#   UNICOM_SLURM_GPUS    fake GPUs the node advertises (gres gpu backed by /dev/null), so that
#                        jobs asking for --gpus can be scheduled; there is no GPU   (default 0)
#   UNICOM_SLURM_WAIT_S  how long to wait for the node       (default 60)
#
# No accounting daemon: `sacct` does not work here, so clients must poll with squeue
# (profiles/slurm-ci sets slurm-status-command: squeue); MinJobAge keeps finished jobs visible.
set -euo pipefail

STATE=${UNICOM_SLURM_DIR:-/tmp/unicom-slurm}
GPUS=${UNICOM_SLURM_GPUS:-0}
WAIT_S=${UNICOM_SLURM_WAIT_S:-60}
NODE=localhost
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
MARK="# written by unicom-pipeline tests/slurm/start.sh"

say() { echo "[unicom-slurm] $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"
case "$GPUS" in '' | *[!0-9]*) die "UNICOM_SLURM_GPUS must be a count, got '$GPUS'" ;; esac

# --- packages ---------------------------------------------------------------------------------
missing=()
for pair in /usr/sbin/slurmctld:slurmctld /usr/sbin/slurmd:slurmd /usr/bin/sbatch:slurm-client \
  /usr/sbin/munged:munge; do
  [ -x "${pair%%:*}" ] || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  # The packages' maintainer scripts would start the services; forbid that for the install so
  # that only this script starts daemons (and records their PIDs).
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi
fi

# --- helpers ----------------------------------------------------------------------------------
PIDS=$STATE/pids
mkdir -p "$STATE"/{ctld,spool,log} "$PIDS"

# running NAME: the PID recorded for daemon NAME still runs a program called NAME
running() {
  local file=$PIDS/$1.pid
  [ -s "$file" ] && [ "$(cat "/proc/$(cat "$file")/comm" 2>/dev/null)" = "$1" ]
}
# await_pidfile FILE NAME: wait up to 10 s for a daemon's own PID file naming a live NAME
await_pidfile() {
  local pid
  for _ in $(seq 100); do
    pid=$(cat "$1" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]; then
      echo "$pid"
      return 0
    fi
    sleep 0.1
  done
  return 1
}
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# --- configuration ----------------------------------------------------------------------------
for file in "$CONF" "$GRES_CONF"; do
  if [ -e "$file" ] && ! grep -qF "$MARK" "$file"; then
    die "$file exists and was not written by this script; not overwriting a real cluster's config"
  fi
done
# The node's CPU layout and memory as slurmd itself detects them.
detected=$(/usr/sbin/slurmd -C | head -1)
layout=$(grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' \
  <<<"$detected" | tr '\n' ' ')
machine_mem=$(grep -oE 'RealMemory=[0-9]+' <<<"$detected" | cut -d= -f2)
mem=${UNICOM_SLURM_MEM_MB:-$((machine_mem * 85 / 100))}

gres_line="" node_gres=""
if [ "$GPUS" -gt 0 ]; then
  gres_line="GresTypes=gpu"
  node_gres="Gres=gpu:$GPUS "
  {
    echo "$MARK"
    echo "NodeName=$NODE Name=gpu Count=$GPUS File=/dev/null"
  } >"$GRES_CONF"
else
  rm -f "$GRES_CONF"
fi

conf=$(
  cat <<EOF
$MARK
ClusterName=unicom-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Listen on loopback only.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
# Without accounting, squeue is the only way to see a finished job's state: keep finished jobs
# listed for an hour (the snakemake plugin wants at least 3 x its first status-check delay).
MinJobAge=3600
KillWait=5
InactiveLimit=0
Waittime=0
$gres_line
NodeName=$NODE NodeAddr=127.0.0.1 ${layout}RealMemory=$mem ${node_gres}State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
conf_changed=0
if [ "$(cat "$CONF" 2>/dev/null)" != "$conf" ]; then
  mkdir -p "$(dirname "$CONF")"
  printf '%s\n' "$conf" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
  conf_changed=1
fi

# --- munged -----------------------------------------------------------------------------------
if munge_works; then
  say "munged already answers"
else
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 0700 /etc/munge
    head -c 1024 /dev/urandom >/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  rm -f /run/munge/munged.pid
  # munged refuses to run as root; it daemonizes and writes its own PID file.
  setpriv --reuid munge --regid munge --init-groups /usr/sbin/munged --force
  pid=$(await_pidfile /run/munge/munged.pid munged) ||
    { tail -20 /var/log/munge/munged.log >&2 || true; die "munged did not start"; }
  echo "$pid" >"$PIDS/munged.pid"
  for _ in $(seq 50); do munge_works && break || sleep 0.1; done
  munge_works || die "munge cannot encode and decode a credential"
  say "munged started (pid $pid)"
fi

# --- slurmctld, slurmd ------------------------------------------------------------------------
if running slurmctld; then
  if [ "$conf_changed" = 1 ]; then
    # A changed node (CPUs, gres) needs a restart: tests/slurm/stop.sh, then this script.
    say "config changed: scontrol reconfigure"
    scontrol reconfigure || true
  fi
  say "slurmctld already running"
else
  rm -f "$STATE/slurmctld.pid"
  /usr/sbin/slurmctld -c # -c: no jobs or node states left over from an earlier run
  pid=$(await_pidfile "$STATE/slurmctld.pid" slurmctld) ||
    { tail -30 "$STATE/log/slurmctld.log" >&2 || true; die "slurmctld did not start"; }
  echo "$pid" >"$PIDS/slurmctld.pid"
  say "slurmctld started (pid $pid)"
fi

if running slurmd; then
  say "slurmd already running"
else
  rm -f "$STATE/slurmd.pid"
  /usr/sbin/slurmd -N "$NODE"
  pid=$(await_pidfile "$STATE/slurmd.pid" slurmd) ||
    { tail -30 "$STATE/log/slurmd.log" >&2 || true; die "slurmd did not start"; }
  echo "$pid" >"$PIDS/slurmd.pid"
  say "slurmd started (pid $pid)"
fi

# --- wait until the node takes jobs -----------------------------------------------------------
state=""
for _ in $(seq $((WAIT_S * 2))); do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
  case "$state" in
    idle | mixed | allocated) break ;;
    down* | drain* | inval*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle | mixed | allocated) sinfo ;;
  *)
    scontrol show node "$NODE" >&2 || true
    tail -20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    die "node $NODE is not ready (state '$state')"
    ;;
esac
