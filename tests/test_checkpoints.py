"""Checkpoints verified on load: damage done for real to the files (a truncated copy, a flipped byte, a missing
manifest or state file) is named in one line; --resume auto moves a damaged checkpoint aside and continues from the
newest intact one, bit-identically; retention keeps the last intact one; a re-save is never left without a
complete copy; hpc-gan checkpoints lists what it finds."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpc_gan.errors import UserError
from hpc_gan.train import checkpoint
from hpc_gan.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "hpc_gan.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.fixture
def saved(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        checkpoint.save(root, step, {"step": step, "G": {"w": torch.full((2000,), float(step))}})
    return root


def test_verify_names_each_kind_of_damage(saved, capsys):
    two, four = checkpoint.step_dir(saved, 2), checkpoint.step_dir(saved, 4)
    assert checkpoint.verify(four).intact and json.loads((four / "manifest.json").read_text())["files"]
    flip_byte(four / "state.pt")
    assert checkpoint.verify(four, full=False).intact  # same size: only the hash sees it
    assert "SHA-256 differs" in checkpoint.verify(four).why
    truncate(two / "state.pt")
    assert "manifest says" in checkpoint.verify(two, full=False).why
    with pytest.raises(UserError, match=r"checkpoint .*step-00000002 is damaged: state.pt has \d+ bytes"):
        checkpoint.load_consolidated(two)
    (four / "manifest.json").unlink()  # a checkpoint from before manifests: loads, with a warning
    assert checkpoint.load_consolidated(four)["step"] == 4 and "no manifest" in capsys.readouterr().out
    (four / "state.pt").unlink()
    assert checkpoint.verify(four).why == "state.pt is missing"


def test_sample_and_checkpoints_commands_on_a_damaged_run(tiny_cfg, tmp_path):
    train(tiny_cfg("train.steps=4", "train.checkpoint_every=2"), log=lambda s: None)
    run = tmp_path / "run"
    flip_byte(run / "checkpoints" / "step-00000004" / "state.pt")
    proc = cli("sample", "--run", run, "--out", tmp_path / "s.png")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "step-00000004 is damaged: state.pt's SHA-256 differs" in proc.stderr
    listing = cli("checkpoints", run)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert "step-00000004" in lines[1] and "damaged" in lines[1] and "step-00000002" in lines[2] and \
        lines[2].rstrip().endswith("intact")


def test_resume_skips_a_damaged_checkpoint_and_ends_bit_identical(tiny_cfg, tmp_path):
    common = ["train.checkpoint_every=2", "train.keep_checkpoints=0"]
    train(tiny_cfg(*common, f"run.dir={tmp_path / 'a'}", "train.steps=6"), log=lambda s: None)
    b = tmp_path / "b"
    train(tiny_cfg(*common, f"run.dir={b}", "train.steps=4"), log=lambda s: None)
    truncate(b / "checkpoints" / "step-00000004" / "state.pt", 0.9)
    lines = []
    summary = train(tiny_cfg(*common, f"run.dir={b}", "train.steps=6"), resume="auto", log=lines.append)
    assert summary["start_step"] == 2
    assert any("step-00000004 is damaged" in x and "moved aside to step-00000004.corrupt" in x for x in lines)
    assert (b / "checkpoints" / "step-00000004.corrupt").is_dir()  # kept for inspection, not deleted
    got, want = checkpoint.load_consolidated(b), checkpoint.load_consolidated(tmp_path / "a")
    assert got["step"] == want["step"] == 6
    for net in ("G", "D", "G_ema"):
        for k, v in want[net].items():
            assert torch.equal(got[net][k], v), f"{net}.{k}"


def test_no_intact_checkpoint_stops_without_starting_over(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=0")
    train(cfg, log=lambda s: None)
    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        truncate(checkpoint.step_dir(root, step) / "state.pt")
    with pytest.raises(UserError, match=r"no intact checkpoint under .*step-00000004: damaged .*step-00000002: "
                                        r"damaged .*nothing was started over them"):
        train(tiny_cfg("train.steps=6", "train.checkpoint_every=2"), resume="auto", log=lambda s: None)
    assert not checkpoint.step_dirs(root)  # both moved aside, nothing new written
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002.corrupt", "step-00000004.corrupt"]
    with pytest.raises(UserError, match="already has checkpoints"):  # and never a fresh start over them
        train(tiny_cfg("train.steps=6"), log=lambda s: None)


def test_retention_keeps_the_newest_intact_checkpoint(saved):
    truncate(checkpoint.step_dir(saved, 4) / "state.pt")
    checkpoint.prune(saved, keep=1)
    assert [p.name for p in checkpoint.step_dirs(saved)] == ["step-00000002", "step-00000004"]
    checkpoint.save(saved, 6, {"step": 6})
    checkpoint.prune(saved, keep=1)
    assert [p.name for p in checkpoint.step_dirs(saved)] == ["step-00000006"]


def test_a_resave_always_leaves_a_complete_copy(saved):
    """Re-saving moves the old copy aside before renaming the new one in; a crash between the two leaves
    .old-step-N complete and no step-N (built here as the crash would leave it), which resume puts back."""
    checkpoint.save(saved, 4, {"step": 4, "G": {"w": torch.zeros(3)}})
    assert checkpoint.load_consolidated(checkpoint.step_dir(saved, 4))["G"]["w"].shape == (3,)
    assert not list(saved.glob(".old-*")) and not list(saved.glob(".tmp-*"))
    four = checkpoint.step_dir(saved, 4)
    four.rename(saved / ".old-step-00000004-12345")  # the moment between the two renames
    lines = []
    assert checkpoint.newest_intact(saved, log=lines.append) == four
    assert "restored from an interrupted re-save" in lines[0]
