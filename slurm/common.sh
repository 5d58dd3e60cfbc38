# Sourced by the sbatch scripts: paths, rendezvous, NCCL defaults, job settings. Not a job script itself.
ROOT=${HPC_GAN_ROOT:-$SLURM_SUBMIT_DIR}
HPC_GAN=${HPC_GAN:-$ROOT/.venv/bin/hpc-gan}
if [ ! -x "$HPC_GAN" ]; then
  echo "hpc-gan slurm: $HPC_GAN is not executable; run 'make env' in $ROOT or set HPC_GAN=/path/to/hpc-gan" >&2
  exit 2
fi
cd "$ROOT"

# Rendezvous: the first node of the job, by name where it resolves, else by Slurm's NodeAddr; one port per job.
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if getent hosts "$first" >/dev/null 2>&1; then
  MASTER_ADDR=${MASTER_ADDR:-$first}
else
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')}
fi
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}

# NCCL settings people need on real clusters; safe defaults, each overridable from the submitting shell.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                                   # INFO to debug hangs / topology
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed collective aborts the job
[ -n "${NCCL_SOCKET_IFNAME:-}" ] && export NCCL_SOCKET_IFNAME              # e.g. ib0, or ^lo,docker0
[ -n "${NCCL_IB_HCA:-}" ] && export NCCL_IB_HCA                            # e.g. mlx5_0,mlx5_1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# The job's key: array tasks get ARRAYJOB_TASK, so each has its own run directory; requeues keep it.
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then JOB_KEY=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}; else JOB_KEY=$SLURM_JOB_ID; fi

write_job_settings() {  # the resolved settings of this (re)start, appended to RUN_DIR/slurm-job.env
  mkdir -p "$1"
  {
    echo "# $(date -Is) start $((${SLURM_RESTART_COUNT:-0} + 1)) of job $JOB_KEY"
    for v in SLURM_JOB_ID SLURM_ARRAY_JOB_ID SLURM_ARRAY_TASK_ID SLURM_JOB_NAME SLURM_JOB_NODELIST SLURM_JOB_NUM_NODES \
             SLURM_NTASKS SLURM_NTASKS_PER_NODE SLURM_CPUS_PER_TASK SLURM_GPUS_PER_NODE SLURM_RESTART_COUNT \
             MASTER_ADDR MASTER_PORT NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_HCA TORCH_NCCL_ASYNC_ERROR_HANDLING \
             OMP_NUM_THREADS CONFIG OVERRIDES HPC_GAN; do
      echo "$v=${!v:-}"
    done
  } >>"$1/slurm-job.env"
}
