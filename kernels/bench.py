"""Kernel benchmarks (not tests): D2D-CE forward+backward and whole-network spectral norm, fused vs references.

Run through ``hpc-gan bench --kernels`` (which supplies the SN weight shapes of a model preset). On a GPU: median of
triton.testing.do_bench, peak extra memory from the CUDA allocator, kernel launches from the profiler. On a CPU only
the reference paths run (the Triton interpreter is a correctness tool, not a speed one), with a wall-clock median,
so the benchmark keeps working on machines without a GPU.
"""
from __future__ import annotations

import re
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from kernels.similarity import d2d_ce
from kernels.spectral_norm import sn_power_iteration, spectral_normalize


def median_ms(fn: Callable[[], object], device: torch.device, reps: int = 20) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Median ms of fn captured once in a CUDA graph and replayed: the device time of its kernels without the
    host's launch overhead (what a step captured whole, train.cuda_graphs, pays). None on a CPU."""
    if device.type != "cuda":
        return None
    from triton.testing import do_bench
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: autotuning, allocator, cuBLAS workspaces
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return float(do_bench(graph.replay, warmup=25, rep=100, return_mode="median"))


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def short_kernel_name(name: str) -> str:
    """A CUDA kernel's name without the namespaces and return type that every ATen kernel shares, so that the
    functor (mul, add, copy...) survives the cut: the first H100 runs' reports cut names at 100 characters, before
    it."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::", "c10::"):
        name = name.replace(noise, "")
    return name[:160]


# what a CUDA kernel is, by its name (first match wins): where a step's device time goes, in a few lines. Inductor's
# and hpc-gan's Triton kernels first (inductor names a fused kernel by its ops: "..._convolution_backward_40" is a
# reduction, not a convolution), attention before convolution (cuDNN's flash kernels say "fprop" too), and cuDNN's
# CUTLASS convolutions ("s16816fprop", mangled "ImplicitGemmConvolution") before matmul's "cutlass"; cuDNN's SDPA
# backward helpers (compute_dot_do_o, convert_dq_to_16bits) are attention's, its layout transforms copies
KERNEL_KINDS = (
    ("inductor Triton", r"^triton_"),
    ("hpc-gan Triton", r"^(sn_|d2d_|neg_lse|cosine_|inv_norms)"),
    ("attention", r"sdpa|flash|fmha|attention|cudnn::fusion::(compute_dot_do_o|convert_dq)"),
    ("convolution", r"implicit_gemm|ImplicitGemmConvolution|xmma_(fprop|dgrad|wgrad)|s16816(fprop|dgrad|wgrad)"
                    r"|convolution|conv2d|winograd|nhwcAddPadding"),
    ("matmul", r"nvjet|gemm|cutlass|cublas"),
    ("optimizer", r"FusedAdam|multi_tensor_apply|Adam"),
    ("copy", r"copy|Memcpy|CatArray|[Mm]emset|tensorTransform|nchwToNhwc|nhwcToNchw"),
    ("normalization", r"batch_norm|layer_norm|welford"),
    ("resampling", r"pool|upsample|interpolat"),
    ("reduction", r"reduce_kernel"),
    ("elementwise", r"elementwise_kernel|vectorized|unrolled"),
)


def kernel_kind(name: str) -> str:
    short = short_kernel_name(name)
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, short)), "other")


# CUDA runtime calls in which the host waits for the device (the profiler's CPU-side runtime events): the
# synchronizations, and a blocking copy (cudaMemcpy; an async one that took this long waited too)
HOST_WAIT = re.compile(r"^cu(da)?(Device|Stream|Event|Ctx)Synchronize|^cudaMemcpy(Async)?(_v\d+)?$")
WAIT_MIN_MS = 0.5  # an async copy under this is its own cost, not a wait
FINAL_SYNC_RANGE = "profile_cuda: the profiler's own final synchronize"


def host_waits(events: Sequence[Any]) -> Tuple[float, List[Tuple[str, str, float, int]]]:
    """Where the host waited for the device among a profile's events: (ms in all, [(runtime call, the innermost op
    or range it was called under, ms, calls)], the longest first), ``profile_cuda``'s own final synchronize left
    out. A CUDA-graph step that waits inside its phases is host-bound in a way kernel counts do not show."""
    found: Dict[Tuple[str, str], List[float]] = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or not HOST_WAIT.search(e.name):
            continue
        ms = e.time_range.elapsed_us() / 1e3
        owner = e.cpu_parent.name if e.cpu_parent is not None else "(outside any op)"
        if owner == FINAL_SYNC_RANGE or ("Synchronize" not in e.name and ms < WAIT_MIN_MS):
            continue
        found.setdefault((e.name, owner), []).append(ms)
    ranked = sorted(found.items(), key=lambda kv: -sum(kv[1]))
    return sum(sum(v) for v in found.values()), [(name, owner, round(sum(ms), 4), len(ms))
                                                 for (name, owner), ms in ranked]


def profile_cuda(fn: Callable[[], object], top: int = 12) -> Dict[str, Any]:
    """The CUDA kernels one call of fn launches (the profiler's device events): their count, their summed device
    time, that time by kind (``KERNEL_KINDS``) with each kind's 6 longest kernels, the ``top`` kernels by device
    time (name, ms, calls), and the ``top`` aten ops by the device time of the kernels they launched themselves
    (op, ms, calls): which op a generic elementwise kernel belongs to; and the same by op and input shapes (op,
    shapes, ms, calls): which of a step's convolutions a slow kernel serves; and where the host waited for the
    device (``host_waits``: ``host_wait_ms``, ``host_waits``)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        with record_function(FINAL_SYNC_RANGE):
            torch.cuda.synchronize()
    # kernels and copies, not the ranges that record_function draws on the GPU's timeline (the optimizer's
    # "Optimizer.step#Adam.step" overlaps its own kernels: counted, it put the H200's GPU busy above 100%)
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)]
    by_name: Dict[str, List[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us() / 1e3)  # a kernel: its own span
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))  # longest first

    def self_device_us(e: Any) -> float:  # named self_cuda_time_total before torch 2.4 (deprecated, warns, since)
        us = getattr(e, "self_device_time_total", None)
        return float(us if us is not None else getattr(e, "self_cuda_time_total", 0.0))
    # per launching op: host-side events only, each kernel counted once, under the innermost op or range that
    # launched it ("## Call CompiledFxGraph ... ##" for inductor's own kernels). key_averages() mixed in the kernels
    # themselves and the ranges on the GPU's timeline, and summed to more than the device time (the H200, 2026-11-27)
    by_op: Dict[str, List[float]] = {}
    by_op_shape: Dict[Tuple[str, str], List[float]] = {}  # which convolution, say, of the many one op name covers
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and self_device_us(e) > 0:
            by_op.setdefault(e.name, []).append(self_device_us(e) / 1e3)
            by_op_shape.setdefault((e.name, str(e.input_shapes)[:200]), []).append(self_device_us(e) / 1e3)
    ops = sorted(by_op.items(), key=lambda kv: -sum(kv[1]))[:top]
    op_shapes = sorted(by_op_shape.items(), key=lambda kv: -sum(kv[1]))[:top]
    kinds: Dict[str, float] = {}
    by_kind: Dict[str, List[Tuple[str, float, int]]] = {}  # each kind's own top kernels, past the overall top
    for name, ms in ranked:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + sum(ms)
        if len(by_kind.setdefault(kind, [])) < 6:
            by_kind[kind].append((short_kernel_name(name), round(sum(ms), 4), len(ms)))
    wait_ms, waits = host_waits(events)
    return {"count": len(kernels), "device_ms": sum(sum(v) for v in by_name.values()),
            "host_wait_ms": round(wait_ms, 4), "host_waits": waits[:top],
            "kinds": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_by_kind": by_kind,
            "top": [(short_kernel_name(name), round(sum(ms), 4), len(ms)) for name, ms in ranked[:top]],
            "top_ops": [(name, round(sum(ms), 4), len(ms)) for name, ms in ops],
            "top_op_shapes": [(name, shapes, round(sum(ms), 4), len(ms)) for (name, shapes), ms in op_shapes]}


