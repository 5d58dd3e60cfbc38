"""The GPU check pack's stages but train (train_cases.py): each takes (smoke, deadline, save) and returns a dict of
numbers, status "ok" unless it says otherwise; a stage that loops calls ``save`` with what it has after each case."""
from __future__ import annotations

import itertools
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

from hpc_gan.gpucheck.common import ROOT, Save, biggan128_sn_shapes, copy_gb_per_s, device_for


def stage_env(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    import torch
    import triton

    from kernels.bench import median_ms
    out: Dict[str, Any] = {"torch": torch.__version__, "triton": triton.__version__,
                           "python": sys.version.split()[0]}
    dev = device_for(smoke)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out.update(gpu=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1), sms=props.multi_processor_count,
                   cuda=torch.version.cuda, capability=".".join(map(str, torch.cuda.get_device_capability())))
    out["copy_gb_per_s"] = copy_gb_per_s(dev)
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
    dev = device_for(smoke)
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
    sn = [(64, 40), (33, 70)] if smoke else biggan128_sn_shapes()
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
    dev = device_for(smoke)
    runs = 3 if smoke else 20
    n, m, d = (8, 64, 32) if smoke else (64, 2048, 512)
    g = torch.Generator().manual_seed(2)
    cols = torch.randn(m, d, generator=g).to(dev)
    labels = torch.randint(0, 100, (m,), generator=g).to(dev)
    proxy = torch.randn(n, d, generator=g).to(dev)
    sn_shapes = [(64, 40)] if smoke else biggan128_sn_shapes()
    ws = [torch.randn(*s, generator=g).to(dev).requires_grad_() for s in sn_shapes]
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
    from kernels.host_bench import d2d_host_costs
    dev = device_for(smoke)
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
    # first, in a second or two: where the host's time goes in one call at the operating point (the kernel's wall
    # time is host-bound: 13 launches, ~1 ms); the direct launches (kernels.launch.DIRECT, never yet run on a GPU)
    # last, after every shape, so that a fault there costs no shape
    probe = ((8, 64, 32, torch.float32) if smoke else (32, 2048, 512, torch.bfloat16))
    reps = 2 if smoke else 50
    host = guarded(lambda: d2d_host_costs(dev, *probe, reps=reps))

    def result() -> Dict[str, Any]:  # wall time with launches, and device time alone (replayed CUDA graphs)
        return {"rows": rows, "speedup_vs_best_torch": speedups("median_ms"),
                "graph_speedup_vs_best_torch": speedups("graph_ms"),
                "graph_speedup_fused_vs_best_torch": speedups("graph_ms", "triton_fused"), "shape_seconds": seconds,
                "host_costs": host}
    for shape in shapes:
        if time.time() > deadline - 5:
            rows.append({"shape": list(shape[:3]), "dtype": str(shape[3])[6:], "skipped": "out of time"})
            continue
        t0 = time.time()
        rows.extend(bench_d2d(dev, [shape], variants))
        seconds[f"{shape[0]}x{shape[1]}x{shape[2]} {str(shape[3])[6:]}"] = round(time.time() - t0, 1)
        save(result())
    if time.time() < deadline - 4:  # warm by now: ~1 s
        direct = guarded(lambda: d2d_host_costs(dev, *probe, reps=reps, direct=True))
        host.update({("direct_error" if k == "error" else k): v for k, v in direct.items()})
    else:
        host["direct"] = "not measured: out of time"
    return result()


def guarded(measure: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """What ``measure`` returns, or its error: a probe's failure is a result, not the end of the stage."""
    try:
        return measure()
    except Exception as e:  # noqa: BLE001 -- reported, with the stage's other results
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def stage_sn(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    from kernels.bench import bench_sn, bench_sn_tiles, sn_tile_candidates
    dev = device_for(smoke)
    shapes = [(64, 40), (33, 70), (8, 300)] if smoke else biggan128_sn_shapes()
    variants = ("torch_loop", "foreach", "triton_fused", "normalize_loop", "normalize_foreach", "normalize_triton")
    rows = bench_sn(dev, shapes, variants)
    n_w = sum(r * c for r, c in shapes)
    copy = copy_gb_per_s(dev)
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
    dev = device_for(smoke)
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
    copy_rate = copy_gb_per_s(dev)
    # the newest questions first, the resampling convolutions and then the RGB ones (the fourth run decided the
    # resampling and the attention: they get what is left)
    fused = bench_resample_convs(cfg, batch, dev, dtype, time_ms, copy_rate, deadline - 25)
    rgb = bench_rgb_convs(cfg, batch, dev, dtype, time_ms, copy_rate, deadline - 14)
    out = bench_resampling(cfg, batch, dev, dtype, time_ms, copy_rate, deadline - 6)
    attn = bench_attention(cfg, batch, dev, dtype, time_ms, deadline - 2)
    return {**out, "attention_rows": attn["rows"], "attention_ms_per_iteration": attn["ms_per_iteration"],
            "attention_best": attn["best"], "rgb_conv_rows": rgb["rows"],
            "rgb_conv_ms_per_iteration": rgb["ms_per_iteration"], "rgb_conv_best": rgb["best"],
            "resample_conv_rows": fused["rows"], "resample_conv_ms_per_iteration": fused["ms_per_iteration"],
            "resample_conv_best": fused["best"], "batch": batch, "dtype": str(dtype)[6:], "device": dev.type}


def stage_dali(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    from hpc_gan.data.dali import dali_available
    if not dali_available():
        return {"status": "skip", "why": "DALI is not installed here"}
    from hpc_gan.data.bench import bench_data
    return {"rows": bench_data(None, device_for(smoke), batches=3 if smoke else 20)}


def stage_deepspeed(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    import importlib.util

    import torch
    if importlib.util.find_spec("deepspeed") is None:
        return {"status": "skip", "why": "DeepSpeed is not installed here"}
    if smoke or torch.cuda.device_count() < 2:
        return {"status": "skip", "why": "a ZeRO-2 step needs 2 ranks, and NCCL one GPU per rank: 2 GPUs"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "hpc_gan.cli", "bench",
           "--config", str(ROOT / "configs" / "demo.yaml"), "--steps", "2", "--warmup", "1", "dist.strategy=zero2",
           "train.precision=bf16", "run.device=cuda",
           "model.g_attn_res=8", "model.d_attn_res=8"]  # as every preset: DeepSpeed once failed on attention's gamma
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return {"status": "ok" if proc.returncode == 0 else "fail", "tail": proc.stdout[-800:] + proc.stderr[-800:]}
