"""Random configurations, each trained for 2 steps (with a checkpoint and a sample sheet) by the real `hpc-gan train`
command: every outcome must be a run that finishes or a one-line error, never a traceback (a search, not a test).

    python scripts/config_sweep.py [--ranks 1|2] [--n N] [--seed S] [--compile-fraction F]

- ``--ranks 1``: in this process, one config after another (~0.5 s each with the tiny nets, ~10 s at BigGAN-deep's
  128 px; ~60-110 s where ``train.compile=default`` is drawn). Every choice in hpc_gan.config (``Literal`` keys)
  is drawn, half of them at a time, plus architecture, resolutions, attention resolutions, batch / micro-batch,
  regularizers, truncation and diagnostics, and the data: the embedded set, or a small .npz or class-folder tree
  written for the config (images in several sizes and modes), with or without DataLoader workers. Choices that
  need what this machine may lack (CUDA, a Triton interpreter, DALI, apex) are left at their defaults.
- ``--ranks 2``: torchrun with 2 gloo ranks (~8 s each, minutes where compiled): DDP / ZeRO-1 / ZeRO-2, BN over
  ranks, groups or each rank alone, the negatives' paths, buckets, static graph, gradient compression, replica
  checks every step, now and then train.compile; then each run is resumed on one rank under DDP for a third step
  (another world size and strategy).

Prints one line per config, and for a failure its overrides and the end of its output. Exit status 1 where any
config ended in a traceback. The 2026-11-28 sweep (docs/failures.md) found eight such bugs; each is now fixed or
refused in one line.
"""
import argparse
import contextlib
import io
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# what this sweep leaves at the demo's values: the device, data sources, GPU-only and install-dependent choices
FIXED = {"run.device", "data.name", "data.backend", "data.decode_device", "eval.backbone", "train.compile",
         "dist.backend", "dist.strategy", "train.precision", "model.arch", "model.resolution"}
TINY = ["data.synthetic_size=64", "train.demo_classifier=false", "run.tensorboard=false", "train.steps=2",
        "train.log_every=1", "train.sample_every=2", "train.checkpoint_every=2", "train.standing_stats=1"]


