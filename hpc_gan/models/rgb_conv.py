"""Formulations of the convolutions that read or write RGB (``model.d_rgb_conv_impl``, ``model.g_rgb_conv_impl``):
D's convolutions on the 3-channel image and G's convolution to 3 channels. With 3 channels on one side, cuDNN pads
to 8 or runs narrow tiles: on the H200 (2026-11-27, BigGAN-128, bf16, channels-last) their forward kernels took ~9
ms an iteration where their bytes take under 2. ``conv2d`` is the reference; the others compute the same function
(tests), and the GPU check pack's layers stage times them all (``rgb_conv_bench``) before one becomes a default.
"""
from __future__ import annotations

import typing
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from hpc_gan.config import DRgbConv, GRgbConv
from hpc_gan.models.layers import SNConv2d

ALIGN = 8  # channels that cuDNN's and cuBLAS's bf16 tensor-core kernels take whole (16 bytes)
RgbConv = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int], torch.Tensor]


def conv2d(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], padding: int) -> torch.Tensor:
    """The reference: F.conv2d in x's own layout (channels-last on CUDA by default)."""
    return F.conv2d(x, w, b, padding=padding)


def conv_nchw(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], padding: int) -> torch.Tensor:
    """The convolution in NCHW (cuDNN's kernels for it need no channel padding), its output back in x's layout."""
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return F.conv2d(x.contiguous(), w, b, padding=padding).contiguous(memory_format=layout)


def conv_unfold_mm(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], padding: int) -> torch.Tensor:
    """im2col and one batched product whose output is already NHWC (a channels-last view): for few input channels
    (3 x 3 x 3 = 27 products per output) the product's K is small and its output, written once, is most of the
    bytes. Stride 1, "same"-size output."""
    if torch.is_autocast_enabled(x.device.type):  # the columns in autocast's dtype, not cast again by the product
        x = x.to(torch.get_autocast_dtype(x.device.type))
    n, _, h, wd = x.shape
    cout, _, kh, kw = w.shape
    cols = F.unfold(x, (kh, kw), padding=padding).transpose(1, 2)  # (N, L, C kh kw), L: output pixels
    wt = w.reshape(cout, -1).t().expand(n, -1, -1)
    out = torch.bmm(cols, wt) if b is None else torch.baddbmm(b, cols, wt)  # (N, L, cout): NHWC; bias fused
    return out.view(n, h + 2 * padding - kh + 1, wd + 2 * padding - kw + 1, cout).permute(0, 3, 1, 2)


def conv_pad_out(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], padding: int) -> torch.Tensor:
    """Output channels padded with zero filters to a multiple of ALIGN, the padding sliced off: for 3 outputs,
    cuDNN's full-width tiles in place of a narrow one."""
    extra = -w.shape[0] % ALIGN
    if not extra:
        return F.conv2d(x, w, b, padding=padding)
    wp = torch.cat([w, w.new_zeros(extra, *w.shape[1:])])
    bp = None if b is None else torch.cat([b, b.new_zeros(extra)])
    return F.conv2d(x, wp, bp, padding=padding)[:, :w.shape[0]]


_ALL: Dict[str, RgbConv] = {"conv2d": conv2d, "nchw": conv_nchw, "unfold_mm": conv_unfold_mm,
                            "pad_out": conv_pad_out}
# the choices of each side, defined in the config: unfold_mm only where the input is the image (im2col of a wide
# input is k^2 x its bytes), pad_out only where the output is
D_RGB_CONVS: Dict[str, RgbConv] = {k: _ALL[k] for k in typing.get_args(DRgbConv)}
G_RGB_CONVS: Dict[str, RgbConv] = {k: _ALL[k] for k in typing.get_args(GRgbConv)}


def rgb_convs(net: nn.Module, side: str) -> list:
    """The convolutions of ``net`` that read 3 channels (``side`` "in": D's on the image) or write 3 ("out": G's
    output)."""
    attr = "in_channels" if side == "in" else "out_channels"
    return [m for m in net.modules() if isinstance(m, SNConv2d) and getattr(m, attr) == 3]


def set_rgb_conv(net: nn.Module, side: str, impl: str) -> None:
    """Make ``net``'s RGB convolutions (``rgb_convs``) run ``impl``; "conv2d" leaves them as they are."""
    table = D_RGB_CONVS if side == "in" else G_RGB_CONVS
    if impl not in table:
        raise ValueError(f"{'d' if side == 'in' else 'g'}_rgb_conv_impl={impl!r} is not one of {sorted(table)}")
    for m in rgb_convs(net, side):
        if impl != "conv2d" and (m.stride != (1, 1) or m.dilation != (1, 1) or m.groups != 1
                                 or m.padding[0] != m.padding[1] or m.kernel_size[0] != m.kernel_size[1]):
            raise ValueError(f"rgb conv {impl}: stride-1, square, ungrouped convolutions only, not {m}")
        m.conv_fn = None if impl == "conv2d" else table[impl]
