"""Preemption and requeue: a signal (USR1 from ``sbatch --signal=USR1@90``, or TERM where a cluster preempts with
it) sets a flag; all ranks agree on it, save one checkpoint at the same step and leave the loop; once the process
group is down, rank 0 runs ``scontrol requeue`` (array tasks as ARRAYJOB_TASK) and everyone exits 0. The requeued
job continues with ``--resume auto``.

Agreeing costs no blocking collective per step: at each step boundary every rank starts an asynchronous MAX
all-reduce of its flag over a dedicated CPU (gloo) group and reads the one it started at the previous boundary,
long complete by then. A signal is acted on one or two steps after it arrives; the checkpointer asks before
sample sheets and evaluation run, so a long evaluation never delays the save past the signal's lead time."""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Any, Callable, Dict, Optional, Tuple

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
        self._pending: Optional[Tuple[torch.Tensor, Any]] = None
        if info.world > 1:  # its own group: the pending all-reduce never queues in front of training collectives
            self.group = dist.new_group(backend="gloo")  # collective: every rank builds it at the same point

    def _handler(self, signum: int, frame: object) -> None:
        self.flag = True

    def requested(self) -> bool:
        """Whether any rank had the signal by the previous call (call at every step boundary on every rank)."""
        if self.info.world == 1:
            return self.flag
        agreed = False
        if self._pending is not None:
            flag, work = self._pending
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([int(self.flag)])
        self._pending = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        return agreed

    def close(self, wait: bool = True) -> None:
        """Restore the signal handlers; ``wait``: complete the pending all-reduce (every rank started it), which
        the error path must not do (a peer may be gone or stuck)."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        if self._pending is not None and wait:
            self._pending[1].wait()
        self._pending = None


def requeue(log: Callable[[str], None]) -> None:
    """Requeue this Slurm job (rank 0, last thing before exiting: after the process group is gone, so Slurm's
    cancellation of the step finds every rank done and the requeued run finds the rendezvous port free)."""
    job = slurm_job_key()
    if job is None:
        log("preempted outside Slurm: checkpoint saved, not requeued (restart with --resume auto)")
        return
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode:
        log(f"scontrol requeue {job} failed ({proc.stderr.strip()}); resubmit the job, it resumes from the "
            f"checkpoint")
    else:
        log(f"requeued Slurm job {job}; it resumes from the checkpoint")
