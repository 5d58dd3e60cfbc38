"""The 2x resamplings of BigGAN's blocks folded into the 3x3 convolution beside them (``model.g_upconv_impl``,
``model.d_downconv_impl``): the same functions in 4/9 of the multiply-adds, and without the full-resolution tensor
between the two.

- G: conv3x3(upsample2x(x)). Nearest upsampling repeats each pixel in a 2x2 block, so each of the four output
  phases (even/odd row, even/odd column) is a 2x2 convolution of x whose taps are sums of the 3x3 kernel's: for the
  even rows, tap rows (w0, w1 + w2) at offsets (-1, 0); for the odd rows, (w0 + w1, w2) at (0, +1); the same along
  the columns. One 2x2 convolution with 4 x C_out outputs over x padded by 1 computes all four phases on an
  (H+1) x (W+1) grid; phase (a, b) is that grid shifted by (a, b), interleaved into the 2H x 2W output.
  16 taps per input pixel against 36 (4 output pixels x 9).
- D: avg_pool2x2(conv3x3(x)). The mean of the four 3x3 windows of a 2x2 block is one 4x4 window, stride 2, whose
  taps are the 3x3 kernel's summed over the block's offsets and divided by 4: 16 taps per output against 36.
  Padding 1 and a 2-stride keep the borders and the trailing odd row that pooling drops exactly as they were.
  With it, D's pre-activation shortcut pools before its 1x1 convolution (4x fewer products; the two are linear,
  so they commute).

Every equality above is exact in real arithmetic; in floating point the sums of taps round once more (tests:
float64 against the separate ops, and each network against its reference in fp32 and bf16). "separate" is the
reference; "auto" takes ``AUTO`` per device type.
"""
from __future__ import annotations

import typing
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpc_gan.config import ResampleConvImpl
from hpc_gan.models.layers import SpectralNormMixin, no_autocast

# "auto" per device type: the 2-core CPU measured the fused forms faster (docs/benchmarks.md); on CUDA they do 4/9
# of these convolutions' products and skip a full-resolution tensor: the GPU pack's layers stage times both. Other
# devices (meta: FLOP counting, shape recording) run the separate ops.
AUTO = {"cpu": "fused", "cuda": "fused"}
IMPLS = typing.get_args(ResampleConvImpl)
# the tap groups along one kernel axis: upsampling, the two phases' two taps each (even: w0 | w1+w2, odd: w0+w1 |
# w2); pooling, the 4 taps of a 4-wide window (w0 | w0+w1 | w1+w2 | w2)
_UP_TAPS: Sequence[Tuple[int, ...]] = ((0,), (1, 2), (0, 1), (2,))
_POOL_TAPS: Sequence[Tuple[int, ...]] = ((0,), (0, 1), (1, 2), (2,))


def resolve(impl: str, device_type: str) -> str:
    """The formulation ("separate" or "fused") that ``impl`` runs on ``device_type``."""
    if impl not in IMPLS:
        raise ValueError(f"resampling convolution impl={impl!r} is not one of {IMPLS}")
    return AUTO.get(device_type, "separate") if impl == "auto" else impl


def _group_taps(w: torch.Tensor, dim: int, groups: Sequence[Tuple[int, ...]]) -> torch.Tensor:
    taps = w.unbind(dim)
    return torch.stack([taps[g[0]] if len(g) == 1 else taps[g[0]] + taps[g[1]] for g in groups], dim)


def _wide(w: torch.Tensor) -> torch.Tensor:
    """w in fp32 at least (bf16 / fp16 weights summed in fp32, rounded once after; fp64 stays fp64)."""
    return w.to(torch.promote_types(w.dtype, torch.float32))


def upsample_conv_weight(w: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (4 C_out, C_in, 2, 2): the four phases' 2x2 kernels, phase (a, b) at outputs
    (2a + b) C_out ... (2a + b + 1) C_out - 1. Summed in fp32 at least, returned in w's dtype."""
    o, i = w.shape[:2]
    with no_autocast(w.device.type):
        m = _group_taps(_group_taps(_wide(w), 2, _UP_TAPS), 3, _UP_TAPS)  # (O, I, 4, 4): rows (a, y), cols (b, x)
        k = m.view(o, i, 2, 2, 2, 2).permute(2, 4, 0, 1, 3, 5).reshape(4 * o, i, 2, 2)
    return k.to(w.dtype)


def conv_avgpool_weight(w: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (C_out, C_in, 4, 4): the stride-2 kernel of conv3x3 then 2x2 average pooling."""
    with no_autocast(w.device.type):
        k = _group_taps(_group_taps(_wide(w), 2, _POOL_TAPS), 3, _POOL_TAPS) * 0.25
    return k.to(w.dtype)


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def upsample_conv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """conv2d(upsample_nearest_2x(x), w, b, padding=1) for a 3x3 w, as one 2x2 convolution of x (module
    docstring). The output is in x's memory layout."""
    n, _, h, wd = x.shape
    o = w.shape[0]
    y = F.conv2d(x, upsample_conv_weight(w), None if b is None else b.repeat(4), padding=1)  # (N, 4 O, H+1, W+1)
    y = y.permute(0, 2, 3, 1).unflatten(3, (2, 2, o))                                       # (N, H+1, W+1, a, b, O)
    out = y.new_empty(n, h, 2, wd, 2, o)  # NHWC memory, rows (i, a), columns (j, b): one pass over the output
    for a in (0, 1):
        for c in (0, 1):
            out[:, :, a, :, c] = y[:, a:a + h, c:c + wd, a, c]
    out = out.view(n, 2 * h, 2 * wd, o).permute(0, 3, 1, 2)
    return out if _channels_last(x) else out.contiguous()


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
    """conv(upsample(x)): G's block ``impl`` ("separate": the two ops; "fused": ``upsample_conv``)."""
    if resolve(impl, x.device.type) == "separate":
        return conv(upsample(x))
    return upsample_conv(x, _weight(conv), conv.bias)


def conv_then_pool(conv: nn.Module, x: torch.Tensor, pool: Callable[[torch.Tensor], torch.Tensor],
                   impl: str) -> torch.Tensor:
    """pool(conv(x)): D's block ``impl`` ("separate": the two ops; "fused": ``conv_avgpool``)."""
    if resolve(impl, x.device.type) == "separate":
        return pool(conv(x))
    return conv_avgpool(x, _weight(conv), conv.bias)
