#!/usr/bin/env bash
# Stop the local Slurm started by start.sh in DIR: only the daemons whose PIDs it recorded (munged is left running).
set -uo pipefail
DIR=$(realpath -m "${1:-/tmp/hpc-gan-slurm}")
for f in "$DIR"/slurmd-n1.pid "$DIR"/slurmd-n2.pid "$DIR"/slurmctld.pid; do
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null && for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  rm -f "$f"
done
echo "slurm/local: stopped ($DIR)"
