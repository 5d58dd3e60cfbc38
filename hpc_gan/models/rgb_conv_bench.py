"""The convolutions that touch RGB (D's first block reads 3 channels, G's output writes 3) at a config's own shapes:
cuDNN as the models run it and candidate formulations, timed with the backward each training step asks of them and
summed to device ms per training iteration beside the bandwidth floor. The GPU check pack's ``layers`` stage runs it.

Why: on the H200 (2026-11-27, BigGAN-128, bf16, channels-last, 256 per GPU) two forward kernels that run 3 times
an iteration stood out, a CUTLASS fprop at ~2 ms a call (D's 3 -> 96 input convolution, after cuDNN pads the 3
channels to 8) and an sm80 fprop with a 32-wide tile at ~0.9 ms a call (G's 96 -> 3 output convolution): ~9 ms
of forward alone, where their bytes take under 2. Which calls they are is inferred from the kernels' names and counts;
this bench measures them. A candidate that wins here is a model switch to add, then a step to time.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hpc_gan.models.build import build_discriminator, build_generator

Shape = Tuple[int, ...]
Conv = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int], torch.Tensor]
ALIGN = 8  # channels that cuDNN's and cuBLAS's bf16 tensor-core kernels take whole (16 bytes)


def conv_cudnn(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], padding: int) -> torch.Tensor:
    """The reference: what the models run (channels-last in, channels-last out on CUDA)."""
    return F.conv2d(x, w, b, padding=padding)


def conv_nchw(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], padding: int) -> torch.Tensor:
    """The convolution in NCHW (cuDNN's other kernels; no channel padding), its output back to channels-last."""
    return F.conv2d(x.contiguous(), w, b, padding=padding).contiguous(memory_format=torch.channels_last)


def conv_unfold_mm(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], padding: int) -> torch.Tensor:
    """im2col and one batched matrix product whose output is already NHWC: for few input channels (3 x 3 x 3 = 27
    products per output) the GEMM's K is small and its output, written once, is most of the bytes."""
    n, _, h, wd = x.shape
    cout, _, kh, kw = w.shape
    cols = F.unfold(x, (kh, kw), padding=padding).transpose(1, 2)  # (N, L, C kh kw), L: output pixels
    wt = w.reshape(cout, -1).t().expand(n, -1, -1)
    out = torch.bmm(cols, wt) if b is None else torch.baddbmm(b, cols, wt)  # (N, L, cout): NHWC; bias fused
    ho, wo = h + 2 * padding - kh + 1, wd + 2 * padding - kw + 1
    return out.view(n, ho, wo, cout).permute(0, 3, 1, 2)  # a channels-last view


def conv_pad_out(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], padding: int) -> torch.Tensor:
    """Output channels padded with zero filters to a multiple of ALIGN, the padding sliced off: for 3 outputs,
    cuDNN's full-width tiles in place of a narrow one."""
    cout = w.shape[0]
    extra = -cout % ALIGN
    wp = torch.cat([w, w.new_zeros(extra, *w.shape[1:])]) if extra else w
    bp = torch.cat([b, b.new_zeros(extra)]) if b is not None and extra else b
    return F.conv2d(x, wp, bp, padding=padding)[:, :cout]


# name -> (function, applies to (cin, cout, kernel size))
RGB_CONVS: Dict[str, Tuple[Conv, Callable[[int, int, int], bool]]] = {
    "cudnn": (conv_cudnn, lambda cin, cout, k: True),
    "nchw": (conv_nchw, lambda cin, cout, k: True),
    "unfold_mm": (conv_unfold_mm, lambda cin, cout, k: cin * k * k <= 64),  # im2col of wide inputs: k^2 x bytes
    "pad_out": (conv_pad_out, lambda cin, cout, k: cout % ALIGN != 0),
}


def rgb_conv_shapes(cfg: Any, batch: int) -> Dict[str, List[Tuple[Shape, Shape, int]]]:
    """{"G": ..., "D": ...}: (input shape, weight shape, padding) of each network's convolutions that read or write
    3 channels, in one forward on ``batch`` samples, recorded on the meta device."""
    found: Dict[str, List[Tuple[Shape, Shape, int]]] = {"G": [], "D": []}
    n = cfg.data.num_classes
    with torch.device("meta"):
        G, D = build_generator(cfg.model, n), build_discriminator(cfg.model, n, cfg.loss.cond)
        for name, net in (("G", G), ("D", D)):
            for m in net.modules():
                if isinstance(m, nn.Conv2d) and 3 in (m.in_channels, m.out_channels):
                    m.register_forward_pre_hook(lambda mod, args, name=name: found[name].append(
                        (tuple(args[0].shape), tuple(mod.weight.shape), int(mod.padding[0]))))
        z, y = torch.randn(batch, cfg.model.z_dim), torch.zeros(batch, dtype=torch.long)
        with torch.no_grad():
            D(G(z, y), y)
    return found