def launch_profile(fn: Callable[[], object], device: torch.device) -> Dict[str, Any]:
    """profile_cuda of fn after one untimed call (autotuning, allocator); {} on a CPU."""
    if device.type != "cuda":
        return {}
    fn()
    return profile_cuda(fn)


def _studiogan_d2d(embed: torch.Tensor, proxy: torch.Tensor, labels: torch.Tensor, cols: torch.Tensor,
                   col_labels: torch.Tensor, offset: int, t: float, m_p: float) -> torch.Tensor:
    """StudioGAN's way: broadcast cosine_similarity (an N x M x d temporary) and masks built on the host."""
    m_n = 1.0 - m_p
    sim = F.cosine_similarity(embed[:, None, :].float(), cols[None, :, :].float(), dim=2)
    y, yc = labels.cpu().numpy(), col_labels.cpu().numpy()  # a host sync, as in StudioGAN
    neg_mask = torch.from_numpy(y[:, None] != yc[None, :]).to(embed.device)
    idx = torch.arange(embed.shape[0], device=embed.device)
    neg_mask[idx, idx + offset] = False
    pos = torch.clamp(F.cosine_similarity(embed.float(), proxy.float(), dim=1) - m_p, max=0.0) / t
    neg = torch.clamp((sim - m_n) / t, min=0.0).masked_fill(~neg_mask, float("-inf"))
    return (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()


def _torch_bf16_d2d(embed: torch.Tensor, proxy: torch.Tensor, labels: torch.Tensor, cols: torch.Tensor,
                    col_labels: torch.Tensor, offset: int, t: float, m_p: float) -> torch.Tensor:
    """The fastest plain-torch form: normalize, a bf16 matmul, the log-sum-exp in fp32."""
    m_n = 1.0 - m_p
    f = F.normalize(embed.float(), dim=1)
    c = F.normalize(cols.float(), dim=1)
    sim = (f.bfloat16() @ c.bfloat16().t()).float()
    n, m = f.shape[0], c.shape[0]
    is_self = torch.arange(m, device=f.device)[None, :] == torch.arange(n, device=f.device)[:, None] + offset
    neg_mask = (labels[:, None] != col_labels[None, :]) & ~is_self
    pos = torch.clamp((f * F.normalize(proxy.float(), dim=1)).sum(1) - m_p, max=0.0) / t
    neg = torch.clamp((sim - m_n) / t, min=0.0).masked_fill(~neg_mask, float("-inf"))
    return (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()


D2D_VARIANTS = ("triton", "triton_fused", "triton_1d", "eager", "torch_bf16", "compile", "studiogan_broadcast")
# on a GPU: not StudioGAN's broadcast (a CPU table) nor the 1-D kernel (10-27x slower on the H100 and the H200)
D2D_GPU_VARIANTS = ("triton", "triton_fused", "eager", "torch_bf16", "compile")
TRITON_MODES = {"triton": dict(), "triton_fused": dict(triton_mode="fused"),
                "triton_1d": dict(split_cols=1 << 30, triton_mode="stream")}
# the training shapes on a GPU, (local rows, gathered columns, d, dtype): 8-256 rows per GPU against a 2048 global
# batch; the goal's shape and the operating point first, so a run cut short still has them
_FIRST = [(256, 2048, 2048, torch.bfloat16), (32, 2048, 512, torch.bfloat16)]
D2D_GPU_SHAPES = _FIRST + [(n, 2048, d, dt) for dt in (torch.bfloat16, torch.float32) for n in (8, 32, 64, 256)
                           for d in (512, 2048) if (n, 2048, d, dt) not in _FIRST]


def d2d_inputs(device: torch.device, n: int, m: int, d: int, dtype: torch.dtype
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(columns, their labels, proxies, offset) of a benchmark call: m gathered columns (leaves), n local rows that
    are the columns from ``offset`` on (a slice, as a rank's own rows are among the gathered ones), their proxies."""
    g = torch.Generator(device=device).manual_seed(0)
    cols = torch.randn(m, d, device=device, dtype=dtype, generator=g).requires_grad_()
    col_labels = torch.randint(0, 1000, (m,), device=device, generator=g)
    proxy = torch.randn(n, d, device=device, dtype=dtype, generator=g).requires_grad_()
    return cols, col_labels, proxy, (m - n) // 2


def bench_d2d(device: torch.device, shapes: Sequence[Tuple[int, int, int, torch.dtype]],
              variants: Sequence[str] = D2D_VARIANTS) -> List[Dict]:
    """D2D-CE forward + backward at (local rows, gathered columns, d, dtype), per variant: "triton" (the kernels as
    they run: "auto" mode), "triton_fused" (no N x M matrix in the forward: columns split across the grid,
    autotuned), "triton_1d" (one column split and the streaming backward: the kernel before the split), "eager"
    (the torch reference), "torch_bf16"
    (normalize + bf16 matmul + fp32 log-sum-exp), "compile" (torch.compile of the reference), and StudioGAN's
    broadcast similarity."""
    rows = []
    for n_local, n_global, d, dtype in shapes:
        cols, col_labels, proxy, offset = d2d_inputs(device, n_local, n_global, d, dtype)
        labels = col_labels[offset:offset + n_local]

        def make(variant: str) -> Callable[[], object]:
            if variant == "studiogan_broadcast":
                loss_fn = lambda e: _studiogan_d2d(e, proxy, labels, cols, col_labels, offset, 0.5, 0.98)  # noqa
            elif variant == "torch_bf16":
                loss_fn = lambda e: _torch_bf16_d2d(e, proxy, labels, cols, col_labels, offset, 0.5, 0.98)  # noqa
            else:
                backend = "triton" if variant.startswith("triton") else "torch"
                extra = TRITON_MODES.get(variant, {})
                loss_fn = lambda e: d2d_ce(e, proxy, labels, 0.5, 0.98, backend=backend,  # noqa: E731
                                           negatives=(cols, col_labels), row_offset=offset, **extra)
                if variant == "compile":
                    loss_fn = torch.compile(loss_fn)

            def step() -> None:
                cols.grad = proxy.grad = None
                embed = cols[offset:offset + n_local]
                loss_fn(embed).backward()
            return step

        for variant in variants:
            row = {"bench": "d2d_ce fwd+bwd", "variant": variant, "n_local": n_local, "n_global": n_global,
                   "d": d, "dtype": str(dtype).replace("torch.", "")}
            try:
                fn = make(variant)
                row["median_ms"] = median_ms(fn, device)
                row["peak_extra_mb"] = peak_extra_mb(fn, device)
                prof = launch_profile(fn, device)
                row["launches"] = prof.get("count")
                if variant in TRITON_MODES and prof:  # where its device time goes, kernel by kernel
                    row["kernels"] = prof["top"]
            except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. the broadcast's N x M x d OOM
                row["error"] = str(e).splitlines()[0][:120]
            if variant != "studiogan_broadcast" and "error" not in row:  # it syncs with the host: not capturable
                try:
                    row["graph_ms"] = graph_ms(fn, device)
                except RuntimeError as e:
                    row["graph_error"] = str(e).splitlines()[0][:120]
            rows.append(row)
            cols.grad = proxy.grad = None
    return rows


def _sn_inputs(device: torch.device, shapes: Sequence[Tuple[int, int]], dtype: torch.dtype
               ) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.Generator]:
    """(weights scaled to sigma ~ 1, unit u vectors, the generator for more) of the SN benchmarks, seeded."""
    g = torch.Generator(device=device).manual_seed(0)
    ws = [torch.randn(*s, device=device, dtype=dtype, generator=g).div_(s[1] ** 0.5) for s in shapes]
    us = [F.normalize(torch.randn(s[0], device=device, generator=g), dim=0) for s in shapes]
    return ws, us, g


def bench_sn(device: torch.device, shapes: Sequence[Tuple[int, int]], variants: Sequence[str],
             dtype: torch.dtype = torch.float32) -> List[Dict]:
    """Power iteration + sigma + its backward for every SN matrix of a network, per training step. Variants:
    "torch_loop" (per layer), "foreach", "triton_fused"; and the whole per-forward job, W / sigma in bf16 (what
    layers under bf16 autocast take) and its backward: "normalize_loop", "normalize_foreach", "normalize_triton"."""
    ws, us, g = _sn_inputs(device, shapes, dtype)
    ws = [w.requires_grad_() for w in ws]
    coef = torch.randn(len(shapes), device=device, generator=g)
    rows = []
    grads = [torch.randn(*s, device=device, generator=g).to(torch.bfloat16) for s in shapes]
    for variant in variants:
        backend = {"triton_fused": "triton", "foreach": "foreach", "normalize_triton": "triton",
                   "normalize_foreach": "foreach"}.get(variant, "torch")

        def step() -> None:
            for w in ws:  # as the optimizer's zero_grad does: no gradient accumulation in the timing
                w.grad = None
            if variant.startswith("normalize"):
                normalized = spectral_normalize(ws, us, 1, backend=backend, out_dtype=torch.bfloat16)[0]
                torch.autograd.backward(normalized, grads)
                return
            sigmas, _, _ = sn_power_iteration(ws, us, 1, backend=backend)
            (sigmas * coef).sum().backward()
        row = {"bench": "spectral norm, all layers", "variant": variant, "layers": len(shapes),
               "params_m": round(sum(r * c for r, c in shapes) / 1e6, 2), "dtype": str(dtype).replace("torch.", "")}
        row["median_ms"] = median_ms(step, device)
        prof = launch_profile(step, device)
        row["launches"] = prof.get("count")
        if "triton" in variant:
            row["kernels"] = prof.get("top")  # where its device time goes, kernel by kernel
        try:
            row["graph_ms"] = graph_ms(step, device)
        except RuntimeError as e:
            row["graph_error"] = str(e).splitlines()[0][:120]
        rows.append(row)
        for w in ws:
            w.grad = None
    return rows


def sn_tile_candidates(device: torch.device) -> List[Any]:
    """Tile configurations for ``bench_sn_tiles``: the default first, then shorter v-pass row chunks, taller,
    wider, more warps, shorter u-pass chunks (on a CPU, two small ones: the interpreter only checks that the sweep
    runs). Stages are not swept: Triton 3.6 pipelines no load that feeds no dot, so they change nothing here."""
    from kernels.spectral_norm_triton import GPU_TILES, INTERPRETER_TILES, Tiles
    if device.type != "cuda":
        return [INTERPRETER_TILES, Tiles(16, 32, 64, 4, 1, 32)]
    return [GPU_TILES, Tiles(32, 128, 4096, rch=1024), Tiles(64, 128, 4096, 8, 3), Tiles(16, 256, 4096, 4, 3),
            Tiles(8, 512, 4096, 4, 3), Tiles(32, 256, 4096, 8, 3), Tiles(32, 128, 2048, 4, 3),
            Tiles(64, 64, 4096, 4, 3)]


def bench_sn_tiles(device: torch.device, shapes: Sequence[Tuple[int, int]], candidates: Sequence[Any],
                   deadline: Optional[float] = None, dtype: torch.dtype = torch.float32) -> List[Dict]:
    """The Triton power iteration of every matrix (the v and u passes: the part of the W / sigma job furthest from
    its floor on the H100 and H200) under each tile configuration: device time (CUDA-graph replay; a wall median
    on a CPU), the bandwidth at which it reads the weights (twice), each pass's device time (profiler, on a GPU),
    and sigma's largest relative difference from the first candidate's (summation order only). Candidates left when
    ``deadline`` (time.time()) passes are reported as skipped."""
    from kernels.spectral_norm_triton import fused_power_iteration
    ws, us, _ = _sn_inputs(device, shapes, dtype)
    read = 2 * sum(r * c for r, c in shapes) * ws[0].element_size()
    rows: List[Dict] = []
    ref = None
    for tiles in candidates:
        row: Dict[str, Any] = {"bench": "SN power iteration, tiles", "tiles": tiles._asdict()}
        if deadline is not None and time.time() > deadline:
            rows.append(dict(row, skipped="out of time"))
            continue
        fn = lambda: fused_power_iteration(ws, us, 1, 1e-12, tiles)  # noqa: E731
        sigma = fn()[0]
        ref = sigma if ref is None else ref
        row["sigma_max_rel_diff"] = float(((sigma - ref).abs() / ref.abs()).max())
        ms = graph_ms(fn, device) if device.type == "cuda" else median_ms(fn, device, reps=2)
        row.update(ms=ms, read_tb_per_s=read / (ms * 1e-3) / 1e12)
        prof = launch_profile(fn, device)  # each pass on its own: which one a tiling helps
        row.update({f"{name[:-len('_kernel')]}_ms": t for name, t, _ in prof.get("top", ())
                    if name in ("sn_v_kernel", "sn_u_kernel")})
        rows.append(row)
    return rows


def print_table(rows: List[Dict]) -> None:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys))
