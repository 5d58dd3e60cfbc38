"""Where the host's time goes in one D2D-CE forward + backward on the Triton path (a benchmark, not a test).

The GPU runs found the Triton path host-bound in wall time: 13 launches cost 0.98-1.60 ms of host time for
0.04-0.10 ms of device work (H200, 2026-11-27), ~90 us per launch, where the eager torch reference's 115 launches cost
~28 us each. Whether the cost is Triton's launcher (argument binding and specialization per call), torch's ops
around the kernels, or autograd decides the fix: launching through cached compiled kernels
(kernels.launch.DIRECT), fewer torch ops, or neither. The H200's fifth run (2026-11-28) answered: a launch costs
~23 us through the JIT and 20 through its compiled kernel, an autograd round trip ~180, and the rest is Python and
torch work around the kernels, which ``scripts/host_probe.py`` weighs on any CPU (the GPU's host ran it ~4x slower
than the development machine). Each piece is timed the same way: ``reps`` calls queued back
to back with no synchronization inside the timed loop, so that on a GPU, where each piece's device work is shorter
than its launch, the loop's time is the host's alone (fewer than the launch queue's ~1,000 entries, so the host
never waits on it). On a CPU the kernels run in Triton's interpreter and the numbers mean nothing; the smoke run
only keeps this working.
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import kernels.launch
from kernels.bench import d2d_inputs
from kernels.launch import cdiv, launch
from kernels.similarity import d2d_ce


def host_us(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Microseconds of host time per call of fn: ``reps`` calls queued without a synchronization, after one warm-up
    call (compiling, autotuning, the allocator's first blocks)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    took = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return took / reps * 1e6


def direct_us(fn: Callable[[], object], device: torch.device, reps: int) -> Optional[float]:
    """host_us of fn with kernels.launch.DIRECT on (its Triton kernels launched through their compiled kernels);
    None where it does not apply (the interpreter)."""
    if device.type != "cuda":
        return None
    kernels.launch.DIRECT = True
    try:
        return host_us(fn, device, reps)
    finally:
        kernels.launch.DIRECT = False


Spent = Tuple[str, float, float]  # (function or op, calls per call of the profiled function, self host us per call)


def host_profile(fn: Callable[[], object], device: torch.device, reps: int, top: int = 20) -> List[Spent]:
    """Where fn's host time goes, by function: torch's profiler over ``reps`` calls (after one warm-up) with Python
    stacks, each event's self CPU time summed per name. Its Python tracer registers with every thread the
    interpreter knows when it starts (another thread's frames show: tested), which should take in the thread
    autograd runs a CUDA backward on (cProfile sees the calling thread alone); a GPU profile without the backward's
    own frames would say it did not. Other threads' time is in it too (a waiting thread's ``wait``).
    Returns [(name, calls per call of fn, self us per call of fn)], the largest ``top``. The profiler's own cost
    inflates every entry; the shares are what to read. Python frames are named by their file's last two path parts,
    line and function (e.g. "kernels/similarity_triton.py(570): backward")."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals: Dict[str, List[float]] = {}
    for event in prof.events():
        entry = totals.setdefault(_short_frame(event.name), [0, 0.0])
        entry[0] += 1
        entry[1] += event.self_cpu_time_total
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return [(name, round(calls / reps, 2), round(us / reps, 1)) for name, (calls, us) in ranked]


def _short_frame(name: str) -> str:
    """A Python frame's event name ("/a/b/c/file.py(12): fn") by its file's last two path parts; a built-in's
    without its object's address; others as they are."""
    path, sep, rest = name.partition("(")
    if not sep or not path.endswith(".py"):
        return re.sub(r" at 0x[0-9a-f]+>$", ">", name)
    return "/".join(path.split("/")[-2:]) + sep + rest


class IdentityFunction(torch.autograd.Function):
    """The least a custom autograd function costs: a forward and a backward that return their input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g


def d2d_host_costs(device: torch.device, n: int, m: int, d: int, dtype: torch.dtype, reps: int = 50,
                   direct: bool = False) -> Dict[str, Any]:
    """Host us per call of the Triton path's D2D-CE forward + backward (as the kernels stage times it: a slice of
    the columns as the rows, the rest gathered), its forward alone, one Triton launch through the JIT, and the torch
    pieces around them: one torch.mm of the forward's size, one torch.empty, and an identity autograd function's
    forward and a backward through it (with the sum that makes it a scalar); and the forward + backward's
    ``host_profile`` (``profile``). ``direct``: instead, the forward +
    backward and the one launch with kernels.launch.DIRECT on (through the compiled kernels; None off CUDA), kept
    apart so that a caller can run them last (a direct launch has not yet run on a GPU)."""
    from kernels.similarity_triton import NORM_EPS, inv_norms_kernel, scan_tiles
    cols, col_labels, proxy, offset = d2d_inputs(device, n, m, d, dtype)
    labels = col_labels[offset:offset + n]

    def loss() -> torch.Tensor:
        return d2d_ce(cols[offset:offset + n], proxy, labels, 0.5, 0.98, backend="triton",
                      negatives=(cols, col_labels), row_offset=offset)

    def forward_backward() -> None:
        cols.grad = proxy.grad = None
        loss().backward()

    tiles = scan_tiles(device)
    norms = torch.empty(m, device=device, dtype=torch.float32)
    args, consts = (cols.detach(), norms, m, d, NORM_EPS), dict(BR=tiles["BR"], BD=tiles["BD"])
    grid = (cdiv(m, tiles["BR"]),)

    def one_launch() -> None:
        launch(inv_norms_kernel, grid, *args, **consts)

    if direct:
        return {"forward_backward_direct_us": direct_us(forward_backward, device, reps),
                "direct_launch_us": direct_us(one_launch, device, 4 * reps)}
    x = torch.zeros(4, device=device, requires_grad=True)
    a, b = cols.detach()[:n], cols.detach()
    return {"shape": [n, m, d], "dtype": str(dtype).replace("torch.", ""), "reps": reps,
            "forward_backward_us": host_us(forward_backward, device, reps),
            "forward_us": host_us(lambda: loss(), device, reps),
            "jit_launch_us": host_us(one_launch, device, 4 * reps),
            "torch_mm_us": host_us(lambda: torch.mm(a, b.t()), device, 4 * reps),
            "torch_empty_us": host_us(lambda: torch.empty(n, m, device=device), device, 4 * reps),
            "autograd_function_us": host_us(lambda: IdentityFunction.apply(x).sum().backward(), device, 4 * reps),
            "profile": host_profile(forward_backward, device, max(1, reps // 5))}
