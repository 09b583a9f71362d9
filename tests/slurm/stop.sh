#!/usr/bin/env bash
# Stop the cluster that tests/slurm/start.sh started: cancel its jobs, then end slurmd, slurmctld
# and munged -- only the PIDs start.sh recorded, and only while each still runs the expected
# program (never by name). Safe to run twice or when nothing runs.
set -uo pipefail

STATE=${UNICOM_SLURM_DIR:-/tmp/unicom-slurm}
PIDS=$STATE/pids
say() { echo "[unicom-slurm] $*" >&2; }

# recorded NAME: print daemon NAME's recorded PID if that process still runs NAME
recorded() {
  local file=$PIDS/$1.pid pid
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && echo "$pid"
}
alive() { [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]; }

# Jobs first, through SLURM itself, while our controller still answers.
if recorded slurmctld >/dev/null; then
  jobs=$(squeue -h -t PD,R,S,CG -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    say "cancelling jobs:" $jobs
    # shellcheck disable=SC2086  # one argument per job id
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 40); do
      [ -z "$(squeue -h -t PD,R,S,CG -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi

# Then the daemons, in the reverse order of their start.
for name in slurmd slurmctld munged; do
  if pid=$(recorded "$name"); then
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do # up to 20 s
      alive "$pid" "$name" || break
      sleep 0.2
    done
    if alive "$pid" "$name"; then
      say "$name (pid $pid) ignored SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$PIDS/$name.pid"
done
say "stopped"
