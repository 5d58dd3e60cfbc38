"""The numbers of a run: the training step's metrics summed on the device (:class:`StepMetrics`), and where every
logged number goes: metrics.jsonl (one JSON object per line) and TensorBoard events where installed. Ranks other
than 0 write nothing (:class:`NullWriter`)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist


class MetricsWriter:
    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: Optional[int] = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from: those steps are about to be redone.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, step: int, values: Dict[str, Any]) -> None:
        record = {"step": step, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class NullWriter:
    """What ranks other than 0 write: nothing."""

    def write(self, step: int, values: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class StepMetrics:
    """Loss metrics of the training step, summed on the device between logging steps. Each update adds its named
    values at once (one stacked vector: a few ops, whatever the number of values); non-finite values are left out
    of the sums, so a skipped update's NaN does not poison the mean of its window. :meth:`pop` reads every mean
    with one all-reduce over ranks and one transfer: call it at logging steps only."""

    def __init__(self) -> None:
        self._groups: Dict[Tuple[str, ...], Tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def add(self, **values: torch.Tensor) -> None:
        names = tuple(values)
        v = torch.stack(list(values.values())).float()
        finite = torch.isfinite(v)
        sums, counts = self._groups.get(names, (0.0, 0.0))
        self._groups[names] = (sums + torch.where(finite, v, 0.0), counts + finite)

    def pop(self, world: int = 1, **extra: torch.Tensor) -> Dict[str, Optional[float]]:
        """Means since the last call over ranks and updates (None where every value was non-finite), and the
        ``extra`` device scalars averaged over ranks."""
        if not self._groups and not extra:
            return {}
        names = [n for group in self._groups for n in group]
        parts = [s for s, _ in self._groups.values()] + [c for _, c in self._groups.values()]
        if extra:
            parts.append(torch.stack(list(extra.values())).float())
        flat = torch.cat([p.reshape(-1).float() for p in parts])
        if world > 1:  # every rank calls this at the same steps
            dist.all_reduce(flat)
        values, k = flat.tolist(), len(names)
        totals: Dict[str, Tuple[float, float]] = {}
        for name, s, c in zip(names, values[:k], values[k:2 * k]):  # a name in several groups adds up
            ts, tc = totals.get(name, (0.0, 0.0))
            totals[name] = (ts + s, tc + c)
        result: Dict[str, Optional[float]] = {n: (s / c if c else None) for n, (s, c) in totals.items()}
        result.update({name: v / world for name, v in zip(extra, values[2 * k:])})
        self._groups = {}
        return dict(sorted(result.items()))
