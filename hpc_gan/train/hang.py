"""What every rank was doing when a job hangs: ``faulthandler`` dumps this process's Python stacks (all threads) to
its stderr (the rank's log) when a training step takes more than ``dist.hang_dump_factor`` x the median of the
recent steps, and at least ``min_seconds`` (the loop passes a quarter of the step timeout). Every rank arms its own
timer, so a hang leaves one dump per rank: the rank stuck elsewhere, and the ranks waiting for it in a collective.
Arming is a call into faulthandler's C watchdog thread per step: no sync."""
from __future__ import annotations

import contextlib
import faulthandler
import statistics
import sys
import time
from collections import deque
from typing import Deque, Iterator, Optional


class HangDump:
    def __init__(self, factor: float, window: int = 50, min_seconds: float = 1.0, warmup: int = 1) -> None:
        self.factor, self.min_seconds, self.warmup = factor, min_seconds, warmup
        self.times: Deque[float] = deque(maxlen=window)
        self._t0: Optional[float] = None
        self._seen = 0
        self._file = _stderr()

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Around one training step."""
        self.arm()
        try:
            yield
        finally:
            self.disarm()

    def arm(self) -> None:
        self._t0 = time.perf_counter()
        if self.factor > 0 and len(self.times) >= 3 and self._file is not None:
            limit = max(self.factor * statistics.median(self.times), self.min_seconds)
            faulthandler.dump_traceback_later(limit, repeat=False, file=self._file, exit=False)

    def disarm(self) -> None:
        if self.factor > 0 and self._file is not None:
            faulthandler.cancel_dump_traceback_later()
        if self._t0 is not None:
            self._seen += 1
            if self._seen > self.warmup:  # the first steps compile and warm up: not what a step takes
                self.times.append(time.perf_counter() - self._t0)
            self._t0 = None


def _stderr():
    """A real file for faulthandler (it writes to a file descriptor; a captured sys.stderr may have none)."""
    for f in (sys.stderr, sys.__stderr__):
        try:
            f.fileno()
            return f
        except (AttributeError, OSError, ValueError):
            continue
    return None
