"""Atomic, verified, resumable checkpoints: one directory per step.

Write side: the state is written to a temporary directory (hashed as it is written), with a manifest of its size
and SHA-256, fsynced and renamed into place; a directory named step-N therefore holds a complete checkpoint. A
failed write (a full disk) leaves nothing half-written and the previous checkpoints as they were. Re-saving a step
moves the old directory aside before the new one is renamed in, so there is never a moment without a complete one.

Read side: a checkpoint is verified before it is loaded (the size always; the hash too where asked, one streaming
read). A damaged one (a truncated copy, a flipped byte, a missing state file) is named in one line, not a torch
traceback; ``--resume auto`` moves it aside (step-N.corrupt) and continues from the newest intact one. Checkpoints
from before manifests existed still load, with a warning.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from hpc_gan.errors import UserError

STATE_FILE = "state.pt"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_CHUNK = 8 << 20


def step_dir(ckpt_root: Union[str, Path], step: int) -> Path:
    return Path(ckpt_root) / f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """The file torch.save writes to: hashes and counts the bytes on their way, and remembers the OSError of a
    failed write (torch.save reports it as an opaque RuntimeError)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error, self.size, self.sha = f, None, 0, hashlib.sha256()

    def write(self, data: Any) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha.update(data)
        self.size += len(data)
        return n

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
            out = _HashingWriter(f)
            torch.save(state, out)
            f.flush()
            os.fsync(f.fileno())
        manifest = {"format": 1, "step": step, "written": datetime.datetime.now().isoformat(timespec="seconds"),
                    "files": {STATE_FILE: {"bytes": out.size, "sha256": out.sha.hexdigest()}}}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
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
    old = None
    if final.exists():  # re-saving a step: the old one moves aside first, so one complete copy always exists
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Verdict:
    path: Path
    intact: bool
    why: str = ""            # what is wrong (damaged), or a note (intact: "no manifest: not verified")

    def line(self) -> str:
        return f"{self.path.name}: {'intact' if self.intact else 'damaged'}" + (f" ({self.why})" if self.why else "")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def verify(ckpt: Path, full: bool = True) -> Verdict:
    """Is the checkpoint in ``ckpt`` whole? Its state file's size against the manifest, and with ``full`` its
    SHA-256 (one streaming read)."""
    state = ckpt / STATE_FILE
    if not state.is_file():
        return Verdict(ckpt, False, f"{STATE_FILE} is missing")
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return Verdict(ckpt, True, "no manifest (written before checkpoints had one): not verified")
    try:
        want = json.loads(manifest.read_text())["files"][STATE_FILE]
    except (ValueError, KeyError, TypeError):
        return Verdict(ckpt, False, f"{MANIFEST} is unreadable")
    size = state.stat().st_size
    if size != want["bytes"]:
        return Verdict(ckpt, False, f"{STATE_FILE} has {size} bytes, its manifest says {want['bytes']}")
    if full and _sha256(state) != want["sha256"]:
        return Verdict(ckpt, False, f"{STATE_FILE}'s SHA-256 differs from its manifest's")
    return Verdict(ckpt, True)


def step_of(ckpt: Union[str, Path]) -> int:
    """The step of a step-N checkpoint directory."""
    m = _STEP_DIR.match(Path(ckpt).name)
    if m is None:
        raise ValueError(f"{ckpt} is not a step-N checkpoint directory")
    return int(m.group(1))


def step_dirs(ckpt_root: Union[str, Path]) -> List[Path]:
    """Every step-N directory (complete or not), oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def any_checkpoints(ckpt_root: Union[str, Path]) -> bool:
    """Whether a run has checkpoints at all, damaged and moved-aside ones included (a run is never started over
    them)."""
    root = Path(ckpt_root)
    return root.is_dir() and any(p.is_dir() and p.name.startswith("step-") for p in root.iterdir())


def complete_checkpoints(ckpt_root: Union[str, Path]) -> List[Path]:
    """Checkpoint directories with a state file, oldest first (not verified: see ``verify``)."""
    return [p for p in step_dirs(ckpt_root) if (p / STATE_FILE).is_file()]


def latest(ckpt_root: Union[str, Path]) -> Optional[Path]:
    ckpts = complete_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def move_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint to step-N.corrupt (kept for inspection, never loaded, never pruned)."""
    target = ckpt.with_name(ckpt.name + ".corrupt")
    n = 1
    while target.exists():
        target = ckpt.with_name(f"{ckpt.name}.corrupt{n}")
        n += 1
    os.rename(ckpt, target)
    return target


