"""Timed phases. Always the host's wall-clock time per phase (how long the host took to get through it: on a GPU,
to issue its work); on a CUDA device also CUDA events, read once at the end, so the timed code gets no host
synchronization: the device's time per phase. Where host time exceeds device time, the step is host-bound.
Without a device (the run loop's train / log / sheet / eval / checkpoint): host time only."""
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
        t0 = time.perf_counter()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        try:
            yield
        finally:
            if self.cuda:
                end.record()
                self._events.append((name, start, end))
            self._wall[name] += (time.perf_counter() - t0) * 1e3

    def host_ms(self) -> Dict[str, float]:
        """The host's milliseconds per phase since the last reset."""
        return dict(self._wall)

    def totals_ms(self) -> Dict[str, float]:
        """Milliseconds per phase since the last reset: the device's on GPUs (synchronizes), else the host's."""
        if not self.cuda:
            return dict(self._wall)
        torch.cuda.synchronize()
        out: Dict[str, float] = defaultdict(float)
        for name, s, e in self._events:
            out[name] += s.elapsed_time(e)
        return dict(out)
