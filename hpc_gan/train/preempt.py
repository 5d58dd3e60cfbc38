"""Preemption and requeue: a signal (USR1 from ``sbatch --signal=USR1@90``, or TERM where a cluster preempts with
it) sets a flag; at the next step boundary all ranks agree on it with one all-reduce (over a CPU group, so a GPU
run gets no device sync from it), save one checkpoint at the same step, rank 0 runs ``scontrol requeue`` (array
tasks as ARRAYJOB_TASK) and everyone exits 0. The requeued job continues with ``--resume auto``."""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from hpc_gan.dist import DistInfo
from hpc_gan.errors import UserError


def slurm_job_key(env: Optional[Dict[str, str]] = None) -> Optional[str]:
    env = dict(os.environ) if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


class Preemption:
    def __init__(self, signals: str, info: DistInfo) -> None:
        self.info, self.flag, self._old = info, False, {}
        names = [s.strip().upper().removeprefix("SIG") for s in signals.split(",") if s.strip()]
        for name in names:
            if not hasattr(signal, f"SIG{name}"):
                raise UserError(f"run.preempt_signals: unknown signal {name!r}; use e.g. USR1 or USR1,TERM")
            sig = getattr(signal, f"SIG{name}")
            self._old[sig] = signal.signal(sig, self._handler)
        self.group = None
        if info.world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # collective: every rank builds it at the same point

    def _handler(self, signum: int, frame: object) -> None:
        self.flag = True

    def requested(self) -> bool:
        """Whether any rank got the signal (collective when distributed: call at the same steps on every rank)."""
        if self.info.world == 1:
            return self.flag
        t = torch.tensor([int(self.flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def requeue(self, log: Callable[[str], None]) -> None:
        if not self.info.is_main:
            return
        job = slurm_job_key()
        if job is None:
            log("preempted outside Slurm: checkpoint saved, not requeued (restart with --resume auto)")
            return
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if proc.returncode:
            log(f"scontrol requeue {job} failed ({proc.stderr.strip()}); resubmit the job, it resumes from the "
                f"checkpoint")
        else:
            log(f"requeued Slurm job {job}; it resumes from this checkpoint")

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