def recover_interrupted_resave(ckpt_root: Union[str, Path], log: Callable[[str], None] = print) -> None:
    """A re-save stopped between its two renames leaves the complete old copy as .old-step-N-PID and no step-N:
    put it back."""
    root = Path(ckpt_root)
    for old in sorted(root.glob(".old-step-*")) if root.is_dir() else []:
        m = re.match(r"^\.old-(step-\d+)-\d+$", old.name)
        if m and not (root / m.group(1)).exists() and (old / STATE_FILE).is_file():
            os.rename(old, root / m.group(1))
            log(f"checkpoint {m.group(1)}: restored from an interrupted re-save")


def newest_intact(ckpt_root: Union[str, Path], full: bool = True,
                  log: Callable[[str], None] = print) -> Optional[Path]:
    """The newest checkpoint that verifies; damaged newer ones are moved aside, each with one line. Raises when
    there are checkpoints but none is intact (a run is never started over them)."""
    recover_interrupted_resave(ckpt_root, log)
    dirs = step_dirs(ckpt_root)
    verdicts = []
    for ckpt in reversed(dirs):
        verdict = verify(ckpt, full)
        if verdict.intact:
            if verdict.why:
                log(f"warning: checkpoint {ckpt} has {verdict.why}")
            return ckpt
        verdicts.append(verdict)
        aside = move_aside(ckpt)
        log(f"checkpoint {ckpt.name} is damaged ({verdict.why}); moved aside to {aside.name}, trying the one before")
    if verdicts or any_checkpoints(ckpt_root):
        found = "; ".join(v.line() for v in verdicts) or "only checkpoints moved aside earlier"
        raise UserError(f"no intact checkpoint under {ckpt_root} ({found}); they are moved aside as *.corrupt and "
                        f"nothing was started over them: restore a copy, or start a new run with another run.dir")
    return None


def prune(ckpt_root: Union[str, Path], keep: int, pinned: Tuple[Path, ...] = ()) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (keep=0: keep all), never a pinned one and never the
    newest intact one; and stale temporary directories."""
    root = Path(ckpt_root)
    for tmp in list(root.glob(".tmp-step-*")) + list(root.glob(".old-step-*")):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)
    if keep <= 0:
        return
    ckpts = complete_checkpoints(root)
    kept, old = ckpts[-keep:], ckpts[:-keep]
    if not any(verify(c, full=False).intact for c in kept):  # keep the newest intact one among the older
        for c in reversed(old):
            if verify(c, full=False).intact:
                old.remove(c)
                break
    for c in old:
        if c not in pinned:
            shutil.rmtree(c, ignore_errors=True)


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


def load_consolidated(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu",
                      verify_hash: bool = True, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """The full training state of a checkpoint: at least "G", "D", "G_ema" (state_dicts) and "step". Verified
    first; a damaged file is a one-line UserError naming it."""
    ckpt = resolve(path)
    verdict = verify(ckpt, verify_hash)
    if not verdict.intact:
        raise UserError(f"checkpoint {ckpt} is damaged: {verdict.why}; use an earlier one (hpc-gan checkpoints "
                        f"{ckpt.parent.parent} lists them) or --resume auto, which skips damaged ones")
    if verdict.why:
        log(f"warning: checkpoint {ckpt} has {verdict.why}")
    try:
        return torch.load(ckpt / STATE_FILE, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # no manifest to catch it, or damaged in between
        raise UserError(f"checkpoint {ckpt / STATE_FILE} cannot be read ({str(e).splitlines()[0][:200]}); use "
                        f"an earlier checkpoint or --resume auto") from None


def describe(ckpt_root: Union[str, Path], full: bool = True) -> List[Dict[str, Any]]:
    """Every checkpoint directory of a run (moved-aside ones too), newest first: step, bytes, age, status."""
    root = Path(ckpt_root)
    rows = []
    dirs = sorted([p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")] if root.is_dir() else [],
                  key=lambda p: p.name, reverse=True)
    for p in dirs:
        state = p / STATE_FILE
        m = re.match(r"^step-(\d+)", p.name)
        row: Dict[str, Any] = {"name": p.name, "step": int(m.group(1)) if m else None,
                               "bytes": state.stat().st_size if state.is_file() else 0,
                               "age_s": time.time() - p.stat().st_mtime}
        if not _STEP_DIR.match(p.name):
            row["status"] = "moved aside (damaged)"
        else:
            v = verify(p, full)
            row["status"] = ("intact" if v.intact else "damaged") + (f": {v.why}" if v.why else "")
        rows.append(row)
    return rows
