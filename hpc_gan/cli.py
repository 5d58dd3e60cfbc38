"""The ``hpc-gan`` command: train | sample | info | prepare-data | bench.

Bad input ends in one line on stderr that names the problem and the fix (exit 2); set HPC_GAN_TRACEBACK=1 to see
the traceback instead."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from hpc_gan.config import ConfigError, dump, load


def _train(args: argparse.Namespace) -> int:
    cfg = load(args.config, args.overrides)
    if args.dry_run:
        print(f"# resolved config of {args.config} (dry run: nothing is trained)")
        print(dump(cfg), end="")
        return 0
    from hpc_gan.train.loop import train
    train(cfg, resume=args.resume)
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from hpc_gan.config import from_dict
    from hpc_gan.eval.sampling import sample_sheet
    from hpc_gan.models import build_generator
    from hpc_gan.train.checkpoint import load_consolidated, resolve
    from hpc_gan.train.ema import standing_stats_from_noise

    ckpt = resolve(args.run)
    state = load_consolidated(ckpt)
    cfg = from_dict(state["config"], f"{ckpt}/config")
    nc = cfg.data.num_classes
    classes = args.classes if args.classes else list(range(min(nc, 10)))
    bad = [c for c in classes if not 0 <= c < nc]
    if bad:
        raise ConfigError(f"--classes {bad[0]} is outside this model's {nc} classes (0..{nc - 1})")
    G = build_generator(cfg.model, nc)
    G.load_state_dict(state["G_ema"])
    G.eval()
    standing_stats_from_noise(G, args.standing_stats, nc, cfg.model.z_dim, args.seed + 1)
    out = Path(args.out) if args.out else Path(args.run if Path(args.run).is_dir() else ckpt) / \
        f"sample-step{state['step']}-t{args.truncation:g}.png"
    per_class = max(1, args.n // len(classes))
    sample_sheet(G, out, classes, per_class, cfg.model.z_dim, args.seed, args.truncation, torch.device("cpu"))
    print(f"wrote {out} ({len(classes)} classes x {per_class} samples, step {state['step']}, "
          f"truncation {args.truncation:g})")
    return 0


def _info(args: argparse.Namespace) -> int:
    from hpc_gan.info import model_info
    print(json.dumps(model_info(load(args.config, args.overrides)), indent=2))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from hpc_gan.data.prepare import prepare
    prepare(args.src, args.out, args.resolution, args.shard_size, args.workers, args.encoding)
    return 0


def _bench(args: argparse.Namespace) -> int:
    if not (args.kernels or args.data):
        raise ConfigError("hpc-gan bench: choose what to time: --kernels and/or --data (the training-step "
                          "benchmark is issue 6's)")
    import torch

    from kernels import bench

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    rows = []
    if args.kernels:
        from hpc_gan.info import sn_shapes
        n_local, n_global = (256, 2048) if gpu else (64, 512)  # the CPU times reference paths at a size it affords
        dims = (512, 2048) if gpu else (128, 512)
        dtypes = (torch.float32, torch.bfloat16) if gpu else (torch.float32,)
        d2d_variants = ("triton", "eager", "compile", "studiogan_broadcast") if gpu else ("eager", "studiogan_broadcast")
        shapes = sn_shapes(load(args.config, args.overrides))
        print(f"# kernel benchmarks on {name}; SN shapes of {args.config} ({len(shapes)} layers)", flush=True)
        rows += bench.bench_d2d(device, n_local, n_global, dims, dtypes, d2d_variants)
        rows += bench.bench_sn(device, shapes, ("torch_loop", "triton_fused") if gpu else ("torch_loop",))
    if args.data:
        from hpc_gan.data.bench import bench_data
        print(f"# data pipelines on {name}: {args.data_path or 'generated 128 px JPEG shards'}", flush=True)
        rows += bench_data(args.data_path, device)
    bench.print_table(rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": name, "config": args.config, "rows": rows}, indent=2))
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpc-gan", description="BigGAN + ReACGAN training from one CPU to many GPUs.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run from a YAML config")
    t.add_argument("--config", required=True, help="YAML preset, e.g. configs/demo.yaml")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--resume", default=None, help="'auto' (newest checkpoint of run.dir, if any) or a checkpoint path")
    t.set_defaults(fn=_train)

    s = sub.add_parser("sample", help="write a PNG sheet of G_ema samples from a run's checkpoint")
    s.add_argument("--run", required=True, help="run dir, its checkpoints/ or one checkpoint dir")
    s.add_argument("--n", type=int, default=80, help="number of samples (spread over the classes)")
    s.add_argument("--truncation", type=float, default=0.0, help="resample |z| above this (0: none)")
    s.add_argument("--classes", type=int, nargs="*", help="class indices, one row each (default: first 10)")
    s.add_argument("--standing-stats", type=int, default=16, help="forward passes for standing statistics")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=None, help="PNG path (default: in the run dir)")
    s.set_defaults(fn=_sample)

    i = sub.add_parser("info", help="parameter counts and FLOPs per training iteration of a config, as JSON")
    i.add_argument("--config", required=True)
    i.add_argument("overrides", nargs="*")
    i.set_defaults(fn=_info)

    d = sub.add_parser("prepare-data", help="image tree / CIFAR pickles / .npz -> webdataset shards DALI reads")
    d.add_argument("--src", required=True, help="ImageNet-style tree (train/<class>/...), CIFAR dir, or .npz")
    d.add_argument("--out", required=True, help="output dir (shards, indexes, dataset.json); re-running resumes")
    d.add_argument("--resolution", type=int, required=True, help="centre square crop + area resize to this")
    d.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    d.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU)")
    d.add_argument("--encoding", default="jpg", choices=("jpg", "png"), help="jpg (quality 95) or png (lossless)")
    d.set_defaults(fn=_prepare)

    b = sub.add_parser("bench", help="benchmarks (not tests): --kernels times the fused kernels vs references")
    b.add_argument("--kernels", action="store_true", help="D2D-CE and whole-network spectral norm")
    b.add_argument("--data", action="store_true", help="img/s of the DALI and torch data pipelines")
    b.add_argument("--data-path", default=None, help="prepared shards for --data (default: generated 128 px set)")
    b.add_argument("--config", default="configs/imagenet128_reacgan_b2048.yaml", help="preset whose SN layers to use")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    b.add_argument("--out", default=None, help="also write the rows as JSON here")
    b.set_defaults(fn=_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError, FloatingPointError) as e:
        if os.environ.get("HPC_GAN_TRACEBACK"):
            raise
        print(f"hpc-gan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hpc-gan {args.command}: interrupted; completed checkpoints are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
