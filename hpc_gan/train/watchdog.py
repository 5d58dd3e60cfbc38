"""The collapse watchdog: alarms from the signals that precede a GAN's collapse (docs/stability.md).

- ``sigma_G`` / ``sigma_D``: BigGAN §4.1: the top singular value sigma_0 of G's (and D's) layers spikes a few
  thousand iterations before the samples go. Alarm: the largest sigma_0 above ``watch_sigma_factor`` x its minimum
  over the previous ``watch_window`` observations (from the third observation on).
- ``d_gap``: D's mean logit gap between reals and fakes (d_real - d_fake) falls below ``watch_gap_fraction`` x its
  best for a whole window, once it has reached 0.5 (at the start it is ~0 by construction): D has stopped telling
  them apart.
- ``cond_grad``: ReACGAN Fig. 2: ACGAN's classifier-gradient norm explodes early while D2D-CE's stays bounded. Alarm:
  above ``watch_grad_factor`` x its window minimum.
- ``accuracy`` / ``fid``: the demo's class accuracy of samples ``watch_acc_drop`` below its best, or FID
  ``watch_fid_rise`` (relative) above its best.
- ``diversity``: the within-class diversity of the demo's samples below ``watch_div_fraction`` x its best: G
  drawing one image per class, which no other signal sees (ACGAN's collapse in docs/stability.md).
- ``nonfinite``: a logged value is NaN or inf, or updates were skipped (train.nonfinite=skip).

A kind that fired stays quiet for one window. Observations are the means the Logger pops at logging steps (the
diagnostics run every ``train.diag_every`` steps, off the hot path otherwise).
"""
from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional

SIGNALS = {"sigma_G": "diag_sigma_G_max", "sigma_D": "diag_sigma_D_max", "cond_grad": "diag_cond_grad_norm"}
GAP_ARMED = 0.5  # the gap alarm arms once D separates reals from fakes by this much


@dataclass
class Alarm:
    step: int
    kind: str
    value: float
    threshold: float
    checkpoint: Optional[str] = None  # the newest checkpoint from before the alarm (pinned), set by the action

    def line(self) -> str:
        back = f"; newest checkpoint before it: {self.checkpoint}" if self.checkpoint else "; no checkpoint before it"
        return (f"watchdog: {self.kind} alarm at step {self.step}: {self.value:.4g} "
                f"(threshold {self.threshold:.4g}){back}")


class Watchdog:
    """Decides alarms from one observation per logging step (rank 0's; the action shares the decision)."""

    def __init__(self, t: Any) -> None:
        self.t = t
        self.window = t.watch_window
        self.history: Dict[str, Deque[float]] = {k: deque(maxlen=self.window) for k in SIGNALS}
        self.quiet: Dict[str, int] = {}
        self.gap_best = 0.0
        self.gap_low = 0
        self.best_acc: Optional[float] = None
        self.best_fid: Optional[float] = None
        self.best_div: Optional[float] = None

    def reset(self) -> None:
        """Forget the trailing windows (after a rollback the run continues from an earlier state)."""
        self.__init__(self.t)

    def _fire(self, out: List[Alarm], step: int, kind: str, value: float, threshold: float) -> None:
        if self.quiet.get(kind, 0) > 0:
            return
        self.quiet[kind] = self.window
        out.append(Alarm(step, kind, float(value), float(threshold)))

    def observe(self, step: int, values: Dict[str, Optional[float]], evals: Optional[Dict[str, float]] = None
                ) -> List[Alarm]:
        t, out = self.t, []
        self.quiet = {k: n - 1 for k, n in self.quiet.items() if n > 1}
        bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad or (values.get("nonfinite_steps") or 0) > 0:
            self._fire(out, step, "nonfinite", float("nan") if bad else float(values["nonfinite_steps"]), 0.0)
        for kind, key in SIGNALS.items():
            v = values.get(key)
            if v is None or not math.isfinite(v):
                continue
            hist = self.history[kind]
            factor = t.watch_grad_factor if kind == "cond_grad" else t.watch_sigma_factor
            if len(hist) >= min(2, self.window) and v > factor * min(hist):  # from the 3rd observation on
                self._fire(out, step, kind, v, factor * min(hist))
            hist.append(v)
        if values.get("d_real") is not None and values.get("d_fake") is not None:
            gap = values["d_real"] - values["d_fake"]
            self.gap_best = max(self.gap_best, gap)
            low = self.gap_best >= GAP_ARMED and gap < t.watch_gap_fraction * self.gap_best
            self.gap_low = self.gap_low + 1 if low else 0
            if self.gap_low >= self.window:
                self._fire(out, step, "d_gap", gap, t.watch_gap_fraction * self.gap_best)
                self.gap_low = 0
        for key, v in (evals or {}).items():
            if key == "sample_class_accuracy":
                if self.best_acc is not None and v < self.best_acc - t.watch_acc_drop:
                    self._fire(out, step, "accuracy", v, self.best_acc - t.watch_acc_drop)
                self.best_acc = v if self.best_acc is None else max(self.best_acc, v)
            elif key == "fid":
                if self.best_fid is not None and v > self.best_fid * (1 + t.watch_fid_rise):
                    self._fire(out, step, "fid", v, self.best_fid * (1 + t.watch_fid_rise))
                self.best_fid = v if self.best_fid is None else min(self.best_fid, v)
            elif key == "sample_class_diversity":
                if self.best_div is not None and v < t.watch_div_fraction * self.best_div:
                    self._fire(out, step, "diversity", v, t.watch_div_fraction * self.best_div)
                self.best_div = v if self.best_div is None else max(self.best_div, v)
        return out


def read_alarms(run_dir: Path) -> List[Dict[str, Any]]:
    path = Path(run_dir) / "alarms.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_alarm(run_dir: Path, record: Dict[str, Any]) -> None:
    with open(Path(run_dir) / "alarms.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def alarm_record(alarm: Alarm, action: str) -> Dict[str, Any]:
    return {**asdict(alarm), "action": action}
