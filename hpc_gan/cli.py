"""The ``hpc-gan`` command: train | sample | eval | plot | info | prepare-data | bench | sweep | doctor | checkpoints.

Bad input (a :class:`hpc_gan.errors.UserError`) ends in one line on stderr that names the problem and the fix
(exit 2); set HPC_GAN_TRACEBACK=1 to see the traceback instead. Anything else is a bug and shows its traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional, Union

from hpc_gan.config import METRICS, choices, dump, load
from hpc_gan.dist import launch
from hpc_gan.errors import UserError
from hpc_gan.mkl_vml import warm_vml_dispatch
from hpc_gan.peaks import H100_BF16_TFLOPS


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
    from hpc_gan.plan import RandomStreams
    from hpc_gan.train.checkpoint import load_consolidated, resolve
    from hpc_gan.train.ema import sampling_standing_stats

    ckpt = resolve(args.run)
    state = load_consolidated(ckpt)
    cfg = from_dict(state["config"], f"{ckpt}/config")
    nc = cfg.data.num_classes
    classes = args.classes if args.classes else list(range(min(nc, 10)))
    bad = [c for c in classes if not 0 <= c < nc]
    if bad:
        raise UserError(f"--classes {bad[0]} is outside this model's {nc} classes (0..{nc - 1})")
    G = build_generator(cfg.model, nc)
    G.load_state_dict(state["G_ema"])
    G.eval()
    sampling_standing_stats(G, cfg, args.standing_stats)  # the statistics the run's own sheets used
    out = Path(args.out) if args.out else Path(args.run if Path(args.run).is_dir() else ckpt) / \
        f"sample-step{state['step']}-t{args.truncation:g}.png"
    per_class = max(1, args.n // len(classes))
    z_gen = RandomStreams(cfg.train.seed if args.seed is None else args.seed).sheet(torch.device("cpu"))
    sample_sheet(G, out, classes, per_class, cfg.model.z_dim, z_gen, args.truncation)
    print(f"wrote {out} ({len(classes)} classes x {per_class} samples, step {state['step']}, "
          f"truncation {args.truncation:g})")
    return 0


def _info(args: argparse.Namespace) -> int:
    from hpc_gan.info import model_info
    print(json.dumps(model_info(load(args.config, args.overrides)), indent=2))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from hpc_gan import scaling
    if args.measure_allreduce:
        return _measure_allreduce(args)
    if not args.config or not args.gpus:
        raise UserError("hpc-gan plan: --config and --gpus are required, e.g. --config "
                        "configs/imagenet128_reacgan_b2048.yaml --gpus 8 64 256")
    from hpc_gan.info import model_info
    cfg = load(args.config, args.overrides)
    fabric = scaling.Fabric(args.gpus_per_node, args.link_gbps, args.nvlink_gbps, args.alpha_inter_us,
                            args.alpha_intra_us, args.bus_efficiency)
    bench = scaling.load_bench(args.bench) if args.bench else None
    rows = scaling.plan_rows(cfg, model_info(cfg), args.gpus, fabric, args.mfu, args.peak_tflops, bench)
    notes = scaling.assumptions(cfg, fabric, args.mfu, args.peak_tflops, bench)
    if args.json:
        print(json.dumps({"config": args.config, "global_batch": cfg.train.batch_size, "fabric": asdict(fabric),
                          "assumptions": notes, "rows": scaling.rows_json(rows)}, indent=1))
    else:
        print(f"{args.config}: global batch {cfg.train.batch_size}, {cfg.train.n_dis} D steps + 1 G step per "
              f"iteration\n{scaling.format_rows(rows)}\nassumptions:\n" + "\n".join(f"  - {n}" for n in notes))
    return 0


def _measure_allreduce(args: argparse.Namespace) -> int:
    """All-reduce times on this launch's process group, and the alpha-beta fit's prediction for each size."""
    from hpc_gan import scaling
    with launch.session(600.0, "auto", "cpu") as info:
        if info.world < 2:
            raise UserError("hpc-gan plan --measure-allreduce measures a process group: launch it with 2+ ranks, "
                            "e.g. torchrun --nproc-per-node 2 -m hpc_gan.cli plan --measure-allreduce")
        measured = scaling.measure_allreduce([2 ** k for k in range(12, 27, 2)])
        backend = launch.backend_name()
    if info.is_main:
        # fit on the two smallest and the two largest sizes; the sizes between are predictions to check
        fit = scaling.fit_alpha_beta(measured[:2], measured[-2:], info.world)
        for m in measured:
            m["predicted"] = scaling.ring_allreduce_s(m["bytes"], info.world, fit["gbps"], fit["alpha_us"])
            m["error"] = m["predicted"] / m["seconds"] - 1
        result = {"world": info.world, "backend": backend, "fit": fit,
                  "fitted_on": [m["bytes"] for m in measured[:2] + measured[-2:]], "measured": measured}
        print(json.dumps(result, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _import(args: argparse.Namespace) -> int:
    from hpc_gan import interop
    base = load(args.base) if args.base else None
    if args.source == "biggan-pytorch":
        if args.which != "best" or args.config:
            raise UserError("hpc-gan import biggan-pytorch takes a weights folder (G.pth, D.pth, state_dict.pth); "
                            "--config and --which are for studiogan; the hpc-gan preset is --base")
        interop.import_biggan_pytorch(args.src, args.out, base, args.overrides)
    else:
        if not args.config:
            raise UserError("hpc-gan import studiogan needs --config STUDIOGAN.yaml (the run's StudioGAN config)")
        interop.import_studiogan(args.src, args.config, args.out, args.which, base, args.overrides)
    return 0


def _export(args: argparse.Namespace) -> int:
    from hpc_gan import interop
    interop.export_biggan_pytorch(args.run, args.out)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from hpc_gan.config import apply_overrides, from_dict
    from hpc_gan.data import build_dataset
    from hpc_gan.eval.evaluate import RunEvaluator
    from hpc_gan.models import build_generator
    from hpc_gan.train.checkpoint import load_consolidated, resolve, step_dir
    from hpc_gan.train.ema import sampling_standing_stats
    from hpc_gan.train.trainer import resolve_device

    run = Path(args.run)
    ckpt = step_dir(run / "checkpoints", args.checkpoint) if args.checkpoint is not None else resolve(args.run)
    if not ckpt.exists():
        raise UserError(f"--checkpoint {args.checkpoint}: {ckpt} does not exist")
    state = load_consolidated(ckpt)
    overrides = [f"eval.{k}={v}" for k, v in (("metrics", ",".join(args.metrics) if args.metrics else None),
                                               ("n", args.n), ("backbone", args.backbone),
                                               ("inception_path", args.inception_path),
                                               ("truncation", args.truncation)) if v is not None]
    cfg = from_dict(apply_overrides(state["config"], overrides), f"{ckpt}/config")
    with launch.session(cfg.dist.timeout_s, cfg.dist.backend) as info:
        device = resolve_device(cfg.run.device, info)
        G = build_generator(cfg.model, cfg.data.num_classes).to(device)
        G.load_state_dict(state["G_ema"])
        G.eval()
        sampling_standing_stats(G, cfg)  # the same statistics the run's own evaluations used
        ev = RunEvaluator(cfg, build_dataset(cfg.data, cfg.model.resolution, cfg.train.seed), device,
                          log=print if info.is_main else (lambda m: None))
        out_dir = (run if run.is_dir() else ckpt) / "eval"
        result = {"step": state["step"], "n": cfg.eval.n, "truncation": cfg.eval.truncation,
                  "backbone": cfg.eval.backbone, **ev(G)}
        if args.sweep:
            result["truncation_sweep"] = ev.sweep(G, args.sweep, out_dir)
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"step-{state['step']:08d}.json"
            path.write_text(json.dumps(result, indent=1))
            print(json.dumps(result, indent=1))
            print(f"wrote {path}" + (f" and {out_dir / 'truncation-sweep.png'}" if args.sweep else ""))
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    from hpc_gan.train.checkpoint import describe
    root = Path(args.run) / "checkpoints" if (Path(args.run) / "checkpoints").is_dir() else Path(args.run)
    rows = describe(root, full=not args.quick)
    if not rows:
        raise UserError(f"{args.run} has no checkpoints (expected RUN_DIR/checkpoints/step-N)")
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'checkpoint':<24} {'step':>9} {'size':>10} {'age':>9}  status")
    for r in rows:
        age = r["age_s"]
        age_s = f"{age / 86400:.1f}d" if age >= 86400 else f"{age / 3600:.1f}h" if age >= 3600 else f"{age / 60:.0f}m"
        print(f"{r['name']:<24} {r['step'] if r['step'] is not None else '':>9} {r['bytes'] / 2 ** 20:>8.1f}MB "
              f"{age_s:>9}  {r['status']}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from hpc_gan.doctor import print_checks, run_checks
    cfg = load(args.config, args.overrides) if args.config else None
    checks = run_checks(cfg, compile_kernels=not args.skip_compile)
    if args.json:
        print(json.dumps([c.__dict__ for c in checks], indent=1))
    else:
        print_checks(checks)
    return 1 if any(c.status == "fail" for c in checks) else 0


def _plot(args: argparse.Namespace) -> int:
    from hpc_gan.eval.plots import plot_curves
    out = Path(args.out) if args.out else Path(args.run) / "curves.png"
    keys = plot_curves(Path(args.run), out)
    print(f"wrote {out} ({', '.join(keys)})")
    return 0


def grid_points(grid: str) -> List[List[str]]:
    """'a.b=1,2 c.d=x,y' -> the cartesian product as override lists, first key slowest."""
    axes = []
    for item in grid.split():
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"--grid item {item!r} must look like section.key=v1,v2")
        key, values = item.split("=", 1)
        axes.append([f"{key}={v}" for v in values.split(",")])
    points: List[List[str]] = [[]]
    for axis in axes:
        points = [p + [v] for p in points for v in axis]
    return points


def _sweep(args: argparse.Namespace) -> int:
    points = grid_points(args.grid)
    if args.count:
        print(len(points))
        return 0
    if not 0 <= args.index < len(points):
        raise UserError(f"--index {args.index} is outside the grid's {len(points)} points; submit with "
                          f"--array=0-{len(points) - 1}")
    point = points[args.index]
    print("_".join(p.split(".", 1)[1].replace("=", "-") for p in point) if args.name else " ".join(point))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from hpc_gan.data.prepare import prepare
    prepare(args.src, args.out, args.resolution, args.shard_size, args.workers, args.encoding)
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from hpc_gan.train.bench import bench_train, print_bench
    if not args.config:
        raise UserError("hpc-gan bench: --config is required, e.g. --config configs/cifar10_reacgan.yaml")
    cfg = load(args.config, args.overrides)
    with launch.session(cfg.dist.timeout_s, cfg.dist.backend, "cpu" if cfg.run.device == "cpu" else "auto") as info:
        result = bench_train(cfg, args.steps, args.warmup, info, args.peak_tflops)
        result["config"] = args.config
    if info.is_main:
        print_bench(result)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
            print(f"wrote {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.scaling:
        from hpc_gan.train.bench import scaling_table
        png = str(Path(args.out).with_suffix(".png")) if args.out else None
        rows = scaling_table(args.scaling, png)
        for r in rows:
            print(f"{r['world']:5d} devices ({r['nodes']} nodes): {r['samples_per_s_total']:10.1f} samples/s, "
                  f"efficiency {100 * r['efficiency']:.1f}%")
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
            print(f"wrote {args.out} and {png}")
        return 0
    if not (args.kernels or args.data):
        return _bench_train(args)
    import torch

    from kernels import bench

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    rows = []
    if args.kernels:
        from hpc_gan.info import sn_shapes
        if gpu:  # the training shapes: 8-256 local rows against 2048 gathered columns
            shapes, d2d_variants = bench.D2D_GPU_SHAPES, bench.D2D_GPU_VARIANTS
        else:  # the CPU times the reference paths at a size it affords
            shapes = [(64, 512, d, torch.float32) for d in (128, 512)]
            d2d_variants = ("eager", "torch_bf16", "studiogan_broadcast")
        args.config = args.config or "configs/imagenet128_reacgan_b2048.yaml"
        sn = sn_shapes(load(args.config, args.overrides))
        print(f"# kernel benchmarks on {name}; SN shapes of {args.config} ({len(sn)} layers)", flush=True)
        rows += bench.bench_d2d(device, shapes, d2d_variants)
        rows += bench.bench_sn(device, sn, ("torch_loop", "foreach", "triton_fused") if gpu else
                               ("torch_loop", "foreach"))
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


def bounded(kind: type, low: float, strict: bool = False,
            high: Optional[float] = None) -> Callable[[str], Union[int, float]]:
    """An argparse type: ``kind`` (int or float) >= low (> low where ``strict``), <= high where given. argparse turns
    its error into one line naming the option, e.g. ``argument --n: must be > 0, got -3``."""
    def parse(text: str) -> Union[int, float]:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if value < low or (strict and value == low) or (high is not None and value > high):
            want = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


POSITIVE_INT = bounded(int, 0, strict=True)
COUNT = bounded(int, 0)
POSITIVE = bounded(float, 0, strict=True)
NON_NEGATIVE = bounded(float, 0)
FRACTION = bounded(float, 0, strict=True, high=1.0)


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
    s.add_argument("--n", type=POSITIVE_INT, default=80, help="number of samples (spread over the classes)")
    s.add_argument("--truncation", type=NON_NEGATIVE, default=0.0, help="resample |z| above this (0: none)")
    s.add_argument("--classes", type=COUNT, nargs="*", help="class indices, one row each (default: first 10)")
    s.add_argument("--standing-stats", type=COUNT, default=None,
                   help="forward passes for standing statistics (default: the run's train.standing_stats)")
    s.add_argument("--seed", type=int, default=None, help="z of the sheet (default: the run's sheet z)")
    s.add_argument("--out", default=None, help="PNG path (default: in the run dir)")
    s.set_defaults(fn=_sample)

    i = sub.add_parser("info", help="parameter counts and FLOPs per training iteration of a config, as JSON")
    i.add_argument("--config", required=True)
    i.add_argument("overrides", nargs="*")
    i.set_defaults(fn=_info)

    im = sub.add_parser("import", help="a BigGAN-PyTorch or StudioGAN checkpoint as an hpc-gan run dir (sample, "
                                       "eval, train --resume auto), outputs equal to the reference's")
    im.add_argument("source", choices=["biggan-pytorch", "studiogan"])
    im.add_argument("src", help="BigGAN-PyTorch weights folder, or StudioGAN checkpoint folder")
    im.add_argument("--out", required=True, help="the new run dir")
    im.add_argument("--config", help="studiogan: the run's StudioGAN YAML config")
    im.add_argument("--which", choices=["best", "current"], default="best", help="studiogan: which checkpoint")
    im.add_argument("--base", help="hpc-gan preset for data, loss and training settings (default: "
                                   "imagenet128_biggan_b2048 / cifar10_reacgan)")
    im.add_argument("overrides", nargs="*", help="section.key=value on top of --base (e.g. data.path=...)")
    im.set_defaults(fn=_import)

    ex = sub.add_parser("export", help="an hpc-gan BigGAN run as a BigGAN-PyTorch weights folder")
    ex.add_argument("target", choices=["biggan-pytorch"])
    ex.add_argument("run", help="run dir (newest intact checkpoint) or a checkpoint dir")
    ex.add_argument("--out", required=True)
    ex.set_defaults(fn=_export)

    pn = sub.add_parser("plan", help="alpha-beta model of one iteration at each GPU count: compute, exposed "
                                     "gradient communication, BN and negatives collectives (docs/scaling.md)")
    pn.add_argument("--config")
    pn.add_argument("--gpus", type=POSITIVE_INT, nargs="+", help="GPU counts, e.g. 8 64 256")
    pn.add_argument("--gpus-per-node", type=POSITIVE_INT, default=8)
    pn.add_argument("--link-gbps", type=POSITIVE, default=400.0, help="inter-node Gbit/s per node (8 x 400: 3200)")
    pn.add_argument("--nvlink-gbps", type=POSITIVE, default=3600.0, help="NVLink Gbit/s per GPU, one direction")
    pn.add_argument("--alpha-inter-us", type=NON_NEGATIVE, default=10.0, help="latency of one inter-node ring step")
    pn.add_argument("--alpha-intra-us", type=NON_NEGATIVE, default=3.0, help="latency of one NVLink ring step")
    pn.add_argument("--bus-efficiency", type=FRACTION, default=0.8, help="fraction of the link rate collectives reach")
    pn.add_argument("--bench", help="an hpc-gan bench JSON: compute time measured instead of peak x MFU")
    pn.add_argument("--mfu", type=FRACTION, default=0.45)
    pn.add_argument("--peak-tflops", type=POSITIVE, default=H100_BF16_TFLOPS,
                    help=f"dense bf16 peak (H100 SXM: {H100_BF16_TFLOPS})")
    pn.add_argument("--json", action="store_true")
    pn.add_argument("--measure-allreduce", action="store_true",
                    help="(under torchrun/srun) measure all-reduce times here and check the alpha-beta formula")
    pn.add_argument("--out", help="with --measure-allreduce: write the JSON here")
    pn.add_argument("overrides", nargs="*")
    pn.set_defaults(fn=_plan)

    e = sub.add_parser("eval", help="FID / IS / precision-recall of a run's G_ema (sharded under torchrun/srun)")
    e.add_argument("--run", required=True, help="run dir (newest checkpoint) or a checkpoint dir")
    e.add_argument("--checkpoint", type=COUNT, default=None, help="step of the checkpoint to evaluate")
    e.add_argument("--metrics", nargs="*", choices=METRICS, help="default: the run's eval.metrics")
    e.add_argument("--n", type=int, default=None, help="generated samples (50000 for published numbers)")
    e.add_argument("--truncation", type=float, default=None)
    e.add_argument("--sweep", type=NON_NEGATIVE, nargs="*", help="truncation thresholds: IS vs FID curve (JSON + PNG)")
    e.add_argument("--backbone", choices=choices("eval.backbone"), default=None)
    e.add_argument("--inception-path", default=None, help="pt_inception-2015-12-05-6726825d.pth")
    e.set_defaults(fn=_eval)

    ck = sub.add_parser("checkpoints", help="a run's checkpoints: step, size, age, intact or damaged (verified)")
    ck.add_argument("run", help="run dir (or its checkpoints/)")
    ck.add_argument("--quick", action="store_true", help="sizes only, no SHA-256 (one read of every file)")
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(fn=_checkpoints)

    dr = sub.add_parser("doctor", help="preflight of this node and a config: GPUs, NCCL, kernels, DALI, DeepSpeed, "
                                       "MPI, data, disk, Slurm placement, rendezvous port")
    dr.add_argument("--config", default=None, help="also check this config's data, disk and placement")
    dr.add_argument("overrides", nargs="*")
    dr.add_argument("--skip-compile", action="store_true", help="do not compile the Triton kernels (~20 s)")
    dr.add_argument("--json", action="store_true", help="the checks as JSON")
    dr.set_defaults(fn=_doctor)

    pl = sub.add_parser("plot", help="PNG of a run's training curves (losses, FID, IS over steps)")
    pl.add_argument("--run", required=True)
    pl.add_argument("--out", default=None, help="default: RUN/curves.png")
    pl.set_defaults(fn=_plot)

    w = sub.add_parser("sweep", help="points of a hyper-parameter grid (for slurm/sweep.sbatch job arrays)")
    w.add_argument("--grid", required=True, help='e.g. "loss.temperature=0.25,0.5 loss.m_p=0.9,0.98"')
    w.add_argument("--index", type=int, default=0, help="which point (the array task id)")
    w.add_argument("--count", action="store_true", help="print the number of points")
    w.add_argument("--name", action="store_true", help="print the point as a directory name")
    w.set_defaults(fn=_sweep)

    d = sub.add_parser("prepare-data", help="image tree / CIFAR pickles / .npz -> webdataset shards DALI reads")
    d.add_argument("--src", required=True, help="ImageNet-style tree (train/<class>/...), CIFAR dir, or .npz")
    d.add_argument("--out", required=True, help="output dir (shards, indexes, dataset.json); re-running resumes")
    d.add_argument("--resolution", type=POSITIVE_INT, required=True, help="centre square crop + area resize to this")
    d.add_argument("--shard-size", type=POSITIVE_INT, default=1000, help="images per shard")
    d.add_argument("--workers", type=COUNT, default=0, help="processes (0: one per CPU)")
    d.add_argument("--encoding", default="jpg", choices=("jpg", "png"), help="jpg (quality 95) or png (lossless)")
    d.set_defaults(fn=_prepare)

    b = sub.add_parser("bench", help="benchmarks (not tests): the training step of --config (default), --kernels, "
                                     "--data, --scaling")
    b.add_argument("--kernels", action="store_true", help="D2D-CE and whole-network spectral norm")
    b.add_argument("--data", action="store_true", help="img/s of the DALI and torch data pipelines")
    b.add_argument("--data-path", default=None, help="prepared shards for --data (default: generated 128 px set)")
    b.add_argument("--config", default=None, help="preset to time (for --kernels: whose SN layers; default BigGAN-128)")
    b.add_argument("--steps", type=POSITIVE_INT, default=10, help="timed training steps")
    b.add_argument("--warmup", type=POSITIVE_INT, default=2,
                   help="untimed steps first (the first compiles and allocates)")
    b.add_argument("--peak-tflops", type=POSITIVE, default=None, help="device peak for MFU (known GPUs: automatic)")
    b.add_argument("--scaling", nargs="*", help="bench JSONs of 1, 2, 4 ... nodes -> efficiency table (+ PNG)")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--device", default="auto", choices=choices("run.device"))
    b.add_argument("--out", default=None, help="also write the rows as JSON here")
    b.set_defaults(fn=_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options too (``--steps 3 train.x=1``): argparse leaves those over
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    warm_vml_dispatch()  # every command, before its first threaded CPU math (hpc_gan.mkl_vml)
    try:
        return args.fn(args)
    except UserError as e:
        if os.environ.get("HPC_GAN_TRACEBACK"):
            raise
        if not getattr(e, launch.REPORTED, False):  # a distributed run printed it already, with its rank
            print(f"hpc-gan {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        if getattr(e, launch.REPORTED, False):  # its traceback is printed (first, before the peers' errors)
            return 1
        raise
    except KeyboardInterrupt:
        print(f"hpc-gan {args.command}: interrupted; completed checkpoints are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