def _plan(cfg: Any, batch: int) -> List[Tuple[str, Shape, Shape, int, List[Tuple[float, bool, bool]]]]:
    """(label, input shape, weight shape, padding, [(calls per iteration, input grad?, weight grad?)]): each D step
    runs D on the joined real + fake batch (2 x ``batch``) with weight gradients only (its inputs need none); the G
    step runs D on ``batch`` with the input gradient only (D is frozen); G runs forward in each D step and forward
    + both gradients in the G step."""
    n_dis, plan = cfg.train.n_dis, []
    recorded = rgb_conv_shapes(cfg, batch)
    for x, w, p in recorded["D"]:
        label = f"D {w[1]}->{w[0]} k{w[2]} at {x[2]}"
        plan.append((label, (2 * x[0], *x[1:]), w, p, [(n_dis, False, True)]))
        plan.append((label, x, w, p, [(1, True, False)]))
    for x, w, p in recorded["G"]:
        plan.append((f"G {w[1]}->{w[0]} k{w[2]} at {x[2]}", x, w, p, [(n_dis, False, False), (1, True, True)]))
    return plan


def _floor_bytes(x: Shape, w: Shape, input_grad: bool, weight_grad: bool, elem: int) -> int:
    """Bytes a call must move: forward reads the input and writes the output; the input gradient reads the output's
    gradient and writes the input's; the weight gradient reads the input and the output's gradient."""
    n, _, h, wd = x
    xin, out = math.prod(x), n * w[0] * h * wd  # same-size outputs (stride 1, "same" padding)
    return elem * ((xin + out) + (out + xin if input_grad else 0) + (xin + out if weight_grad else 0))


def bench_rgb_convs(cfg: Any, batch: int, device: torch.device, dtype: torch.dtype,
                    time_ms: Callable[[Callable[[], Any]], float], copy_gb_per_s: float,
                    deadline: float = float("inf")) -> Dict[str, Any]:
    """Per RGB convolution and formulation (``RGB_CONVS``, where it applies): ms per call as each training step
    calls it, summed per iteration at ``cfg.train.n_dis`` beside the floor (each byte once at ``copy_gb_per_s``),
    and the fastest. Every formulation's output is checked against cuDNN's on the inputs it is timed on. Past
    ``deadline`` (time.time()) the rest is skipped: a formulation with a call left out gets no total."""
    rows: List[Dict[str, Any]] = []
    per_iteration: Dict[str, Dict[str, float]] = {}
    with torch.backends.cudnn.flags(benchmark=cfg.train.cudnn_benchmark):  # the algorithms the trainer's get
        for label, x_shape, w_shape, pad, uses in _plan(cfg, batch):
            _time_conv(label, x_shape, w_shape, pad, uses, device, dtype, time_ms, copy_gb_per_s, deadline, rows,
                       per_iteration.setdefault(label, {"floor_ms": 0.0}))
    best = {k: min((i for i in v if i != "floor_ms"), key=v.get) for k, v in per_iteration.items() if len(v) > 1}
    return {"rows": rows, "ms_per_iteration": per_iteration, "best": best}


def _time_conv(label: str, x_shape: Shape, w_shape: Shape, pad: int, uses: List[Tuple[float, bool, bool]],
               device: torch.device, dtype: torch.dtype, time_ms: Callable[[Callable[[], Any]], float],
               copy_gb_per_s: float, deadline: float, rows: List[Dict[str, Any]], totals: Dict[str, float]) -> None:
    """One convolution's calls under every formulation that applies, into ``rows`` and ``totals`` (see
    bench_rgb_convs)."""
    for calls, ig, wg in uses:
        totals["floor_ms"] += calls * _floor_bytes(x_shape, w_shape, ig, wg, dtype.itemsize) / (
            copy_gb_per_s * 1e9) * 1e3
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(x_shape, device=device, dtype=dtype, generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(w_shape, device=device, dtype=dtype, generator=g) / math.sqrt(math.prod(w_shape[1:])))
    b = torch.randn(w_shape[0], device=device, dtype=dtype, generator=g)
    ref = conv_cudnn(x, w, b, pad)
    grad_out = torch.randn_like(ref)
    for impl, (fn, applies) in RGB_CONVS.items():
        if not applies(w_shape[1], w_shape[0], w_shape[2]):
            continue
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
            rows.append({"op": "rgb_conv", "conv": label, "impl": impl, "input": list(x_shape), "input_grad": ig,
                         "weight_grad": wg, "calls_per_iteration": calls, "ms": ms, "rel_error": err})
            totals[impl] = totals.get(impl, 0.0) + calls * ms


def _call(fn: Conv, inputs: Tuple[torch.Tensor, ...], pad: int, grad_out: torch.Tensor) -> Callable[[], Any]:
    """One call as a step makes it: forward alone where no input wants a gradient, else forward and the backward
    to exactly those that do (the weight's alone, the input's alone, or both)."""
    wanted = [t for t in inputs if t.requires_grad]
    if wanted:
        return lambda: torch.autograd.grad(fn(*inputs, pad), wanted, grad_out)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return fn(*inputs, pad)
    return forward
