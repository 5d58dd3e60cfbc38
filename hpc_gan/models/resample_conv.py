"""The 2x resamplings of BigGAN's blocks folded into the 3x3 convolution beside them (``model.g_upconv_impl``,
``model.d_downconv_impl``): the same functions in 4/9 of the multiply-adds, and without the full-resolution tensor
between the two.

- G: conv3x3(upsample2x(x)). Nearest upsampling repeats each pixel in a 2x2 block, so each of the four output
  phases (even/odd row, even/odd column) is a 2x2 convolution of x whose taps are sums of the 3x3 kernel's: for the
  even rows, tap rows (w0, w1 + w2) at offsets (-1, 0); for the odd rows, (w0 + w1, w2) at (0, +1); the same along
  the columns. One 2x2 convolution with 4 x C_out outputs over x padded by 1 computes all four phases on an
  (H+1) x (W+1) grid; phase (a, b) is that grid shifted by (a, b), interleaved into the 2H x 2W output.
  16 taps per input pixel against 36 (4 output pixels x 9). Or ("transposed") one transposed convolution, stride 2,
  padding 1, whose 4x4 kernel holds the same summed taps flipped (tap k along an axis: w2, w1 + w2, w0 + w1, w0):
  the same 16 taps per input pixel, written straight to the 2H x 2W output, with no wider grid and no interleave;
  cuDNN runs it as a strided convolution's data gradient.
- D: avg_pool2x2(conv3x3(x)). The mean of the four 3x3 windows of a 2x2 block is one 4x4 window, stride 2, whose
  taps are the 3x3 kernel's summed over the block's offsets and divided by 4: 16 taps per output against 36.
  Padding 1 and a 2-stride keep the borders and the trailing odd row that pooling drops exactly as they were.
  With it, D's pre-activation shortcut pools before its 1x1 convolution (4x fewer products; the two are linear,
  so they commute).

Every equality above is exact in real arithmetic; in floating point the sums of taps round once more (tests:
float64 against the separate ops, and each network against its reference in fp32 and bf16). "separate" is the
reference; "auto" takes ``AUTO`` per side and device type.
"""
from __future__ import annotations

import typing
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpc_gan.config import DownConvImpl, UpConvImpl
from hpc_gan.models.layers import SpectralNormMixin, is_channels_last

# "auto" per side ("up": G's upsampling convolutions, "down": D's pooled ones) and device type: the 2-core CPU
# measured the fused forms faster (docs/benchmarks.md); on CUDA they do 4/9 of these convolutions' products and skip
# a full-resolution tensor: the GPU pack's layers stage times both sides, and a side whose fused form loses there
# goes back to "separate" here alone. Other devices (meta: FLOP counting, shape recording) run the separate ops.
AUTO = {"up": {"cpu": "fused", "cuda": "fused"}, "down": {"cpu": "fused", "cuda": "fused"}}
IMPLS = {"up": typing.get_args(UpConvImpl), "down": typing.get_args(DownConvImpl)}


def resolve(impl: str, kind: str, device_type: str) -> str:
    """The formulation (one of ``IMPLS[kind]`` but "auto") that ``impl`` runs for ``kind`` ("up" or "down") on
    ``device_type``."""
    if impl not in IMPLS[kind]:
        raise ValueError(f"resampling convolution impl={impl!r} for {kind!r} is not one of {IMPLS[kind]}")
    return AUTO[kind].get(device_type, "separate") if impl == "auto" else impl


def _box_sums(w: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 4, 4): the 3x3 kernel's full convolution with a 2x2 box of ones, in fp32 at least
    (bf16 / fp16 weights summed in fp32, rounded once after; fp64 stays fp64). Along each axis the taps become
    (w0, w0 + w1, w1 + w2, w2): the 4-wide window of a pooled pair of 3x3 windows, and, rows 0 and 2 / 1 and 3, the
    two taps of the even / odd phase of an upsampled input. Pads and adds (which autocast leaves in their dtype):
    exact sums, where a convolution could run in TF32 on a GPU."""
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    rows = F.pad(w, (0, 0, 0, 1)) + F.pad(w, (0, 0, 1, 0))
    return F.pad(rows, (0, 1)) + F.pad(rows, (1, 0))


def upsample_conv_weight(w: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (4 C_out, C_in, 2, 2): the four phases' 2x2 kernels, phase (a, b) at outputs
    (2a + b) C_out ... (2a + b + 1) C_out - 1 (box-sum row 2y + a is phase a's tap y), in w's dtype."""
    o, i = w.shape[:2]
    k = _box_sums(w).view(o, i, 2, 2, 2, 2).permute(3, 5, 0, 1, 2, 4).reshape(4 * o, i, 2, 2)
    return k.to(w.dtype)


