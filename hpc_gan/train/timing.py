"""Timed phases. On a CUDA device: CUDA events, read once at the end, so the timed code gets no host
synchronization (``hpc-gan bench``'s step phases). Without a device: wall-clock time, the host's view, for phases
that include I/O (the run loop's train / log / sheet / eval / checkpoint)."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Tuple

import torch


class PhaseTimer:
    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.cuda = device is not None and device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._events: List[Tuple[str, object, object]] = []
        self._wall: Dict[str, float] = defaultdict(float)

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
            try:
                yield
            finally:
                self._wall[name] += (time.perf_counter() - t0) * 1e3

    def totals_ms(self) -> Dict[str, float]:
        """Milliseconds per phase since the last reset (synchronizes on GPUs)."""
        if not self.cuda:
            return dict(self._wall)
        torch.cuda.synchronize()
        out: Dict[str, float] = defaultdict(float)
        for name, s, e in self._events:
            out[name] += s.elapsed_time(e)
        return dict(out)
