"""Per-phase timing of the training step for ``hpc-gan bench``: CUDA events on GPUs (read once at the end, so the
step itself gets no host synchronization), perf_counter on CPUs."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Dict, Iterator, List, Tuple

import torch


class PhaseTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._events: List[Tuple[str, object, object]] = []
        self._cpu: Dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu[name] += (time.perf_counter() - t0) * 1e3

    def totals_ms(self) -> Dict[str, float]:
        """Milliseconds per phase since the last reset (synchronizes on GPUs)."""
        if not self.cuda:
            return dict(self._cpu)
        torch.cuda.synchronize()
        out: Dict[str, float] = defaultdict(float)
        for name, s, e in self._events:
            out[name] += s.elapsed_time(e)
        return dict(out)