def write_data(rng: random.Random, where: Path, name: str, res: int, classes: int) -> List[str]:
    """A small data set of kind ``name`` under ``where``, and the overrides that train on it: an .npz at the
    model's resolution, or class folders of images in several sizes and modes (PIL converts and crops them)."""
    import numpy as np
    from PIL import Image
    pixels = np.random.default_rng(rng.randrange(2 ** 32))
    if name == "npz":
        path = where / "data.npz"
        np.savez(path, images=pixels.integers(0, 256, (24, res, res, 3), dtype=np.uint8),
                 labels=pixels.integers(0, classes, 24))
    else:
        path = where / "folders"
        for c in range(classes):
            (path / f"class{c}").mkdir(parents=True)
            for k, mode in enumerate(("RGB", "L", "RGBA")):
                h, w = pixels.integers(res // 2, 2 * res, 2)
                image = Image.fromarray(pixels.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
                image.save(path / f"class{c}" / f"{k}.{'jpg' if mode != 'RGBA' else 'png'}")
    return [f"data.name={name}", f"data.path={path}", f"data.num_workers={rng.choice([0, 2])}"]


def single_rank_overrides(rng: random.Random, compile_fraction: float, where: Path) -> List[str]:
    from hpc_gan.config import CHOICES
    out = []
    for key, values in CHOICES.items():
        if key in FIXED or rng.random() < 0.5:
            continue
        value = rng.choice(values)
        if value == "triton" or value == "apex":  # need the interpreter or apex: the default stands in
            value = "auto"
        out.append(f"{key}={value}")
    deep = rng.random() < 0.15  # BigGAN-deep exists at 128 px and up: ~10 s a config with these widths
    res = 128 if deep else rng.choice([16, 32, 64])
    classes = rng.choice([3, 10])
    out += [f"model.arch={'biggan_deep' if deep else 'biggan'}", f"model.resolution={res}",
            f"model.g_ch={rng.choice([8, 16])}", f"model.d_ch={rng.choice([8, 16])}",
            f"model.g_attn_res={rng.choice([0, res // 2])}", f"model.d_attn_res={rng.choice([0, res // 2])}",
            f"model.z_dim={rng.choice([60, 120])}", f"data.num_classes={classes}",
            f"train.batch_size={rng.choice([4, 6, 8])}", f"train.micro_batch={rng.choice([0, 0, 2])}",
            f"train.n_dis={rng.choice([1, 2])}", f"train.ema_start={rng.choice([0, 1, 5])}",
            f"loss.diffaug={rng.choice(['', 'color,translation,cutout', 'translation'])}",
            f"loss.cr_lambda={rng.choice([0, 1.0])}", f"loss.ortho_beta={rng.choice([0, 1e-4])}",
            f"train.truncation={rng.choice([0, 1.0])}", f"train.diag_every={rng.choice([0, 1])}"]
    source = rng.choice(["synthetic"] * 3 + ["npz", "folder"])
    if source != "synthetic":
        out += write_data(rng, where, source, res, classes)
    if rng.random() < compile_fraction:
        out.append("train.compile=default")
    return out


def two_rank_overrides(rng: random.Random) -> List[str]:
    draws = {"dist.strategy": ["ddp", "ddp", "zero1", "zero2"], "dist.sync_bn": ["true", "false"],
             "dist.bn_group_size": [0, 1, 2], "dist.dedicated_groups": ["true", "false"],
             "dist.negatives_backward": ["reduce_scatter", "all_reduce"], "dist.bucket_cap_mb": [0.01, 25],
             "dist.static_graph": ["true", "false"], "dist.grad_compression": ["none", "bf16"],
             "dist.zero_bucket_mb": [0.01, 200], "dist.zero_comm_dtype": ["fp32", "bf16"],
             "dist.check_every": [0, 1], "loss.global_negatives": ["true", "false"], "train.micro_batch": [0, 2],
             "loss.cond": ["d2d_ce", "2c", "ac", "pd"], "loss.adv": ["hinge", "wasserstein"],
             "loss.ortho_beta": [0, 1e-4], "loss.ortho_impl": ["auto", "autograd", "grad", "sharded"],
             "train.nonfinite": ["stop", "skip"], "train.optimizer_impl": ["auto", "foreach"],
             "loss.cr_lambda": [0, 1.0], "model.d_attn_res": [0, 8], "model.g_attn_res": [0, 8],
             "train.diag_every": [0, 1], "train.compile": ["off"] * 5 + ["default"]}
    return [f"{k}={rng.choice(v)}" for k, v in draws.items() if rng.random() < 0.7]


def classify(rc: object, output: str) -> str:
    """ok, user (a one-line error: exit 2, or torchrun's 1 around a rank's 2) or BUG (anything else)."""
    if rc == 0:
        return "ok"
    return "user" if rc in (1, 2) and "hpc-gan train: error: " in output and "Traceback" not in output.split(
        "hpc-gan train: error: ")[0][-2000:] else "BUG"


def run_in_process(overrides: List[str], run_dir: Path) -> Tuple[object, str]:
    import torch
    from hpc_gan import cli
    torch._dynamo.reset()  # each config compiles its own nets: dynamo's caches would count them as recompiles
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc: object = cli.main(["train", "--config", str(ROOT / "configs" / "demo.yaml"), *TINY, *overrides,
                                   f"run.dir={run_dir}"])
        except SystemExit as e:
            rc = e.code
        except Exception:
            rc = "exception"
            traceback.print_exc(file=buf)
    return rc, buf.getvalue()


def run_two_ranks(overrides: List[str], run_dir: Path) -> Tuple[object, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM", "OMPI", "PMI", "RANK", "LOCAL_RANK", "WORLD", "MASTER"))}
    env["OMP_NUM_THREADS"] = "1"
    bindir = Path(sys.executable).parent
    common = ["--config", str(ROOT / "configs" / "demo.yaml"), *TINY, "model.g_ch=8", "model.d_ch=8",
              "model.embed_dim=16", "data.synthetic_size=128", "train.batch_size=8", "train.ema_start=1",
              f"run.dir={run_dir}", *overrides]
    p = subprocess.run([str(bindir / "torchrun"), "--nproc-per-node", "2", "--master-port", str(port), "-m",
                        "hpc_gan.cli", "train", *common], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=900)
    if p.returncode != 0:
        return p.returncode, p.stdout + p.stderr
    q = subprocess.run([str(bindir / "hpc-gan"), "train", *common, "train.steps=3", "dist.strategy=ddp",
                        "--resume", "auto"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    return q.returncode, "resumed on 1 rank:\n" + q.stdout + q.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, choices=(1, 2), default=1)
    ap.add_argument("--n", type=int, default=100, help="configurations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-fraction", type=float, default=0.0,
                    help="--ranks 1: the fraction of configs with train.compile=default (each compiles for ~1 min)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    counts = {"ok": 0, "user": 0, "BUG": 0}
    for i in range(args.n):
        tmp = Path(tempfile.mkdtemp(prefix="hpc-gan-sweep-"))
        overrides = two_rank_overrides(rng) if args.ranks == 2 else \
            single_rank_overrides(rng, args.compile_fraction, tmp)
        t0 = time.time()
        try:
            rc, output = (run_two_ranks if args.ranks == 2 else run_in_process)(overrides, tmp / "run")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        tag = classify(rc, output)
        counts[tag] += 1
        print(f"{i:4d} {tag:<4} exit {rc} {time.time() - t0:6.1f} s", flush=True)
        if tag == "user":
            print("     " + next(line for line in output.splitlines() if "hpc-gan train: error: " in line), flush=True)
        elif tag == "BUG":
            print("     overrides: " + " ".join(overrides), flush=True)
            lines = [line for line in output.splitlines() if line.strip() and not line.startswith(("W", "[W"))]
            print("     " + "\n     ".join(lines[-12:]), flush=True)
    print(f"{args.n} configs: {counts['ok']} ran, {counts['user']} one-line errors, {counts['BUG']} tracebacks")
    return 1 if counts["BUG"] else 0


if __name__ == "__main__":
    sys.exit(main())
