"""The convolutions that touch RGB (D's first block reads 3 channels, G's output writes 3) at a config's own shapes:
every formulation of ``model.d_rgb_conv_impl`` and ``model.g_rgb_conv_impl`` (hpc_gan.models.rgb_conv), timed with
the backward each training step asks of them and summed to device ms per training iteration beside the bandwidth
floor. The GPU check pack's ``layers`` stage runs it.

Why: on the H200 (2026-11-27, BigGAN-128, bf16, channels-last, 256 per GPU) two forward kernels that run 3 times
an iteration stood out, a CUTLASS fprop at ~2 ms a call (D's 3 -> 96 input convolution, after cuDNN pads the 3
channels to 8) and an sm80 fprop with a 32-wide tile at ~0.9 ms a call (G's 96 -> 3 output convolution): ~9 ms
of forward alone, where their bytes take under 2. Which calls they are is inferred from the kernels' names and
counts; this bench measures them, and the check pack's ``eager fastest layers`` train case runs the winners in a
step.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from hpc_gan.models.build import forward_on_meta
from hpc_gan.models.rgb_conv import D_RGB_CONVS, G_RGB_CONVS, RgbConv, rgb_convs

Shape = Tuple[int, ...]
# (side, label, input shape, weight shape, padding, [(calls per iteration, input gradient?, weight gradient?)])
Plan = List[Tuple[str, str, Shape, Shape, int, List[Tuple[int, bool, bool]]]]


def rgb_conv_shapes(cfg: Any, batch: int) -> Dict[str, List[Tuple[Shape, Shape, int]]]:
    """{"G": ..., "D": ...}: (input shape, weight shape, padding) of each network's convolutions that read or write
    3 channels, in one forward on ``batch`` samples, recorded on the meta device."""
    found: Dict[str, List[Tuple[Shape, Shape, int]]] = {"G": [], "D": []}

    def hook(name: str, net: nn.Module) -> None:
        for conv in rgb_convs(net, "out" if name == "G" else "in"):
            conv.register_forward_pre_hook(lambda mod, args: found[name].append(
                (tuple(args[0].shape), tuple(mod.weight.shape), int(mod.padding[0]))))
    forward_on_meta(cfg, batch, dataclasses.replace(cfg.model, d_rgb_conv_impl="conv2d", g_rgb_conv_impl="conv2d"),
                    hook)
    return found


def _plan(cfg: Any, batch: int) -> Plan:
    """(side "d" or "g", label, input shape, weight shape, padding, [(calls per iteration, input grad?, weight
    grad?)]): each D step runs D on the joined real + fake batch (2 x ``batch``) with weight gradients only (its
    inputs need none); the G step runs D on ``batch`` with the input gradient only (D is frozen); G runs forward in
    each D step and forward + both gradients in the G step."""
    n_dis, plan = cfg.train.n_dis, []
    recorded = rgb_conv_shapes(cfg, batch)
    for x, w, p in recorded["D"]:
        label = f"D {w[1]}->{w[0]} k{w[2]} at {x[2]}"
        plan.append(("d", label, (2 * x[0], *x[1:]), w, p, [(n_dis, False, True)]))
        plan.append(("d", label, x, w, p, [(1, True, False)]))
    for x, w, p in recorded["G"]:
        plan.append(("g", f"G {w[1]}->{w[0]} k{w[2]} at {x[2]}", x, w, p, [(n_dis, False, False), (1, True, True)]))
    return plan


def _floor_bytes(xin: int, out: int, input_grad: bool, weight_grad: bool, elem: int) -> int:
    """Bytes a call must move (``xin`` input and ``out`` output elements): forward reads the input and writes the
    output; the input gradient reads the output's gradient and writes the input's; the weight gradient reads the
    input and the output's gradient."""
    return elem * ((xin + out) + (out + xin if input_grad else 0) + (xin + out if weight_grad else 0))


def bench_rgb_convs(cfg: Any, batch: int, device: torch.device, dtype: torch.dtype,
                    time_ms: Callable[[Callable[[], Any]], float], copy_gb_per_s: float,
                    deadline: float = float("inf")) -> Dict[str, Any]:
    """Per RGB convolution and formulation of its side (D's ``D_RGB_CONVS``, G's ``G_RGB_CONVS``): ms per call as
    each training step calls it, summed per iteration at ``cfg.train.n_dis`` beside the floor (each byte once at
    ``copy_gb_per_s``); and per side ("d", "g") the fastest over all its convolutions. Every formulation's output is
    checked against ``conv2d``'s on the inputs it is timed on (``rel_error``). Past ``deadline`` (time.time()) the
    rest is skipped: a formulation with a call left out gets no total."""
    with torch.backends.cudnn.flags(benchmark=cfg.train.cudnn_benchmark):  # the algorithms the trainer's get
        return bench_formulations("rgb_conv", _plan(cfg, batch), {"d": D_RGB_CONVS, "g": G_RGB_CONVS}, device,
                                  dtype, time_ms, copy_gb_per_s, deadline)


