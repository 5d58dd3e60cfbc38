"""Non-finite steps (``train.nonfinite``): a step whose loss or gradients are NaN or inf.

Flags live on the device, so the step gets no host synchronization. Each optimizer update gets a flag (its losses
non-finite, or, where the engine exposes them, its gradients). With ``skip`` the flag is made global (MAX over
ranks) and handed to the optimizer, which then leaves parameters and Adam state untouched on the device (fused
Adam's ``found_inf``), so every rank skips alike. With ``stop`` updates are applied as computed and the run stops.

The host reads the step's verdict one step late (a copy behind a CUDA event, which is long complete by then), and
at once at steps where the run syncs anyway (logging, checkpoints), so a checkpoint never holds a step it has not
checked.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


class NonFiniteGuard:
    def __init__(self, mode: str, max_consecutive: int, device: torch.device, world: int) -> None:
        self.skip, self.max_consecutive, self.world = mode == "skip", max_consecutive, world
        self.device = device
        # [any update of the current step non-finite, consecutive such steps, such steps since the last log]
        self.state = torch.zeros(3, device=device)
        self._snapshots: List[Tuple[int, torch.Tensor, Optional[torch.cuda.Event]]] = []

    def update_flag(self, losses_bad: torch.Tensor, grads_bad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Record one optimizer update's flag; returns the (global) ``found_inf`` to skip it with, in skip mode."""
        bad = losses_bad.float().reshape(1)
        if grads_bad is not None:
            bad = torch.maximum(bad, grads_bad.reshape(1))
        if self.skip and self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # one tiny device collective: every rank skips alike
        self.state[0] = torch.maximum(self.state[0], bad[0])
        return bad if self.skip else None

    def end_step(self, step: int) -> None:
        """Close the step's bookkeeping on the device and queue its verdict for the host."""
        bad = self.state[0]
        self.state[1] = (self.state[1] + 1) * bad        # consecutive non-finite steps (0 after a good one)
        self.state[2] += bad
        snap = self.state[:2].clone()
        if self.device.type == "cuda":
            host = torch.empty(2, pin_memory=True)
            host.copy_(snap, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._snapshots.append((step, host, event))
        else:
            self._snapshots.append((step, snap, None))
        # zero_, not `= 0.0`: on CUDA, item assignment of a Python number copies it from pageable host memory, which
        # synchronizes every step (tests/test_gpu.py caught it on the H200, 2026-11-27)
        self.state[0].zero_()

    def check(self, now: bool = False) -> Optional[str]:
        """The problem to stop for, if any, from the verdicts of steps before the newest (all of them with
        ``now``); None to go on."""
        keep = 0 if now else 1
        problem = None
        while len(self._snapshots) > keep:
            step, flags, event = self._snapshots.pop(0)
            if event is not None:
                event.synchronize()
            bad, consecutive = (float(v) for v in flags.tolist())
            if problem is None and bad and not self.skip:
                problem = (f"non-finite loss or gradients at step {step} (train.nonfinite=stop)")
            elif problem is None and self.skip and consecutive >= self.max_consecutive:
                problem = (f"{int(consecutive)} consecutive steps with non-finite loss or gradients up to step "
                           f"{step}, their updates skipped (train.nonfinite_max={self.max_consecutive})")
        return problem

    def pop_window(self) -> torch.Tensor:
        """Steps with a non-finite update since the last call (a device scalar)."""
        count = self.state[2].clone()
        self.state[2].zero_()
        return count
