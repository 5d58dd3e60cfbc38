#!/usr/bin/env bash
# A real Slurm cluster on one machine, for the tests and for trying the sbatch scripts: one slurmctld and two slurmd
# as fake nodes n1, n2 on 127.0.0.1. Installs Debian's slurmctld/slurmd/slurm-client/munge when missing (as root).
# Usage: slurm/local/start.sh [DIR]   (default /tmp/hpc-gan-slurm) ; then: export SLURM_CONF=DIR/slurm.conf
# Stop with slurm/local/stop.sh DIR (kills only the PIDs recorded here).
# Two clusters on one machine need their own DIR, SLURM_LOCAL_PORT_BASE (the daemons listen on BASE+1, +2, +10) and
# SLURM_LOCAL_FIRST_JOB_ID (the trainer derives its rendezvous port from the job id: equal ids, equal ports).
set -euo pipefail
DIR=$(realpath -m "${1:-/tmp/hpc-gan-slurm}")
# below hpc_gan.dist.launch's rendezvous ports [15000, 32000), so a job's derived port never lands on a daemon
PORT_BASE=${SLURM_LOCAL_PORT_BASE:-14000}
FIRST_JOB_ID=${SLURM_LOCAL_FIRST_JOB_ID:-1}
CPUS=${SLURM_LOCAL_CPUS:-1}
mkdir -p "$DIR"/{state,log}

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "slurm/local/start.sh: Slurm is not installed and this is not a root Debian/Ubuntu shell; install slurmctld," \
         "slurmd, slurm-client and munge" >&2
    exit 3
  fi
  echo "slurm/local: installing slurmctld slurmd slurm-client munge"
  (apt-get install -y -qq slurmctld slurmd slurm-client munge >"$DIR/log/apt.log" 2>&1) || \
    (apt-get update -qq >"$DIR/log/apt.log" 2>&1 && apt-get install -y -qq slurmctld slurmd slurm-client munge \
      >>"$DIR/log/apt.log" 2>&1)
fi

# munge: one daemon per machine; reuse a running one
if [ ! -f /etc/munge/munge.key ]; then mungekey --create >/dev/null 2>&1 || /usr/sbin/mungekey --create; fi
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown -R munge:munge /run/munge /var/log/munge /var/lib/munge \
  /etc/munge 2>/dev/null || true
if ! pgrep -x munged >/dev/null; then
  if id munge >/dev/null 2>&1; then su -s /bin/sh munge -c "munged --force" 2>/dev/null || munged --force; \
  else munged --force; fi
fi

HOST=$(hostname -s)
cat >"$DIR/slurm.conf" <<CONF
ClusterName=hpcganlocal
SlurmctldHost=$HOST
SlurmctldPort=$((PORT_BASE + 10))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
FirstJobId=$FIRST_JOB_ID
MinJobAge=600
KillWait=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[$((PORT_BASE + 1))-$((PORT_BASE + 2))] CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$DIR/slurm.conf"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
alive "$DIR/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
for n in n1 n2; do alive "$DIR/slurmd-$n.pid" || slurmd -f "$SLURM_CONF" -N "$n"; done

for _ in $(seq 1 60); do
  if [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -c -E '^idle|^mixed|^allocated')" = 2 ]; then
    echo "slurm/local: nodes n1, n2 up (export SLURM_CONF=$SLURM_CONF)"
    exit 0
  fi
  sleep 0.5
done
echo "slurm/local/start.sh: nodes did not come up in 30 s; see $DIR/log" >&2
sinfo -N >&2 || true
exit 4