def upsample_conv_transposed_weight(w: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (C_in, C_out, 4, 4): the stride-2 transposed convolution's kernel, the box sums
    flipped (a transposed convolution adds x[i] K[k] into output 2i + k - 1), in w's dtype."""
    return _box_sums(w).flip(-2, -1).transpose(0, 1).to(w.dtype)


def conv_avgpool_weight(w: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (C_out, C_in, 4, 4): the stride-2 kernel of conv3x3 then 2x2 average pooling."""
    return (_box_sums(w) * 0.25).to(w.dtype)


class _Interleave(torch.autograd.Function):
    """The four phases of ``upsample_conv``'s (N, 4 O, H+1, W+1) grid, interleaved into an (N, 2H, 2W, O) NHWC
    tensor: output (n, 2i + a, 2j + b, o) is the grid's (n, (a, b, o), i + a, j + b), an affine map of (n, i, a, j, b,
    o), so one strided view of the grid copied once. The backward writes the gradient back through the same view
    (autograd's own as_strided backward scatters through an index tensor the size of the grid)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        ctx.geometry = (y.shape, y.stride())  # a convolution's output: dense, in its own layout
        return _phases(y).reshape(y.shape[0], 2 * (y.shape[2] - 1), 2 * (y.shape[3] - 1), y.shape[1] // 4)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        shape, stride = ctx.geometry
        out = grad.new_empty_strided(shape, stride).zero_()  # the row and column no phase reads stay 0
        phases = _phases(out)
        phases.copy_(grad.reshape(phases.shape))
        return out


def _phases(y: torch.Tensor) -> torch.Tensor:
    """The (N, H, 2, W, 2, O) strided view of the phase grid y (see _Interleave)."""
    n, c, h1, w1 = y.shape
    o = c // 4
    sn, sc, sh, sw = y.stride()
    return y.as_strided((n, h1 - 1, 2, w1 - 1, 2, o), (sn, sh, sh + 2 * o * sc, sw, sw + o * sc, sc))


def _interleave_by_slices(y: torch.Tensor) -> torch.Tensor:
    """_Interleave as torch.compile gets it: slices and stacks, which inductor turns into one indexed copy each way
    (no autograd.Function for dynamo to trace: one of this project's broke D's compiled graph on CUDA alone, H100,
    2026-11-27)."""
    n, c, h1, w1 = y.shape
    g = y.permute(0, 2, 3, 1).unflatten(3, (2, 2, c // 4))  # (N, H+1, W+1, a, b, O)
    rows = [torch.stack([g[:, a:a + h1 - 1, b:b + w1 - 1, a, b] for b in (0, 1)], dim=3) for a in (0, 1)]
    return torch.stack(rows, dim=2).reshape(n, 2 * (h1 - 1), 2 * (w1 - 1), c // 4)


def upsample_conv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """conv2d(upsample_nearest_2x(x), w, b, padding=1) for a 3x3 w, as one 2x2 convolution of x (module
    docstring). The output is in x's memory layout."""
    y = F.conv2d(x, upsample_conv_weight(w), None if b is None else b.repeat(4), padding=1)  # (N, 4 O, H+1, W+1)
    nhwc = _interleave_by_slices(y) if torch.compiler.is_compiling() else _Interleave.apply(y)
    out = nhwc.permute(0, 3, 1, 2)
    return out if is_channels_last(x) else out.contiguous()


def upsample_conv_transposed(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """conv2d(upsample_nearest_2x(x), w, b, padding=1) for a 3x3 w, as one 4x4 transposed convolution with stride 2
    (module docstring). The output is in x's memory layout."""
    out = F.conv_transpose2d(x, upsample_conv_transposed_weight(w), b, stride=2, padding=1)
    return out.contiguous(memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)


def conv_avgpool(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """avg_pool2d(conv2d(x, w, b, padding=1), 2) for a 3x3 w, as one 4x4 convolution with stride 2."""
    return F.conv2d(x, conv_avgpool_weight(w), b, stride=2, padding=1)


def _weight(conv: nn.Conv2d) -> torch.Tensor:
    return conv.sn_weight() if isinstance(conv, SpectralNormMixin) else conv.weight


def check_conv3x3(conv: nn.Module) -> None:
    """The fused forms assume a plain 3x3 convolution, stride 1, padding 1."""
    if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1):
        raise ValueError(f"a fused resampling convolution needs a 3x3 convolution, stride 1, padding 1; got {conv}")


def resampling_convs(net: nn.Module, kind: str) -> list:
    """The 3x3 convolutions of ``net`` that read an upsampled input (``kind`` "up": G's) or whose output is pooled
    ("down": D's), as the blocks mark them (``conv.resampling``)."""
    return [m for m in net.modules() if getattr(m, "resampling", None) == kind]


def conv_after_upsample(conv: nn.Module, x: torch.Tensor, upsample: Callable[[torch.Tensor], torch.Tensor],
                        impl: str) -> torch.Tensor:
    """conv(upsample(x)): G's block ``impl`` ("separate": the two ops; "fused": ``upsample_conv``; "transposed":
    ``upsample_conv_transposed``)."""
    form = resolve(impl, "up", x.device.type)
    if form == "separate":
        return conv(upsample(x))
    return (upsample_conv if form == "fused" else upsample_conv_transposed)(x, _weight(conv), conv.bias)


def conv_then_pool(conv: nn.Module, x: torch.Tensor, pool: Callable[[torch.Tensor], torch.Tensor],
                   impl: str) -> torch.Tensor:
    """pool(conv(x)): D's block ``impl`` ("separate": the two ops; "fused": ``conv_avgpool``)."""
    if resolve(impl, "down", x.device.type) == "separate":
        return pool(conv(x))
    return conv_avgpool(x, _weight(conv), conv.bias)
