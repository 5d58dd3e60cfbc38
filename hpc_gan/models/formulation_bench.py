"""Timing the formulations of one convolution against each other, as the training steps call it: the machinery the
layers benches share (rgb_conv_bench: the RGB convolutions; resample_conv_bench: the resampling ones). A plan
lists each convolution's shapes and the calls a training iteration makes of it (forward alone, or with the input's
and / or the weight's gradient); each formulation is checked against the first (the reference) on the inputs it is
timed on, timed per call, summed per iteration beside the bandwidth floor, and the fastest over a side's
convolutions picked."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

Shape = Tuple[int, ...]
# (side, label, input shape, weight shape, padding, [(calls per iteration, input gradient?, weight gradient?)])
Plan = List[Tuple[str, str, Shape, Shape, int, List[Tuple[int, bool, bool]]]]
ConvFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int], torch.Tensor]  # fn(x, w, b, padding)


def _floor_bytes(xin: int, out: int, input_grad: bool, weight_grad: bool, elem: int) -> int:
    """Bytes a call must move (``xin`` input and ``out`` output elements): forward reads the input and writes the
    output; the input gradient reads the output's gradient and writes the input's; the weight gradient reads the
    input and the output's gradient."""
    return elem * ((xin + out) + (out + xin if input_grad else 0) + (xin + out if weight_grad else 0))


def bench_formulations(op: str, plan: Plan, tables: Dict[str, Dict[str, ConvFn]], device: torch.device,
                       dtype: torch.dtype, time_ms: Callable[[Callable[[], Any]], float], copy_gb_per_s: float,
                       deadline: float, cudnn_benchmark: bool) -> Dict[str, Any]:
    """Every call of ``plan`` ((side, label, input shape, weight shape, padding, uses)) under each formulation of
    its side's table (``time_formulations``), with cuDNN's algorithms chosen as the trainer's are
    (``cudnn_benchmark``: train.cudnn_benchmark): rows, ms per iteration per label, and per side the formulation
    with the least time over all its labels, each of them timed."""
    rows: List[Dict[str, Any]] = []
    per_iteration: Dict[str, Dict[str, float]] = {}
    sides: Dict[str, List[str]] = {side: [] for side in tables}
    with cudnn_benchmark_as(cudnn_benchmark):
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


@contextlib.contextmanager
def cudnn_benchmark_as(on: bool) -> Iterator[None]:
    """cuDNN's benchmark flag set as the trainer sets it, and nothing else. Not ``torch.backends.cudnn.flags``:
    that sets every flag it is not given to its own default, ``enabled=False`` among them, so the H200's fifth run
    timed these convolutions without cuDNN (~10x the step's own convolution times, and the wrong winners)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def time_formulations(op: str, label: str, table: Dict[str, ConvFn], x_shape: Shape, w_shape: Shape, pad: int,
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


def _call(fn: ConvFn, inputs: Tuple[torch.Tensor, ...], pad: int, grad_out: torch.Tensor) -> Callable[[], Any]:
    """One call as a step makes it: forward alone where no input wants a gradient, else forward and the backward
    to exactly those that do (the weight's alone, the input's alone, or both)."""
    wanted = [t for t in inputs if t.requires_grad]
    if wanted:
        return lambda: torch.autograd.grad(fn(*inputs, pad), wanted, grad_out)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return fn(*inputs, pad)
    return forward