def bench_formulations(op: str, plan: Plan, tables: Dict[str, Dict[str, RgbConv]], device: torch.device,
                       dtype: torch.dtype, time_ms: Callable[[Callable[[], Any]], float], copy_gb_per_s: float,
                       deadline: float) -> Dict[str, Any]:
    """Every call of ``plan`` ((side, label, input shape, weight shape, padding, uses)) under each formulation of
    its side's table (``time_formulations``): rows, ms per iteration per label, and per side the formulation with
    the least time over all its labels, each of them timed."""
    rows: List[Dict[str, Any]] = []
    per_iteration: Dict[str, Dict[str, float]] = {}
    sides: Dict[str, List[str]] = {side: [] for side in tables}
    for side, label, x_shape, w_shape, pad, uses in plan:
        sides[side] += [label] if label not in sides[side] else []
        totals = per_iteration.setdefault(label, {"floor_ms": 0.0})
        time_formulations(op, label, tables[side], x_shape, w_shape, pad, uses, device, dtype, time_ms,
                          copy_gb_per_s, deadline, rows, totals)
    best = {}
    for side, labels in sides.items():
        impls = [i for i in tables[side] if labels and all(i in per_iteration[label] for label in labels)]
        if impls:
            best[side] = min(impls, key=lambda i: sum(per_iteration[label][i] for label in labels))
    return {"rows": rows, "ms_per_iteration": per_iteration, "best": best}


def time_formulations(op: str, label: str, table: Dict[str, RgbConv], x_shape: Shape, w_shape: Shape, pad: int,
                      uses: List[Tuple[int, bool, bool]],
                      device: torch.device, dtype: torch.dtype, time_ms: Callable[[Callable[[], Any]], float],
                      copy_gb_per_s: float, deadline: float, rows: List[Dict[str, Any]],
                      totals: Dict[str, float]) -> None:
    """One convolution's calls (``uses``: (calls per iteration, input gradient?, weight gradient?)) under every
    formulation in ``table`` (fn(x, w, b, padding); the first is the reference, which the others' outputs are
    checked against: ``rel_error``), into ``rows`` (tagged ``op``) and ``totals`` (ms per iteration, and the
    floor: each byte of the input and the reference's output once at ``copy_gb_per_s``)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(x_shape, device=device, dtype=dtype, generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(w_shape, device=device, dtype=dtype, generator=g) / math.sqrt(math.prod(w_shape[1:])))
    b = torch.randn(w_shape[0], device=device, dtype=dtype, generator=g)
    ref = next(iter(table.values()))(x, w, b, pad)
    for calls, ig, wg in uses:
        totals["floor_ms"] += calls * _floor_bytes(x.numel(), ref.numel(), ig, wg, dtype.itemsize) / (
            copy_gb_per_s * 1e9) * 1e3
    grad_out = torch.randn_like(ref)
    for impl, fn in table.items():
        with torch.no_grad():
            err = ((fn(x, w, b, pad).float() - ref.float()).norm() / ref.float().norm()).item()
        for calls, ig, wg in uses:
            if time.time() > deadline:
                totals.pop(impl, None)
                break
            xg = x.detach().requires_grad_(ig)
            wgt, bg = w.detach().requires_grad_(wg), b.detach().requires_grad_(wg)
            run = _call(fn, (xg, wgt, bg), pad, grad_out)
            run()  # once untimed: cuDNN's algorithm search, workspaces
            ms = time_ms(run)
            rows.append({"op": op, "conv": label, "impl": impl, "input": list(x_shape), "input_grad": ig,
                         "weight_grad": wg, "calls_per_iteration": calls, "ms": ms, "rel_error": err})
            totals[impl] = totals.get(impl, 0.0) + calls * ms


def _call(fn: RgbConv, inputs: Tuple[torch.Tensor, ...], pad: int, grad_out: torch.Tensor) -> Callable[[], Any]:
    """One call as a step makes it: forward alone where no input wants a gradient, else forward and the backward
    to exactly those that do (the weight's alone, the input's alone, or both)."""
    wanted = [t for t in inputs if t.requires_grad]
    if wanted:
        return lambda: torch.autograd.grad(fn(*inputs, pad), wanted, grad_out)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return fn(*inputs, pad)
    return forward
