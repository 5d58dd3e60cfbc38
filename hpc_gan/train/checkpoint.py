"""Atomic, resumable checkpoints: one directory per step, written to a temporary name, fsynced and renamed, so a
checkpoint directory that exists is complete and a crash never leaves a half-written one behind."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from hpc_gan.errors import UserError

STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(ckpt_root: Union[str, Path], step: int) -> Path:
    return Path(ckpt_root) / f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _WriteErrors:
    """A file that remembers the OSError of a failed write (torch.save reports it as an opaque RuntimeError)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save(ckpt_root: Union[str, Path], step: int, state: Dict[str, Any]) -> Path:
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    out = None
    try:
        tmp.mkdir()
        with open(tmp / STATE_FILE, "wb") as f:
            out = _WriteErrors(f)
            torch.save(state, out)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
    except (OSError, RuntimeError) as e:
        error = out.error if out is not None and out.error is not None else e
        if not isinstance(error, OSError):
            raise  # not the file system's doing: a bug
        # a full disk or a quota: say so, keep what is saved, leave no half-written directory
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(root)
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        raise UserError(f"writing checkpoint {final} failed ({error.strerror or error}); {kept}: free space under "
                        f"{root} and resume with --resume auto") from None
    if final.exists():  # re-saving a step (e.g. after a resume): replace it atomically enough
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    return final


def complete_checkpoints(ckpt_root: Union[str, Path]) -> List[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest(ckpt_root: Union[str, Path]) -> Optional[Path]:
    ckpts = complete_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def prune(ckpt_root: Union[str, Path], keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (keep=0: keep all), and stale temp dirs."""
    root = Path(ckpt_root)
    for tmp in root.glob(".tmp-step-*"):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)
    if keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def resolve(path: Union[str, Path]) -> Path:
    """A checkpoint directory from a path to one, to its state file, to a checkpoints/ folder or to a run dir."""
    p = Path(path)
    if p.is_file():
        return p.parent
    if (p / STATE_FILE).is_file():
        return p
    for root in (p / "checkpoints", p):
        found = latest(root)
        if found is not None:
            return found
    raise UserError(f"no complete checkpoint at {path}; expected a run dir, its checkpoints/ or a "
                    f"checkpoints/step-NNNNNNNN directory")


def load_consolidated(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """The full training state of a checkpoint: at least "G", "D", "G_ema" (state_dicts) and "step"."""
    return torch.load(resolve(path) / STATE_FILE, map_location=map_location, weights_only=False)
