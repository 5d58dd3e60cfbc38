"""D's 2x2 poolings and G's 2x upsamplings at a config's own shapes: every implementation (``model.pool_impl``,
``model.upsample_impl``) timed forward and forward + backward, and summed to device ms per training iteration
beside the bandwidth floor. The GPU check pack's ``layers`` stage runs it, so that these defaults follow a
measurement: on the first H100 run, channels-last, torch's avg_pool2d backward alone took 110 ms of a 725 ms step.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hpc_gan.models.build import forward_on_meta
from hpc_gan.models.layers import POOLS, UPSAMPLES

Shape = Tuple[int, ...]


class _Record(TorchFunctionMode):
    """The input shapes of the reference pool (F.avg_pool2d) and upsampling (F.interpolate), in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: Dict[str, List[Shape]] = {"pool": [], "upsample": []}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if func is F.interpolate:
            self.shapes["upsample"].append(tuple(args[0].shape))
        elif getattr(func, "__name__", "") == "avg_pool2d":
            self.shapes["pool"].append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def resample_shapes(cfg: Any, batch: int) -> Dict[str, List[Shape]]:
    """{"pool": D's pooling inputs, "upsample": G's upsampling inputs} for one forward of each network on
    ``batch`` samples, recorded on the meta device through the reference implementations."""
    rec = _Record()
    forward_on_meta(cfg, batch, dataclasses.replace(cfg.model, pool_impl="avg_pool2d", upsample_impl="interpolate"),
                    during=lambda: rec)
    return rec.shapes


def _bytes(kind: str, shape: Shape, elem: int) -> int:
    """Bytes one direction must move (the same both ways): the full-size side once, the quarter-size side once."""
    full = math.prod(shape) * (4 if kind == "upsample" else 1)  # the upsampling's output is 4x its input
    return (full + full // 4) * elem


def bench_resampling(cfg: Any, batch: int, device: torch.device, dtype: torch.dtype,
                     time_ms: Callable[[Callable[[], Any]], float], copy_gb_per_s: float,
                     deadline: float = float("inf")) -> Dict[str, Any]:
    """Per implementation: ms forward and forward + backward per shape, and per training iteration at
    ``cfg.train.n_dis``: each D step pools a joined real + fake batch (2 x ``batch``) forward and backward, the G
    step's D half of that (its backward to the input is the same kernel); G upsamples forward in every step and
    backward in the G step. The floor moves each byte once at ``copy_gb_per_s``. Past ``deadline`` (time.time())
    the rest is skipped: an implementation with a shape left out gets no per-iteration total."""
    n_dis = cfg.train.n_dis
    recorded = resample_shapes(cfg, batch)  # built once (seconds on the meta device); D's batch is joined: 2x
    plans = {"pool": (POOLS, [(2 * s[0], *s[1:]) for s in recorded["pool"]], (n_dis + 0.5, n_dis + 0.5)),
             "upsample": (UPSAMPLES, recorded["upsample"], (n_dis + 1.0, 1.0))}
    rows: List[Dict[str, Any]] = []
    per_iteration: Dict[str, Dict[str, float]] = {}
    for kind, (impls, shapes, (fwd_per_it, bwd_per_it)) in plans.items():
        counts = collections.Counter(shapes)
        moved = sum(c * (fwd_per_it + bwd_per_it) * _bytes(kind, s, dtype.itemsize) for s, c in counts.items())
        per_iteration[kind] = {"floor_ms": moved / (copy_gb_per_s * 1e9) * 1e3}
        for impl, fn in impls.items():
            total = 0.0
            for shape, count in counts.items():
                if time.time() > deadline:
                    break
                x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
                xg = x.detach().requires_grad_()
                g = torch.randn_like(fn(x))
                fwd = time_ms(lambda: fn(x))
                both = time_ms(lambda: torch.autograd.grad(fn(xg), xg, g))
                rows.append({"op": kind, "impl": impl, "shape": list(shape), "calls_per_forward": count,
                             "forward_ms": fwd, "forward_backward_ms": both})
                total += count * (fwd_per_it * fwd + bwd_per_it * max(both - fwd, 0.0))
            else:  # every shape timed
                per_iteration[kind][impl] = total
    best = {k: min((i for i in v if i != "floor_ms"), key=v.get) for k, v in per_iteration.items() if len(v) > 1}
    return {"rows": rows, "ms_per_iteration": per_iteration, "best": best}
