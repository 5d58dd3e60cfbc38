"""The GPU check pack: everything a first GPU session must measure, in one prepared call (scripts/gpu-check.sh).

Stages, each in its own subprocess with a time box, each written to
DIR/report.json and DIR/report.md as soon as it ends; a stage that loops saves what it has after every case, so one
cut off by its time box (or the lease) still reports its finished cases:

  env          GPU, versions, measured device-to-device copy bandwidth and bf16 matmul rate
  accuracy     the kernels against float64 at the real shapes, fp32 and bf16: |out - ref| / |ref|, gradients too
  kernels      D2D-CE forward + backward: the kernel, the kernel before the column split, torch fp32, a torch bf16
               path, torch.compile of the reference (medians of triton.testing.do_bench)
  sn           spectral norm of BigGAN-128's 65 layers: per-layer loop, foreach, Triton, and the bandwidth floor
  layers       D's poolings and G's upsamplings at BigGAN-128's shapes, batch 256, bf16, channels-last: each
               model.pool_impl / model.upsample_impl forward and backward, ms per iteration against the floor
  tests        tests/test_gpu.py (no host sync in a training step) and tests/test_kernels.py on the GPU (less the
               ahead-of-time compile check, which needs no GPU)
  determinism  20 runs of each kernel, bitwise equal
  dali         nvJPEG decode img/s (where DALI is installed)
  deepspeed    one ZeRO-2 bf16 step (where DeepSpeed is installed and 2 GPUs are visible)
  train        the BigGAN-128 ReACGAN step in bf16 at 32 and 256 samples per GPU: eager, compiled, CUDA graphs;
               MFU, host vs device time, kernels per iteration (last: it gets what the others left of their boxes)

``--smoke`` (also chosen where no GPU is visible) runs every stage at toy sizes on the CPU, the kernels in Triton's
interpreter, so the pack cannot rot; it is tested.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from hpc_gan.train.inductor_sources import describe  # torch-free: the parent process stays light

ROOT = Path(__file__).resolve().parents[1]
# (name, seconds allowed on a GPU, seconds allowed in smoke mode): 480 s in all on one H100, under the 8 minutes
# that one call may take (the H100 runs took 380 and 476 s, the H200 run 483 s). What a stage leaves of its box goes
# to the next one, so the whole call stays within the sum; train runs last and gets all the short stages left
# (~40-70 s): its compiled cases need minutes on a cold machine, and no other stage's time is as uncertain.
# The kernels stage's 100 s hold its 16 shapes (60 s held 11 on the H200, 2026-11-27: fp32 at 32 rows and more went
# unmeasured); layers' 40 s its RGB convolutions besides (it took 34.5 s without them); train's 140 s plus the ~40 s
# the short stages leave hold its two goal cases at 256 per GPU. Stage times on that H200: sn 28.5 s, tests 51.7,
# determinism 14.3, dali and deepspeed ~5 each (skipped: not installed).
STAGES: List[Tuple[str, int, int]] = [
    ("env", 15, 60), ("accuracy", 45, 120), ("kernels", 100, 120), ("sn", 40, 120), ("layers", 40, 60),
    ("tests", 65, 240), ("determinism", 20, 120), ("dali", 7, 60), ("deepspeed", 8, 60),
    ("train", 140, 240),
]
STAGE_DIR_ENV = "HPC_GAN_GPU_CHECK_STAGES"  # where the stages' own result files are, for the stages after them
CASES_ENV = "HPC_GAN_GPU_CHECK_CASES"  # --cases, for the train stage's process
Case = Tuple[int, str, List[str]]  # a train case: (batch per GPU, label, config overrides)
# seconds a train case takes on a fresh H200 (2026-11-27), by its label's first word, at 256 per GPU and at 32: most
# of it is the first step (eager 28 s at 256 and 7 s at 32: cuDNN's benchmark, Triton's autotuning; compiled 78-88 s
# at either: dynamo and inductor build 4 graphs) and ~10 s of start-up
CASE_SECONDS = {"eager": (45, 25), "compile": (100, 100), "cuda_graphs": (100, 100)}
TUNING_SECONDS = 60  # train.compile_tuning's benchmarking of each fused kernel's configs: a guess, not yet measured


def case_seconds(batch: int, label: str) -> int:
    """What a train case needs of the box on a GPU (``CASE_SECONDS``): the 256-per-GPU figure above 64 per GPU, the
    32 one at or below; ``TUNING_SECONDS`` more for a tuned case."""
    at_256, at_32 = CASE_SECONDS[label.split()[0]]
    return (at_256 if batch > 64 else at_32) + (TUNING_SECONDS if "tuned" in label.split() else 0)
Save = Callable[[Dict[str, Any]], None]  # a looping stage's partial result, written after each case


# ---- the stages: each returns a dict of numbers (status "ok" unless it says otherwise) -------------------------------
def stage_env(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    import torch
    import triton

    from kernels.bench import median_ms
    out: Dict[str, Any] = {"torch": torch.__version__, "triton": triton.__version__,
                           "python": sys.version.split()[0]}
    dev = _device(smoke)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out.update(gpu=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1), sms=props.multi_processor_count,
                   cuda=torch.version.cuda, capability=".".join(map(str, torch.cuda.get_device_capability())))
    out["copy_gb_per_s"] = _copy_gb_per_s(dev)
    k = 8192 if dev.type == "cuda" else 256
    a = torch.randn(k, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(k, k, device=dev, dtype=torch.bfloat16)
    out["bf16_matmul_tflops"] = round(2 * k ** 3 / median_ms(lambda: a @ b, dev) / 1e9, 1)
    return out


def stage_tests(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    """pytest -v, stopped 3 s before the deadline so that what ran is still reported: the second H100 run's tests
    stage ran out of its box inside pytest, which left no word of which test was slow or had failed. On a GPU
    node, 4 pytest-xdist workers where installed: most of the time is Triton compiling kernels on the CPU."""
    import importlib.util
    args = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py"),
            str(ROOT / "tests" / "test_kernels.py")]
    args += ["-k", "split_columns and 8-200" if smoke else "not compiles_for_h100", "--tb=short", "-rf",
             "--durations=5"]
    if not smoke and importlib.util.find_spec("xdist") is not None:
        args += ["-n", "4"]
    try:
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                              timeout=max(5.0, deadline - time.time() - 3))
        stdout, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), None
    lines = stdout.splitlines()
    out: Dict[str, Any] = {"status": "ok" if rc == 0 else "timeout" if rc is None else "fail",
                           "passed": sum(" PASSED" in x for x in lines),
                           "failures": [x for x in lines if " FAILED" in x or x.startswith("FAILED")][:10]}
    if rc is not None:
        out["pytest"] = (lines or ["no output"])[-1]
    if rc != 0:  # what failed and where, or what was running when time ran out
        out["output_tail"] = stdout[-4000:]
    return out


def _rel(a: Any, b: Any) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def stage_accuracy(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    import torch

    from kernels import d2d_ce, sn_power_iteration, spectral_normalize
    dev = _device(smoke)
    shapes = [(8, 64, 32)] if smoke else [(32, 2048, 512), (256, 2048, 2048)]
    dtypes = [torch.float32] if smoke else [torch.float32, torch.bfloat16]
    out: Dict[str, Any] = {"d2d_ce": [], "sn": []}
    for n, m, d in shapes:
        g = torch.Generator().manual_seed(0)
        cols64 = torch.randn(m, d, generator=g, dtype=torch.float64)
        proxy64 = torch.randn(n, d, generator=g, dtype=torch.float64)
        labels_all = torch.randint(0, 1000, (m,), generator=g)
        off = (m - n) // 2
        leaves = [cols64[off:off + n].clone().requires_grad_(), proxy64.clone().requires_grad_(),
                  cols64.clone().requires_grad_()]
        ref = d2d_ce(leaves[0], leaves[1], labels_all[off:off + n], 0.25, 0.9, backend="torch",
                     negatives=(leaves[2], labels_all), row_offset=off)
        ref_g = torch.autograd.grad(ref, leaves)
        for dt, tmode in itertools.product(dtypes, ("matrix", "fused")):  # cuBLAS's products, the kernel's own
            got_leaves = [x.detach().to(dev, dt).requires_grad_() for x in leaves]
            lab = labels_all.to(dev)
            got = d2d_ce(got_leaves[0], got_leaves[1], lab[off:off + n], 0.25, 0.9, backend="triton",
                         negatives=(got_leaves[2], lab), row_offset=off, triton_mode=tmode)
            got_g = torch.autograd.grad(got, got_leaves)
            out["d2d_ce"].append({"shape": [n, m, d], "dtype": str(dt)[6:], "mode": tmode,
                                  "loss": _rel(got.cpu(), ref), **{f"grad_{k}": _rel(a.cpu(), b) for k, a, b in
                                                                   zip(("embed", "proxy", "cols"), got_g, ref_g)}})
    sn = [(64, 40), (33, 70)] if smoke else _sn_shapes()
    g = torch.Generator().manual_seed(1)
    w64 = [torch.randn(*s, generator=g, dtype=torch.float64) / s[1] ** 0.5 for s in sn]
    u64 = [torch.nn.functional.normalize(torch.randn(s[0], generator=g, dtype=torch.float64), dim=0) for s in sn]
    ws_ref = [w.clone().requires_grad_() for w in w64]
    s_ref, _, _ = sn_power_iteration(ws_ref, u64, 1, backend="torch")
    coef = torch.randn(len(sn), generator=g, dtype=torch.float64)
    ref_g = torch.autograd.grad((s_ref * coef).sum(), ws_ref)
    for dt in dtypes:
        ws = [w.to(dev, dt).requires_grad_() for w in w64]
        sig, _, _ = sn_power_iteration(ws, [u.to(dev, torch.float32) for u in u64], 1, backend="triton")
        grads = torch.autograd.grad((sig * coef.to(dev).float()).sum(), ws)
        out["sn"].append({"layers": len(sn), "dtype": str(dt)[6:], "sigma": _rel(sig.cpu(), s_ref),
                          "grad_max": max(_rel(a.cpu(), b) for a, b in zip(grads, ref_g))})
    # the whole W / sigma as training runs it (fp32 weights; fp32 or bf16 out), on every 5th layer: the float64
    # reference of all 65 would cost the stage's time box
    w_sub, u_sub = w64[::5], u64[::5]
    ws_ref = [w.clone().requires_grad_() for w in w_sub]
    norm_ref = spectral_normalize(ws_ref, u_sub, 1, 1e-12, "torch")[0]
    upstream = [torch.randn(*w.shape, generator=g, dtype=torch.float64) for w in w_sub]
    ref_g = torch.autograd.grad(norm_ref, ws_ref, upstream)
    out["sn_normalize"] = []
    for dt in dtypes:
        ws = [w.to(dev, torch.float32).requires_grad_() for w in w_sub]
        got = spectral_normalize(ws, [u.to(dev, torch.float32) for u in u_sub], 1, 1e-12, "triton", out_dtype=dt)[0]
        grads = torch.autograd.grad(got, ws, [x.to(dev, dt) for x in upstream])
        out["sn_normalize"].append({"layers": len(w_sub), "out_dtype": str(dt)[6:],
                                    "w_sn_max": max(_rel(a.cpu(), b) for a, b in zip(got, norm_ref)),
                                    "grad_max": max(_rel(a.cpu(), b) for a, b in zip(grads, ref_g))})
    worst = max([r["loss"] for r in out["d2d_ce"] if r["dtype"] == "float32"] +
                [r["sigma"] for r in out["sn"] if r["dtype"] == "float32"] +
                [r["w_sn_max"] for r in out["sn_normalize"] if r["out_dtype"] == "float32"])
    out["status"] = "ok" if worst < 1e-4 else "fail"
    out["worst_fp32_rel_error"] = worst
    return out


def stage_determinism(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    import torch

    from kernels import d2d_ce, sn_power_iteration
    dev = _device(smoke)
    runs = 3 if smoke else 20
    n, m, d = (8, 64, 32) if smoke else (64, 2048, 512)
    g = torch.Generator().manual_seed(2)
    cols = torch.randn(m, d, generator=g).to(dev)
    labels = torch.randint(0, 100, (m,), generator=g).to(dev)
    proxy = torch.randn(n, d, generator=g).to(dev)
    ws = [torch.randn(*s, generator=g).to(dev).requires_grad_() for s in ([(64, 40)] if smoke else _sn_shapes())]
    us = [torch.nn.functional.normalize(torch.randn(w.shape[0], generator=g), dim=0).to(dev) for w in ws]
    outs = []
    for _ in range(runs):
        leaves = [cols[:n].clone().requires_grad_(), proxy.clone().requires_grad_(), cols.clone().requires_grad_()]
        run = []
        for tmode in ("matrix", "fused"):
            loss = d2d_ce(leaves[0], leaves[1], labels[:n], 0.5, 0.9, backend="triton",
                          negatives=(leaves[2], labels), triton_mode=tmode)
            run += [loss.detach(), *torch.autograd.grad(loss, leaves)]
        sig, u, _ = sn_power_iteration(ws, us, 1, backend="triton")
        outs.append(run + [sig.detach(), *u, *torch.autograd.grad(sig.sum(), ws)])
    equal = all(torch.equal(a, b) for other in outs[1:] for a, b in zip(outs[0], other))
    return {"status": "ok" if equal else "fail", "repeats": runs, "bitwise_equal": equal}


def stage_kernels(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    import torch

    from kernels.bench import D2D_GPU_SHAPES, D2D_GPU_VARIANTS, bench_d2d
    dev = _device(smoke)
    if smoke:
        shapes = [(8, 64, 32, torch.float32)]
        variants = ("triton", "triton_fused", "triton_1d", "eager", "torch_bf16")
    else:
        shapes, variants = D2D_GPU_SHAPES, D2D_GPU_VARIANTS
    rows: List[Dict[str, Any]] = []

    def speedups(metric: str, variant: str = "triton") -> Dict[str, float]:
        best: Dict[str, Any] = {}
        for r in rows:  # the kernel against the best torch path, per shape
            if "variant" in r:
                best.setdefault(f"{r['n_local']}x{r['n_global']}x{r['d']} {r['dtype']}", {})[r["variant"]] = \
                    r.get(metric)
        return {k: (min(v[x] for x in ("eager", "torch_bf16", "compile") if v.get(x)) / v[variant])
                for k, v in best.items() if v.get(variant) and any(v.get(x) for x in ("eager", "torch_bf16"))}

    seconds: Dict[str, float] = {}  # per shape, compiling and autotuning included: what sizes the stage's box

    def result() -> Dict[str, Any]:  # wall time with launches, and device time alone (replayed CUDA graphs)
        return {"rows": rows, "speedup_vs_best_torch": speedups("median_ms"),
                "graph_speedup_vs_best_torch": speedups("graph_ms"),
                "graph_speedup_fused_vs_best_torch": speedups("graph_ms", "triton_fused"), "shape_seconds": seconds}
    for shape in shapes:
        if time.time() > deadline - 5:
            rows.append({"shape": list(shape[:3]), "dtype": str(shape[3])[6:], "skipped": "out of time"})
            continue
        t0 = time.time()
        rows.extend(bench_d2d(dev, [shape], variants))
        seconds[f"{shape[0]}x{shape[1]}x{shape[2]} {str(shape[3])[6:]}"] = round(time.time() - t0, 1)
        save(result())
    return result()


def stage_sn(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    from kernels.bench import bench_sn, bench_sn_tiles, sn_tile_candidates
    dev = _device(smoke)
    shapes = [(64, 40), (33, 70), (8, 300)] if smoke else _sn_shapes()
    variants = ("torch_loop", "foreach", "triton_fused", "normalize_loop", "normalize_foreach", "normalize_triton")
    rows = bench_sn(dev, shapes, variants)
    n_w = sum(r * c for r, c in shapes)
    copy = _copy_gb_per_s(dev)
    # the floors, fp32 weights: sigma alone reads W twice (v and u passes) and writes its gradient once (12 B per
    # weight); the whole normalization reads W 3 times, writes bf16 W / sigma, reads the bf16 upstream gradient
    # twice and W once more, and writes the fp32 gradient (26 B)
    floor_ms = 12 * n_w / (copy * 1e9) * 1e3
    floor_norm_ms = 26 * n_w / (copy * 1e9) * 1e3
    ms = {r["variant"]: r["median_ms"] for r in rows}
    out = {"rows": rows, "layers": len(shapes), "floor_ms": floor_ms, "normalize_floor_ms": floor_norm_ms,
           "triton_vs_floor": ms["triton_fused"] / floor_ms, "triton_speedup_vs_loop": ms["torch_loop"] /
           ms["triton_fused"], "foreach_speedup_vs_loop": ms["torch_loop"] / ms["foreach"],
           "normalize_triton_vs_floor": ms["normalize_triton"] / floor_norm_ms,
           "normalize_triton_speedup_vs_loop": ms["normalize_loop"] / ms["normalize_triton"]}
    graph = {r["variant"]: r.get("graph_ms") for r in rows}
    if all(graph.values()):  # device time alone (replayed CUDA graphs): the kernels against the floor
        out.update(graph_triton_vs_floor=graph["triton_fused"] / floor_ms,
                   graph_triton_speedup_vs_loop=graph["torch_loop"] / graph["triton_fused"],
                   graph_normalize_triton_vs_floor=graph["normalize_triton"] / floor_norm_ms)
    save(dict(out, status="ok"))
    # the power-iteration passes under other tilings (they read the weights at ~1.1 TB/s on the H100 and H200):
    # what to make kernels.spectral_norm_triton.GPU_TILES on the next run
    tiles = bench_sn_tiles(dev, shapes, sn_tile_candidates(dev), deadline=deadline - 3)
    timed = [t for t in tiles if "ms" in t]
    out.update(tiles=tiles, best_tiles=min(timed, key=lambda t: t["ms"])["tiles"] if timed else None,
               best_tiles_speedup=timed[0]["ms"] / min(t["ms"] for t in timed) if timed else None)
    return out


def stage_layers(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    import torch

    from hpc_gan.config import load
    from hpc_gan.models.attention_bench import bench_attention
    from hpc_gan.models.resample_bench import bench_resampling
    from hpc_gan.models.resample_conv_bench import bench_resample_convs
    from hpc_gan.models.rgb_conv_bench import bench_rgb_convs
    from kernels.bench import median_ms
    dev = _device(smoke)
    if dev.type == "cuda":
        from triton.testing import do_bench

        def time_ms(fn: Callable[[], Any]) -> float:  # short: ~100 timings must fit the stage's box
            return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))
        cfg, batch, dtype = load(ROOT / "configs" / "imagenet128_reacgan_b2048.yaml"), 256, torch.bfloat16
    else:
        def time_ms(fn: Callable[[], Any]) -> float:
            return median_ms(fn, dev, reps=3)
        # the demo's nets with an attention block in each, so that the attention bench runs too
        cfg, batch, dtype = load(ROOT / "configs" / "demo.yaml", ["model.g_attn_res=8", "model.d_attn_res=8"]), 4, \
            torch.float32
    copy_gb_per_s = _copy_gb_per_s(dev)
    # the newest questions first, the resampling convolutions and then the RGB ones (the fourth run decided the
    # resampling and the attention: they get what is left)
    fused = bench_resample_convs(cfg, batch, dev, dtype, time_ms, copy_gb_per_s, deadline - 25)
    rgb = bench_rgb_convs(cfg, batch, dev, dtype, time_ms, copy_gb_per_s, deadline - 14)
    out = bench_resampling(cfg, batch, dev, dtype, time_ms, copy_gb_per_s, deadline - 6)
    attn = bench_attention(cfg, batch, dev, dtype, time_ms, deadline - 2)
    return {**out, "attention_rows": attn["rows"], "attention_ms_per_iteration": attn["ms_per_iteration"],
            "attention_best": attn["best"], "rgb_conv_rows": rgb["rows"],
            "rgb_conv_ms_per_iteration": rgb["ms_per_iteration"], "rgb_conv_best": rgb["best"],
            "resample_conv_rows": fused["rows"], "resample_conv_ms_per_iteration": fused["ms_per_iteration"],
            "resample_conv_best": fused["best"], "batch": batch, "dtype": str(dtype)[6:], "device": dev.type}


FASTEST_LABELS = ("eager fastest layers", "cuda_graphs fastest layers")  # CUDA graphs: on a GPU only
TRAIN_KEYS = ("sec_per_step", "samples_per_s_per_device", "tflops_per_device", "mfu", "gpu_busy", "host_bound",
              "aten_ops_per_iteration", "cuda_kernels_per_iteration", "kernel_device_ms_per_iteration",
              "first_step_seconds", "peak_memory_gib", "peak_reserved_gib", "phase_ms_per_step",
              "phase_host_ms_per_step", "kernel_ms_by_kind", "top_kernels_by_kind", "top_kernels", "top_ops",
              "top_op_shapes", "inductor_kernels")


def train_cases(smoke: bool, wanted: Optional[List[str]] = None) -> Tuple[Path, List[str], List[Case]]:
    """(preset, overrides for all, [(batch per GPU, label, overrides)]): the most telling first. Eager at 256 (MFU
    of the defaults), CUDA graphs at 256 (the best MFU: 41.8% on the H200, compile's 40.9%), CUDA graphs at 32 (the
    operating point: host time), eager at 32, compile at 256 and at 32; then, if time is left, the layers stage's
    fastest pooling, upsampling, attention, RGB and resampling convolutions where the defaults run others
    (``FASTEST_LABELS``: eager, and under CUDA graphs, where the MFU goal is measured), CUDA graphs with inductor's
    kernels tuned (train.compile_tuning), and cuDNN's heuristics in place of its benchmarked algorithms
    (train.cudnn_benchmark). On a fresh H200 an eager case at 256 takes ~45 s and a compiled or
    CUDA-graph one ~100 s, ~80 s of it the first step (2026-11-27), so the stage (140 s plus what the stages before
    it left) runs the first two and skips any case that cannot finish (``case_seconds``): a second call,
    ``--stages train --cases ... --seconds ...``, runs the others. All channels-last (auto's choice on CUDA; NCHW
    ran 12% slower in both runs of the first H100 session).
    ``wanted``: the keys to run (default: ``--cases``, as the train stage's process gets them; [] for all)."""
    fastest, fastest_compiled = _fastest_layers(), _fastest_layers(compiled=True)
    if smoke:
        cases = [(8, "eager", [])] + ([(8, FASTEST_LABELS[0], fastest)] if fastest else [])
        return ROOT / "configs" / "demo.yaml", ["model.g_ch=8", "model.d_ch=8", "run.device=cpu"], \
            _pick_cases(cases, wanted)
    nhwc = ["model.memory_format=channels_last"]
    compiled = ["train.compile=default", *nhwc]
    graphs = ["train.cuda_graphs=true", *nhwc]
    cases = [(256, "eager", nhwc), (256, "cuda_graphs", graphs), (32, "cuda_graphs", graphs), (32, "eager", nhwc),
             (256, "compile", compiled), (32, "compile", compiled)] + \
        ([(256, FASTEST_LABELS[0], [*fastest, *nhwc])] if fastest else []) + \
        ([(256, FASTEST_LABELS[1], [*fastest_compiled, *graphs])] if fastest_compiled else []) + \
        [(256, "cuda_graphs tuned", ["train.compile_tuning=true", *graphs]),
         (256, "eager no cudnn benchmark", ["train.cudnn_benchmark=false", *nhwc])]
    return ROOT / "configs" / "imagenet128_reacgan_b2048.yaml", ["train.precision=bf16"], _pick_cases(cases, wanted)


def case_key(batch: int, label: str) -> str:
    return f"{batch}:{label.replace(' ', '_')}"


def _pick_cases(cases: List[Case], wanted: Optional[List[str]]) -> List[Case]:
    """The cases ``wanted`` names (as BATCH:MODE, in its order; None: those ``--cases`` named), else all."""
    wanted = os.environ.get(CASES_ENV, "").split() if wanted is None else wanted
    if not wanted:
        return cases
    by_key = {case_key(b, label): (b, label, flags) for b, label, flags in cases}
    unknown = [k for k in wanted if k not in by_key]
    if unknown:
        hint = ("; the fastest layers' case runs only where the layers stage found layers faster than the defaults"
                if any("fastest_layers" in k for k in unknown) else "")
        raise ValueError(f"--cases {' '.join(unknown)}: not a train case here; the cases are {', '.join(by_key)}"
                         f"{hint}")
    return [by_key[k] for k in wanted]


def _fastest_layers(compiled: bool = False) -> List[str]:
    """Overrides that put the layers stage's fastest pooling, upsampling, attention, RGB and resampling
    convolutions in place of what the defaults run on the device ("auto"'s choices, "sdpa", "conv2d"), so a step
    case checks the op-level winners at the step level, eager and (``compiled``) under CUDA graphs, where the MFU
    goal is measured and inductor may fuse a formulation differently; [] when the defaults won or the stage did not
    run. Compiled, a winning pool_impl=nearest_grad is left out: it does not compile on CUDA
    (train.trainer.compile_mode)."""
    from hpc_gan.config import ModelConfig
    from hpc_gan.models.layers import auto_resample
    from hpc_gan.models.resample_conv import resolve
    stage_dir = os.environ.get(STAGE_DIR_ENV)
    path = Path(stage_dir) / "stage-layers.json" if stage_dir else None
    if path is None or not path.exists():
        return []
    stage = json.loads(path.read_text())
    device, resample_conv = stage.get("device", "cuda"), stage.get("resample_conv_best") or {}
    # (config key, fastest, what the defaults run there): a fastest that the defaults already run is named, harmlessly
    fastest = [(f"{k}_impl", v, auto_resample(k, device)) for k, v in stage.get("best", {}).items()] + \
        [("attn_impl", stage.get("attention_best"), ModelConfig.attn_impl)] + \
        [(f"{side}_rgb_conv_impl", v, getattr(ModelConfig, f"{side}_rgb_conv_impl"))
         for side, v in (stage.get("rgb_conv_best") or {}).items()] + \
        [(key, resample_conv.get(side), resolve(getattr(ModelConfig, key), kind, device))
         for key, side, kind in (("g_upconv_impl", "g", "up"), ("d_downconv_impl", "d", "down"))]
    fastest = [(k, v, default) for k, v, default in fastest
               if v is not None and not (compiled and (k, v) == ("pool_impl", "nearest_grad"))]
    if all(v == default for _, v, default in fastest):
        return []
    return [f"model.{k}={v}" for k, v, _ in fastest]


def stage_train(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    """Each case in a fresh process: torch.compile's caches live per process and are keyed by code, not by model
    instance, so a second trainer in one process would run the first one's compiled (or given-up) frames."""
    preset, extra, cases = train_cases(smoke)
    common = ["data.name=synthetic", "data.num_classes=10", "train.standing_stats=0", "run.tensorboard=false"]
    results: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch, label, flags in cases:
            left = deadline - time.time() - 5
            need = 20 if smoke else case_seconds(batch, label)
            if left < need:  # skipped, not started: a case cut off by the box reports nothing and spends the lease
                results.append({"batch": batch, "mode": label, "status": "skip",
                                "why": f"out of time (needs ~{need} s, {max(0, left):.0f} s left)"})
                continue
            started = time.time()
            out = Path(tmp) / "case.json"
            out.unlink(missing_ok=True)
            overrides = common + extra + flags + [f"train.batch_size={batch}", f"data.synthetic_size={2 * batch}"]
            # the cudagraphs log only where graphs are captured: elsewhere it names every op of every graph
            cudagraphs = any("cuda_graphs=true" in f for f in flags)
            env = dict(os.environ, TORCH_LOGS="recompiles,graph_breaks" + (",cudagraphs" if cudagraphs else ""))
            cmd = [sys.executable, "-m", "hpc_gan.gpucheck", "--train-case", str(preset), str(out),
                   "3" if smoke else "8", "1" if smoke else "3", *overrides]
            rc, err = run_boxed(cmd, env, left)
            row: Dict[str, Any] = {"batch": batch, "mode": label, "seconds": round(time.time() - started, 1)}
            if out.exists():  # whole, or what the case knew when its box ran out (its step time, say)
                row.update(json.loads(out.read_text()))
            if rc != 0:
                row.update(status="timeout" if rc is None else "fail")
            # what dynamo and the CUDA-graph trees said (recompiles, graph breaks, skipped graphs), and any error
            said = [x for x in err.splitlines() if any(k in x for k in ("recompil", "graph break", "Graph break",
                                                                        "cudagraph", "skipping", "Error", "error"))]
            if rc != 0:
                row["stderr"] = err[-2500:]
            elif said:
                row["stderr"] = "\n".join(said)[-2500:]
            results.append(row)
            save({"status": "ok", "runs": results})
    failed = any(r.get("status") in ("fail", "timeout") for r in results)
    return {"status": "fail" if failed else "ok", "runs": results}


def train_case(preset: str, out: str, steps: int, warmup: int, overrides: List[str]) -> int:
    """One training benchmark (the child process of stage_train): its numbers to ``out``."""
    from hpc_gan.config import load
    from hpc_gan.train.bench import bench_train
    import torch._dynamo

    def partial(known: Dict[str, Any]) -> None:  # what a case stopped by its box still reports
        Path(out).write_text(json.dumps(known, default=str))
    r = bench_train(load(Path(preset), overrides), steps=steps, warmup=warmup, progress=partial)
    row = {k: r[k] for k in TRAIN_KEYS}
    # graphs dynamo compiled in this process: 4 for a compiled ReACGAN step (G with and without grad, D in each
    # update), each once; more means recompiles
    row["compiled_graphs"] = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
    # graphs inductor would not capture under train.cuda_graphs (their reasons are in the case's stderr)
    row["cudagraph_skips"] = torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)
    Path(out).write_text(json.dumps(row, default=str))
    return 0


def stage_dali(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    from hpc_gan.data.dali import dali_available
    if not dali_available():
        return {"status": "skip", "why": "DALI is not installed here"}
    from hpc_gan.data.bench import bench_data
    return {"rows": bench_data(None, _device(smoke), batches=3 if smoke else 20)}


def stage_deepspeed(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    import importlib.util

    import torch
    if importlib.util.find_spec("deepspeed") is None:
        return {"status": "skip", "why": "DeepSpeed is not installed here"}
    if smoke or torch.cuda.device_count() < 2:
        return {"status": "skip", "why": "a ZeRO-2 step needs 2 ranks, and NCCL one GPU per rank: 2 GPUs"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "hpc_gan.cli", "bench",
           "--config", str(ROOT / "configs" / "demo.yaml"), "--steps", "2", "--warmup", "1", "dist.strategy=zero2",
           "train.precision=bf16", "run.device=cuda"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return {"status": "ok" if proc.returncode == 0 else "fail", "tail": proc.stdout[-800:] + proc.stderr[-800:]}


# ---- plumbing ------------------------------------------------------------------------------------------------------
def _device(smoke: bool) -> Any:
    import torch
    return torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")


def _copy_gb_per_s(dev: Any) -> float:
    """Device-to-device copy bandwidth, bytes read plus bytes written, of 1 GiB of random fp32 (4 MiB on a CPU)."""
    import torch

    from kernels.bench import median_ms
    n = (1 << 28) if dev.type == "cuda" else (1 << 20)
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    return round(2 * src.numel() * 4 / median_ms(lambda: dst.copy_(src), dev) / 1e6, 1)


def _sn_shapes() -> List[Tuple[int, int]]:
    from hpc_gan.config import load
    from hpc_gan.info import sn_shapes
    return sn_shapes(load(ROOT / "configs" / "imagenet128_reacgan_b2048.yaml"))


def run_stage(name: str, smoke: bool, deadline: float, save: Optional[Save] = None) -> Dict[str, Any]:
    return globals()[f"stage_{name}"](smoke, deadline, save or (lambda partial: None))


def _child(name: str, smoke: bool, deadline: float, out: Path) -> int:
    """One stage, in this process: its result to ``out`` as JSON (and its partial results as it goes)."""
    t0 = time.time()

    def save(partial: Dict[str, Any]) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({**partial, "name": name, "seconds": round(time.time() - t0, 1)}, default=str))
        tmp.replace(out)  # whole files only: the parent may read it after killing this process
    try:
        result = run_stage(name, smoke, deadline, save)
        result.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001 -- a stage's failure is its result
        result = {"status": "fail", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                  "traceback": traceback.format_exc()[-2000:]}
    result.update(name=name, seconds=round(time.time() - t0, 1))
    out.write_text(json.dumps(result, indent=1, default=str))
    return 0


GOAL_SHAPE = "256x2048x2048 bfloat16"  # issue 15: D2D-CE at least 3x the best torch path here


def goal_rows(report: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """(goal, measured, met | missed | not measured) for the speed goals of issues 15 and 13, from what ran."""
    stages = {s["name"]: s for s in report["stages"]}
    rows: List[Tuple[str, str, str]] = []

    def row(goal: str, value: Optional[float], fmt: str, ok: Callable[[float], bool]) -> None:
        rows.append((goal, "n/a" if value is None else fmt.format(value),
                     "not measured" if value is None else ("met" if ok(value) else "missed")))

    k = stages.get("kernels", {})
    unmeasured = sum(1 for r in k.get("rows", []) if "skipped" in r)  # shapes the stage's box left out
    for label, key in (("wall", "speedup_vs_best_torch"), ("device", "graph_speedup_vs_best_torch")):
        speedups = k.get(key) or {}
        row(f"D2D-CE fwd+bwd >= best torch path at every shape ({label})", min(speedups.values(), default=None),
            "{:.2f}x (slowest shape)", lambda v: v >= 1)
        if unmeasured and rows[-1][2] == "met":  # "every shape" is not met while shapes are missing
            rows[-1] = (rows[-1][0], rows[-1][1].replace("shape)", f"of {len(speedups)}; {unmeasured} not measured)"),
                        "partly measured")
        row(f"D2D-CE >= 3x best torch at {GOAL_SHAPE} ({label})", speedups.get(GOAL_SHAPE), "{:.2f}x",
            lambda v: v >= 3)
    sn = stages.get("sn", {})
    row("SN, all layers, per forward: >= 5x the per-layer loop", sn.get("normalize_triton_speedup_vs_loop"),
        "{:.2f}x", lambda v: v >= 5)
    row("SN within 1.5x of the bandwidth floor (device time)", sn.get("graph_normalize_triton_vs_floor"), "{:.2f}x",
        lambda v: v <= 1.5)
    runs = [r for r in stages.get("train", {}).get("runs", []) if "sec_per_step" in r]
    mfu = [r["mfu"] for r in runs if r["batch"] == 256 and r.get("mfu")]
    row("train step MFU >= 45% at 256 per GPU (best case)", 100 * max(mfu) if mfu else None, "{:.1f}%",
        lambda v: v >= 45)
    from hpc_gan.train.bench import HOST_BOUND_BUSY
    for batch in (32, 256):
        fast = [r for r in runs if r["batch"] == batch and ("compile" in r["mode"] or "cuda_graphs" in r["mode"])]
        busy = [r["gpu_busy"] for r in fast if r.get("gpu_busy") is not None]
        row(f"not host-bound at {batch} per GPU with compile or CUDA graphs (GPU busy, best case)",
            100 * max(busy) if busy else None, "{:.0f}% busy", lambda v: v >= 100 * HOST_BOUND_BUSY)
    return rows


def write_report(out_dir: Path, report: Dict[str, Any]) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"# GPU check, {report['started']}", "", f"command: `{report['command']}`", "",
             "| stage | status | seconds | summary |", "|---|---|---|---|"]
    for s in report["stages"]:
        keep = {k: v for k, v in s.items() if k not in ("name", "status", "seconds", "rows", "runs", "traceback",
                                                        "d2d_ce", "sn", "speedup_vs_best_torch", "output_tail",
                                                        "graph_speedup_vs_best_torch", "ms_per_iteration",
                                                        "graph_speedup_fused_vs_best_torch", "attention_rows",
                                                        "tiles", "best_tiles", "shape_seconds", "rgb_conv_rows",
                                                        "rgb_conv_ms_per_iteration", "resample_conv_rows",
                                                        "resample_conv_ms_per_iteration")}
        summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in keep.items())
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {summary[:300]} |")
    for s in report["stages"]:
        if s.get("speedup_vs_best_torch"):
            graph = s.get("graph_speedup_vs_best_torch") or {}
            fused = s.get("graph_speedup_fused_vs_best_torch") or {}
            lines += ["", "D2D-CE: the kernel's speed-up over the best torch path (wall with launches; device time "
                      "alone, CUDA-graph replay; `fused` mode's device time beside it)", "",
                      "| shape | wall | device | fused, device |", "|---|---|---|---|"]
            lines += [f"| {k} | {v:.2f}x | " + " | ".join(f"{x[k]:.2f}x" if k in x else "n/a" for x in (graph, fused))
                      + " |" for k, v in s["speedup_vs_best_torch"].items()]
        for t in s.get("tiles") or []:
            tiles = "/".join(str(v) for v in t["tiles"].values())
            lines.append(f"- SN power iteration, tiles {tiles} ({'/'.join(t['tiles'])}): " +
                         (f"{t['ms']:.3f} ms (v pass {t.get('sn_v_ms', float('nan')):.3f}, u pass "
                          f"{t.get('sn_u_ms', float('nan')):.3f}), weights read at {t['read_tb_per_s']:.2f} TB/s, "
                          f"sigma within {t['sigma_max_rel_diff']:.1e} of the first" if "ms" in t
                          else t.get("skipped", "")))
        for op, per in (s.get("ms_per_iteration") or {}).items():
            impls = ", ".join(f"{k} {v:.1f}" for k, v in per.items() if k != "floor_ms")
            lines.append(f"- {op}, ms per iteration at batch {s.get('batch')} ({s.get('dtype')}): {impls}; "
                         f"floor {per['floor_ms']:.1f}; fastest: {s['best'].get(op, 'n/a')}")
        if s.get("attention_ms_per_iteration"):
            impls = ", ".join(f"{k} {v:.1f}" for k, v in s["attention_ms_per_iteration"].items())
            lines.append(f"- attention, ms per iteration at batch {s.get('batch')} ({s.get('dtype')}): {impls}; "
                         f"fastest: {s.get('attention_best')}")
        # the layers stage's convolution benches: per convolution, then each network's choice
        for key, what, best, keys in (("rgb_conv", "RGB convolution", "fastest", {"d": "d_rgb_conv_impl",
                                                                                 "g": "g_rgb_conv_impl"}),
                                      ("resample_conv", "resampling convolution", "faster",
                                       {"g": "g_upconv_impl", "d": "d_downconv_impl"})):
            for conv, per in (s.get(f"{key}_ms_per_iteration") or {}).items():
                impls = ", ".join(f"{k} {v:.2f}" for k, v in per.items() if k != "floor_ms")
                lines.append(f"- {what} {conv}, ms per iteration at batch {s.get('batch')}: {impls}; "
                             f"floor {per['floor_ms']:.2f}")
            if s.get(f"{key}_best"):
                lines.append(f"- {what}s, {best} over each network's: " + ", ".join(
                    f"{keys[side]} {v}" for side, v in s[f"{key}_best"].items()))
        for r in s.get("runs", []):
            if "sec_per_step" in r:
                mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
                busy = f", GPU busy {100 * r['gpu_busy']:.0f}%" if r.get("gpu_busy") else ""
                graphs = f", {r['compiled_graphs']} compiled graphs" if r.get("compiled_graphs") else ""
                cut = f" ({r['status']} after its timed steps)" if r.get("status") in ("timeout", "fail") else ""
                lines.append(f"- train, batch {r['batch']}, {r['mode']}{cut}: {1e3 * r['sec_per_step']:.1f} ms/step, "
                             f"MFU {mfu}, host-bound {r.get('host_bound', 'n/a')}{busy}, kernels/iteration "
                             f"{r.get('cuda_kernels_per_iteration', 'n/a')}, first step "
                             f"{r['first_step_seconds']:.1f} s{graphs}")
                if r.get("kernel_ms_by_kind"):
                    lines.append("  - device ms per iteration by kind: " + ", ".join(
                        f"{k} {v:.1f}" for k, v in r["kernel_ms_by_kind"].items()))
                for k in r.get("inductor_kernels") or []:  # sources in report.json
                    what = " | ".join(describe(d) for d in k["definitions"]) or "source not found"
                    lines.append(f"  - inductor kernel {k['name']}: {k['ms']:.2f} ms in {k['calls']} calls ({what})")
            elif "batch" in r:
                lines.append(f"- train, batch {r['batch']}, {r['mode']}: {r.get('status')} "
                             f"{r.get('why') or r.get('stderr', '')[-200:]}")
    lines += ["", "Speed goals (issues 15 and 13)", "", "| goal | measured | |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {v} |" for g, m, v in goal_rows(report)]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


def run_boxed(cmd: List[str], env: Dict[str, str], limit: float) -> Tuple[Optional[int], str]:
    """(exit code or None when the time box ran out, stderr). Its own process group, killed whole on time-out, so
    no compile worker or pytest child lives on holding the GPU."""
    import signal
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=limit)
        return proc.returncode, err
    except subprocess.TimeoutExpired:  # what it said before the kill tells where it was (compiling, say)
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return None, err


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="the GPU check pack (see docs/gpu-check.md)")
    p.add_argument("--out", default="runs/gpu-check", help="where report.json and report.md go")
    p.add_argument("--smoke", action="store_true", help="every stage at toy sizes on the CPU (Triton interpreter)")
    p.add_argument("--stages", nargs="*", default=[s for s, _, _ in STAGES], help="a subset of the stages")
    p.add_argument("--cases", nargs="*", default=[], metavar="BATCH:MODE",
                   help="the train stage's cases to run, in this order (e.g. 256:compile 32:cuda_graphs); default all")
    p.add_argument("--seconds", type=float, default=None,
                   help="the whole call's time: the last stage chosen gets what the others leave of it (default: the "
                        "chosen stages' boxes added up, 480 s for all of them on a GPU)")
    p.add_argument("--child", nargs=3, metavar=("STAGE", "DEADLINE", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--train-case", nargs="+", help=argparse.SUPPRESS)  # PRESET OUT STEPS WARMUP OVERRIDES...
    args = p.parse_args(argv)
    if args.train_case:
        preset, out, steps, warmup, *overrides = args.train_case
        return train_case(preset, out, int(steps), int(warmup), overrides)
    if args.child:
        return _child(args.child[0], args.smoke, float(args.child[1]), Path(args.child[2]))
    import torch
    smoke = args.smoke or not torch.cuda.is_available()
    names = [s for s, _, _ in STAGES]
    if set(args.stages) - set(names):
        p.error(f"--stages {' '.join(x for x in args.stages if x not in names)}: no such stage; "
                f"the stages are {' '.join(names)}")
    _, _, cases = train_cases(smoke, wanted=[])  # all of them, to check --cases against
    # the fastest-layers cases exist once the layers stage has run: named before it, they are known here
    fastest_keys = [case_key(cases[0][0], label) for label in FASTEST_LABELS[:1 if smoke else None]]
    keys = [case_key(b, label) for b, label, _ in cases] + fastest_keys
    if set(args.cases) - set(keys):
        p.error(f"--cases {' '.join(x for x in args.cases if x not in keys)}: no such train case here; "
                f"the cases are {' '.join(dict.fromkeys(keys))}")
    needs_layers = [k for k in args.cases if k in fastest_keys]
    if needs_layers and "layers" not in args.stages:  # the H200's second call, 2026-11-27, spent a start on this
        p.error(f"--cases {needs_layers[0]} runs what the layers stage found fastest: add layers to --stages "
                f"(--stages layers train)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                              "command": " ".join(["scripts/gpu-check.sh", *(argv if argv is not None else
                                                                               sys.argv[1:])]),
                              "smoke": smoke, "stages": []}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    if smoke:
        env["TRITON_INTERPRET"] = "1"  # the kernels run on the CPU, in Triton's interpreter
    stage_dir = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # DIR keeps the two reports alone
    env[STAGE_DIR_ENV] = str(stage_dir)  # a later stage may read an earlier one's result (train reads layers)
    env[CASES_ENV] = " ".join(args.cases)
    chosen = [(name, smoke_s if smoke else gpu_s) for name, gpu_s, smoke_s in STAGES if name in args.stages]
    end = time.time() + (args.seconds or sum(box for _, box in chosen))
    spare = 0.0  # seconds the stages so far left of their boxes
    for i, (name, box) in enumerate(chosen):
        left = end - time.time()
        limit = round(left if i == len(chosen) - 1 else min(box + spare, left))
        if limit < 1:
            report["stages"].append({"name": name, "status": "skip", "seconds": 0.0,
                                     "why": "out of time (--seconds)"})
            write_report(out_dir, report)
            continue
        out = stage_dir / f"stage-{name}.json"
        t0 = time.time()
        print(f"gpu-check: {name} (at most {limit} s) ...", flush=True)
        cmd = [sys.executable, "-m", "hpc_gan.gpucheck", "--child", name, str(t0 + limit), str(out)]
        rc, stderr = run_boxed(cmd + (["--smoke"] if smoke else []), env, limit)
        result = json.loads(out.read_text()) if out.exists() else {"name": name}  # partial, if it was cut off
        if rc is None:
            result.update(status="timeout", error=f"over its {limit} s")
        elif rc != 0:  # died (a crash, a CUDA error): keep what it saved, with the reason
            result.update(status="fail", error=(stderr.strip().splitlines() or [f"exit {rc}"])[-1][:300])
        result["seconds"] = round(time.time() - t0, 1)
        spare = max(0.0, limit - result["seconds"])
        report["stages"].append(result)
        write_report(out_dir, report)
        print(f"gpu-check: {name}: {result['status']} in {result['seconds']} s", flush=True)
    bad = [s["name"] for s in report["stages"] if s["status"] in ("fail", "timeout")]
    print(f"gpu-check: report in {out_dir}/report.md" + (f"; not ok: {', '.join(bad)}" if bad else "; all ok"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
