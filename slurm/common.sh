# Sourced by the sbatch scripts: paths, rendezvous, NCCL defaults, job settings. Not a job script itself.
ROOT=${HPC_GAN_ROOT:-$SLURM_SUBMIT_DIR}
HPC_GAN=${HPC_GAN:-$ROOT/.venv/bin/hpc-gan}
if [ ! -x "$HPC_GAN" ]; then
  echo "hpc-gan slurm: $HPC_GAN is not executable; run 'make env' in $ROOT or set HPC_GAN=/path/to/hpc-gan" >&2
  exit 2
fi
cd "$ROOT"

# Rendezvous: left to hpc_gan.dist.launch, which takes the first node of the *step's* node list (srun may run on
# a subset of the job's nodes), resolves it through Slurm's NodeAddr where its name does not resolve, and derives
# a port from the job id below the ephemeral range. Set MASTER_ADDR / MASTER_PORT in the submitting shell to force.

# srun of Slurm 22.05-23.02 does not inherit --cpus-per-task from sbatch: without this every rank gets one core.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
# Each rank pinned to its cores; GPUs not narrowed (a rank sees its node's GPUs and takes its local rank's, or, with
# --gpus-per-task=1, the one it is given); --label prefixes every line of the job log with its rank.
SRUN_FLAGS=${SRUN_FLAGS:---kill-on-bad-exit=1 --label --cpu-bind=cores --gpu-bind=none}

# NCCL settings people need on real clusters; safe defaults, each overridable from the submitting shell.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                                   # INFO to debug hangs / topology
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}  # a failed or timed-out collective
                                                                        # tears the process group down; the job ends
# the flight recorder: each rank's last collectives, written on a timeout. Both name families: torch >= 2.7 reads
# TORCH_FR_* (and warns once per rank that the TORCH_NCCL_* one is deprecated), older torch only TORCH_NCCL_*.
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000} TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
[ -n "${NCCL_SOCKET_IFNAME:-}" ] && export NCCL_SOCKET_IFNAME              # e.g. ib0, or ^lo,docker0
[ -n "${NCCL_IB_HCA:-}" ] && export NCCL_IB_HCA                            # e.g. mlx5_0,mlx5_1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# The job's key: array tasks get ARRAYJOB_TASK, so each has its own run directory; requeues keep it.
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then JOB_KEY=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}; else JOB_KEY=$SLURM_JOB_ID; fi

write_job_settings() {  # the resolved settings of this (re)start, appended to RUN_DIR/slurm-job.env
  mkdir -p "$1/logs"
  # the NCCL flight recorder's per-rank dumps go beside the run, not to a node's /tmp
  export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$(realpath -m "$1")/logs/nccl_trace_rank_}
  export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$TORCH_NCCL_DEBUG_INFO_TEMP_FILE}
  {
    echo "# $(date -Is) start $((${SLURM_RESTART_COUNT:-0} + 1)) of job $JOB_KEY"
    for v in SLURM_JOB_ID SLURM_ARRAY_JOB_ID SLURM_ARRAY_TASK_ID SLURM_JOB_NAME SLURM_JOB_NODELIST SLURM_JOB_NUM_NODES \
             SLURM_NTASKS SLURM_NTASKS_PER_NODE SLURM_CPUS_PER_TASK SRUN_CPUS_PER_TASK SLURM_GPUS_PER_NODE \
             SLURM_RESTART_COUNT MASTER_ADDR MASTER_PORT SRUN_FLAGS NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_HCA \
             TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_TRACE_BUFFER_SIZE TORCH_FR_BUFFER_SIZE \
             TORCH_NCCL_DUMP_ON_TIMEOUT TORCH_NCCL_DEBUG_INFO_TEMP_FILE OMP_NUM_THREADS CONFIG OVERRIDES HPC_GAN; do
      echo "$v=${!v:-}"
    done
  } >>"$1/slurm-job.env"
}
