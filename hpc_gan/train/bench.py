"""``hpc-gan bench``: the training step of a config, timed (a benchmark, not a test).

K steps after W warm-up steps: per-phase times (data wait, D forward / backward / optimizer, G forward / backward /
optimizer, EMA), samples/s and images/s per device, achieved TFLOP/s and MFU against the device's peak (FLOPs per
sample from ``hpc-gan info``), peak memory; and, with several ranks, the time of one all-reduce of all gradients
(measured apart: DDP overlaps it with the backward, so inside the step it is not separable). Single process or any
launcher ``hpc-gan train`` accepts. The scaling helper turns bench JSONs of 1, 2, 4 ... nodes into an efficiency table.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.bench import profile_cuda

from hpc_gan.config import Config
from hpc_gan.dist import DistInfo
from hpc_gan.peaks import PEAK_TFLOPS
from hpc_gan.train.inductor_sources import kernel_sources
from hpc_gan.train.timing import PhaseTimer
from hpc_gan.train.trainer import Trainer, resolve_device

HOST_BOUND_BUSY = 0.8  # a step whose kernels keep the GPU busy less than this share of its wall time is host-bound
PHASES = ("data", "d_forward", "d_backward", "d_optimizer", "g_forward", "g_backward", "g_optimizer", "ema")


def device_peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision]
    return None


def _allreduce_ms(trainer: Trainer, reps: int = 5) -> Optional[float]:
    if trainer.world == 1:
        return None
    n = sum(p.numel() for net in (trainer.g.module, trainer.d.module) for p in net.parameters())
    buf = torch.zeros(n, device=trainer.device)
    dist.all_reduce(buf)
    if buf.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(buf)
    if buf.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


class OpCounter(TorchDispatchMode):
    """aten ops dispatched (below autograd: every op a kernel launch would be on a GPU, and then some views)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> int:
    with OpCounter() as counter:
        fn()
    return counter.n


