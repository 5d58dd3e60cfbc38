"""Where every logged number goes: metrics.jsonl (one JSON object per line) and TensorBoard events where
installed. Ranks other than 0 write nothing (:class:`NullWriter`)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional


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
