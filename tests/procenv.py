"""The environment of a child process the tests start (a torchrun job, a CLI run, the GPU check pack): this one's,
without what a launcher set (Slurm, MPI, torchrun's rank variables), so that the child chooses its own world."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_", "TORCHELASTIC_")
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def child_env(drop=(), **extra) -> dict:
    """os.environ less the launcher's variables and ``drop`` (e.g. TRITON_INTERPRET, for a child that chooses its
    own kernels), with one OpenMP thread, DeepSpeed on the CPU, the repository on PYTHONPATH, and ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(LAUNCHER_PREFIXES) and k not in RANK_VARIABLES and k not in drop}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env