def bench_train(cfg: Config, steps: int = 10, warmup: int = 2, info: Optional[DistInfo] = None,
                peak_tflops: Optional[float] = None,
                progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """One training benchmark. ``progress`` gets the numbers known so far after the warm-up and after the timed
    steps, so a run stopped later (in the profiled step, say) still tells its step time."""
    from hpc_gan.info import model_info
    if warmup < 1 or steps < 1:  # the first step compiles and allocates: it is never timed
        raise ValueError(f"bench_train: warmup ({warmup}) and steps ({steps}) must be at least 1")
    info = info or DistInfo()
    device = resolve_device(cfg.run.device, info)
    t = cfg.train
    flops = model_info(cfg, executed_on=device.type)
    gflop, executed_gflop = flops["gflops_per_sample_iteration"], flops["executed_gflops_per_sample_iteration"]
    peak = peak_tflops or device_peak_tflops(device, t.precision)
    trainer = Trainer(cfg, device, info)
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0 if i == 0 else first
    report = progress or (lambda known: None)
    report({"first_step_seconds": first})
    timer = trainer.timer = PhaseTimer(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    phases, host = timer.totals_ms(), timer.host_ms()
    trainer.timer = None
    samples_s = steps * t.batch_size / wall / info.world            # per device
    tflops = gflop * samples_s / 1e3
    timed = {"first_step_seconds": first, "sec_per_step": wall / steps, "samples_per_s_per_device": samples_s,
             "tflops_per_device": tflops, "mfu": tflops / peak if peak else None,
             # the device's arithmetic as it runs: the fused resampling convolutions execute fewer FLOPs than the
             # model's (BigGAN-128: 334 of 505 GFLOP per sample), SDPA's padded heads more
             "executed_flops_utilization": executed_gflop * samples_s / 1e3 / peak if peak else None,
             "phase_ms_per_step": {p: phases.get(p, 0.0) / steps for p in PHASES},
             "phase_host_ms_per_step": {p: host.get(p, 0.0) / steps for p in PHASES}}
    report(timed)
    # one more step each, after the timed ones. No op count under torch.compile: a TorchDispatchMode makes dynamo
    # give up on the compiled frames for good (measured), and what it would count is not what runs
    ops = None if trainer.compile_mode else count_ops(trainer.train_step)
    # the top 40: past the convolutions, which were the top 12 of the compiled step at 256 (H200, 2026-11-27)
    prof = profile_cuda(trainer.train_step, top=40) if device.type == "cuda" else None
    kernels = prof["count"] if prof else None
    trainer.pop_metrics()
    # what the compiled step's longest fused kernels compute (their names say only their ops): sizes and sources
    inductor = None
    if prof and trainer.compile_mode:
        top = prof["top_by_kind"].get("inductor Triton", [])
        defs = kernel_sources(name for name, _, _ in top)
        inductor = [{"name": name, "ms": ms, "calls": calls, "definitions": defs.get(name, [])}
                    for name, ms, calls in top]
    images_s = samples_s * (2 * t.n_dis + 1)                       # through D: real + fake per D step, fakes in G
    mem = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    return {
        "config": cfg.run.dir, "arch": cfg.model.arch, "resolution": cfg.model.resolution,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world": info.world, "nodes": max(1, info.world // max(1, info.local_world)), "strategy": cfg.dist.strategy,
        "precision": t.precision, "batch_size": t.batch_size, "micro_batch": trainer.plan.micro,
        "accum": trainer.plan.accum,
        "n_dis": t.n_dis, "steps": steps, "warmup": warmup, **timed,
        # the GPU's busy share of a step: kernel time (profiled step) over wall time (timed steps). Phase events
        # cannot tell: a phase's device time includes the gaps in which the GPU waits for the host
        "gpu_busy": prof["device_ms"] / (wall / steps * 1e3) if prof else None,
        "host_bound": prof["device_ms"] < HOST_BOUND_BUSY * wall / steps * 1e3 if prof else None,
        "other_ms_per_step": max(0.0, wall / steps * 1e3 - sum(phases.values()) / steps),
        "aten_ops_per_iteration": ops, "cuda_kernels_per_iteration": kernels,
        "kernel_device_ms_per_iteration": prof["device_ms"] if prof else None,
        "top_kernels": prof["top"] if prof else None, "top_ops": prof["top_ops"] if prof else None,
        "kernel_ms_by_kind": prof["kinds"] if prof else None,
        "top_kernels_by_kind": prof["top_by_kind"] if prof else None,
        "top_op_shapes": prof["top_op_shapes"] if prof else None, "inductor_kernels": inductor,
        # where the host waited for the device in the profiled step (runtime synchronizations and blocking copies,
        # by the op they were called under): at 32 per GPU under CUDA graphs the H200's fifth run spent ~43 ms of
        # host time per 46 ms step for 40 ms of kernels, its phases' host time close to their device time
        "host_wait_ms_per_iteration": prof["host_wait_ms"] if prof else None,
        "host_waits": prof["host_waits"] if prof else None,
        "compile": trainer.compile_mode or "off",
        "allreduce_all_grads_ms": _allreduce_ms(trainer),
        "images_per_s_per_device": images_s, "gflops_per_sample_iteration": gflop,
        "executed_gflops_per_sample_iteration": executed_gflop, "peak_tflops": peak,
        "peak_memory_gib": mem, "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "cpu max rss",
        # reserved counts what CUDA graphs hold: their private pools are filled while they record (a warm-up step),
        # before the peak is reset, and their tensors do not count as allocated after it (H200, 2026-11-27: 2.8 GiB
        # "allocated" for a CUDA-graph step at 256 per GPU against 14.9 compiled)
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30 if device.type == "cuda" else None,
    }


def print_bench(r: Dict[str, Any]) -> None:
    print(f"{r['arch']} {r['resolution']}px on {r['world']} x {r['device']} ({r['strategy']}, {r['precision']}, "
          f"compile {r['compile']}), batch {r['batch_size']} = {r['micro_batch']} x {r['accum']} x {r['world']}: "
          f"{r['sec_per_step'] * 1e3:.1f} ms/step; first step {r['first_step_seconds']:.1f} s")
    gpu = r["host_bound"] is not None
    print(f"  {'phase':<12} {'device ms' if gpu else 'ms':>9}" + (f" {'host ms':>9}" if gpu else ""))
    for p, ms in r["phase_ms_per_step"].items():
        print(f"  {p:<12} {ms:9.2f}" + (f" {r['phase_host_ms_per_step'][p]:9.2f}" if gpu else ""))
    print(f"  {'other':<12} {r['other_ms_per_step']:9.2f}")
    print(f"aten ops/iteration {r['aten_ops_per_iteration'] or 'n/a (compiled)'}"
          + (f" | CUDA kernels/iteration {r['cuda_kernels_per_iteration']} | "
             f"{'host-bound' if r['host_bound'] else 'device-bound'} (GPU busy {100 * r['gpu_busy']:.0f}%)"
             if gpu else ""))
    print(f"samples/s/device {r['samples_per_s_per_device']:.1f} | images/s/device {r['images_per_s_per_device']:.1f}"
          f" | {r['tflops_per_device']:.3f} TFLOP/s/device"
          + (f" | MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f} (executed FLOPs "
             f"{100 * r['executed_flops_utilization']:.1f}%)" if r["mfu"] is not None else " | MFU n/a (no peak)")
          + f" | peak memory {r['peak_memory_gib']:.2f} GiB ({r['peak_memory_kind']})"
          + (f", {r['peak_reserved_gib']:.2f} GiB reserved" if r["peak_reserved_gib"] is not None else ""))


def scaling_table(paths: Sequence[str], out_png: Optional[str] = None) -> List[Dict[str, Any]]:
    """Weak-scaling efficiency of bench JSONs: per-device throughput relative to the smallest run."""
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["world"])
    base = runs[0]["samples_per_s_per_device"]
    rows = [{"world": r["world"], "nodes": r["nodes"],
             "samples_per_s_total": r["samples_per_s_per_device"] * r["world"],
             "samples_per_s_per_device": r["samples_per_s_per_device"],
             "efficiency": r["samples_per_s_per_device"] / base} for r in runs]
    if out_png:
        from hpc_gan.eval.plots import plot_scaling
        plot_scaling(rows, Path(out_png))
    return rows
