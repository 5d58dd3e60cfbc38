"""BigGAN generator and discriminator (Brock et al. 2019, appendix B, Tables 4-5), channel multiplier ``ch``.

G: shared class embedding + hierarchical z (one chunk for the first linear layer, one per residual block, each chunk
concatenated with the embedding and projected to that block's conditional-BN gains and biases).
D: residual down-blocks, sum-pooled features h, adversarial head, and the conditioning head the loss needs
(see hpc_gan.models.heads). 16 px is this project's CPU demo size, not a paper table.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpc_gan.errors import UserError
from hpc_gan.models.heads import ConditioningHead
from hpc_gan.models.layers import (ConditionalBatchNorm2d, GOutput, SelfAttention, SNConv2d, SNLinear, make_bn,
                                   make_pool, make_upsample, orthogonal_init, run_blocks, upsample2x)
from hpc_gan.models.resample_conv import check_conv3x3, conv_after_upsample, conv_then_pool, resolve

# Channel multipliers per block: G blocks go in[i] -> out[i] and double the resolution, starting at 4x4.
G_ARCH: Dict[int, Dict[str, List[int]]] = {
    16: {"in": [4, 4], "out": [4, 4]},
    32: {"in": [4, 4, 4], "out": [4, 4, 4]},
    64: {"in": [16, 16, 8, 4], "out": [16, 8, 4, 2]},
    128: {"in": [16, 16, 8, 4, 2], "out": [16, 8, 4, 2, 1]},
    256: {"in": [16, 16, 8, 8, 4, 2], "out": [16, 8, 8, 4, 2, 1]},
}
# D blocks go in[i] -> out[i]; ``down`` says which of them halve the resolution.
D_ARCH: Dict[int, Dict[str, list]] = {
    16: {"in": [None, 4, 4], "out": [4, 4, 4], "down": [True, True, False]},
    32: {"in": [None, 4, 4, 4], "out": [4, 4, 4, 4], "down": [True, True, False, False]},
    64: {"in": [None, 1, 2, 4, 8], "out": [1, 2, 4, 8, 16], "down": [True] * 4 + [False]},
    128: {"in": [None, 1, 2, 4, 8, 16], "out": [1, 2, 4, 8, 16, 16], "down": [True] * 5 + [False]},
    256: {"in": [None, 1, 2, 4, 8, 8, 16], "out": [1, 2, 4, 8, 8, 16, 16], "down": [True] * 6 + [False]},
}
BOTTOM = 4  # G starts at 4x4


class GBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cond_dim: int, which_conv: Callable, which_linear: Callable,
                 which_bn: Callable, which_upsample: Callable = upsample2x, upconv_impl: str = "separate") -> None:
        super().__init__()
        self.upsample, self.upconv_impl = which_upsample, upconv_impl
        self.bn1 = ConditionalBatchNorm2d(cin, cond_dim, which_linear, which_bn)
        self.conv1 = which_conv(cin, cout)
        self.bn2 = ConditionalBatchNorm2d(cout, cond_dim, which_linear, which_bn)
        self.conv2 = which_conv(cout, cout)
        self.conv_sc = which_conv(cin, cout, kernel_size=1, padding=0)
        self.conv1.resampling = "up"  # for resampling_convs (benches): the conv that reads the upsampled input
        if upconv_impl != "separate":
            check_conv3x3(self.conv1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = conv_after_upsample(self.conv1, F.relu(self.bn1(x, cond)), self.upsample, self.upconv_impl)
        h = self.conv2(F.relu(self.bn2(h, cond)))
        # the 1x1 shortcut conv before the upsampling: the same function (a pointwise map commutes with copying
        # pixels), on a quarter of the pixels
        return h + self.upsample(self.conv_sc(x))


def attention_block(ch: int, which_conv: Callable[..., nn.Module], impl: str, net: str, res: int) -> SelfAttention:
    """The self-attention block over a block's ``ch`` output channels, or the one-line error that names the keys
    to change: its query and key take ch // 8 channels, none below 8 (``net``: "g" or "d")."""
    if ch < SelfAttention.MIN_CHANNELS:
        raise UserError(f"model.{net}_attn_res={res}: the self-attention there would see {ch} channels, fewer than "
                        f"its {SelfAttention.MIN_CHANNELS} (query and key take 1/8); raise model.{net}_ch or set "
                        f"model.{net}_attn_res=0")
    return SelfAttention(ch, which_conv, impl)


class Generator(nn.Module):
    memory_format = torch.contiguous_format  # of the activations; torch.channels_last: NHWC (see model.memory_format)

    def __init__(self, resolution: int, ch: int, n_classes: int, z_dim: int, shared_dim: int,
                 attn_res: int = 0, sn_eps: float = 1e-6, bn_eps: float = 1e-4,
                 attn_impl: str = "sdpa", out_bn_eps: Optional[float] = None,
                 upsample_impl: str = "interpolate", upconv_impl: str = "separate") -> None:
        super().__init__()
        if resolution not in G_ARCH:
            raise ValueError(f"BigGAN resolution {resolution} is not one of {sorted(G_ARCH)}")
        arch = G_ARCH[resolution]
        n_blocks = len(arch["in"])
        if z_dim % (n_blocks + 1):
            raise UserError(f"model.z_dim={z_dim} must split into {n_blocks + 1} equal chunks at {resolution} px "
                            f"(e.g. {20 * (n_blocks + 1)})")
        self.resolution, self.n_classes, self.z_dim = resolution, n_classes, z_dim
        self.chunk = z_dim // (n_blocks + 1)
        which_conv = partial(SNConv2d, kernel_size=3, padding=1, sn_eps=sn_eps)
        which_linear = partial(SNLinear, sn_eps=sn_eps)
        which_bn = make_bn(bn_eps)
        cond_dim = shared_dim + self.chunk
        self.shared = nn.Embedding(n_classes, shared_dim)
        self.linear = which_linear(self.chunk, arch["in"][0] * ch * BOTTOM * BOTTOM)
        self.first_ch = arch["in"][0] * ch
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        res = BOTTOM
        for i, (cin, cout) in enumerate(zip(arch["in"], arch["out"])):
            self.blocks.append(GBlock(cin * ch, cout * ch, cond_dim, which_conv, which_linear, which_bn,
                                      make_upsample(upsample_impl), upconv_impl))
            res *= 2
            if res == attn_res:
                self.attn[str(i)] = attention_block(cout * ch, which_conv, attn_impl, "g", res)
        if attn_res and not len(self.attn):
            raise UserError(f"model.g_attn_res={attn_res} is not a G block resolution at {resolution} px")
        out_bn = which_bn if out_bn_eps is None else make_bn(out_bn_eps)
        self.out = GOutput(arch["out"][-1] * ch, which_conv, out_bn)
        orthogonal_init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(z, self.chunk, dim=1)
        shared = self.shared(y)
        h = self.linear(chunks[0]).view(z.shape[0], self.first_ch, BOTTOM, BOTTOM).contiguous(
            memory_format=self.memory_format)
        conds = [torch.cat([shared, c], dim=1) for c in chunks[1:]]  # block i: chunk i + 1 (chunk 0 fed the linear)
        return self.out(run_blocks(self.blocks, self.attn, h, conds))


class DBlock(nn.Module):
    """D's residual block. ``relu_shortcut`` (pre-activation blocks only): the shortcut gets ReLU(x) rather than x,
    which is what StudioGAN's DiscBlock computes (its in-place ReLU also rewrites the tensor its shortcut holds), and
    so the function behind the ReACGAN paper's numbers (model.d_shortcut=studiogan)."""

    def __init__(self, cin: int, cout: int, which_conv: Callable, preactivation: bool, downsample: bool,
                 relu_shortcut: bool = False, which_pool: Callable = make_pool("avg_pool2d"),
                 downconv_impl: str = "separate") -> None:
        super().__init__()
        self.preactivation, self.downsample, self.pool = preactivation, downsample, which_pool
        self.relu_shortcut = relu_shortcut and preactivation
        self.downconv_impl = downconv_impl
        self.conv1 = which_conv(cin, cout)
        self.conv2 = which_conv(cout, cout)
        self.conv_sc = which_conv(cin, cout, kernel_size=1, padding=0) if (cin != cout or downsample) else None
        if downsample:
            self.conv2.resampling = "down"  # for resampling_convs (benches): the conv whose output is pooled
        if downsample and downconv_impl != "separate":
            check_conv3x3(self.conv2)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # The 1x1 conv and the pooling are both linear, so they commute: BigGAN's pre-activation blocks convolve
        # first (the reference); pooling first is 4x cheaper, and the fused formulation does it
        if self.preactivation and resolve(self.downconv_impl, "down", x.device.type) == "separate":
            x = self.conv_sc(x) if self.conv_sc is not None else x
            return self.pool(x) if self.downsample else x
        x = self.pool(x) if self.downsample else x
        return self.conv_sc(x) if self.conv_sc is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(x) if self.preactivation else x  # out of place: x feeds the shortcut unchanged (BigGAN)
        h = F.relu(self.conv1(a))
        h = conv_then_pool(self.conv2, h, self.pool, self.downconv_impl) if self.downsample else self.conv2(h)
        return h + self.shortcut(a if self.relu_shortcut else x)


class Discriminator(nn.Module):
    memory_format = torch.contiguous_format  # of the activations; torch.channels_last: NHWC (see model.memory_format)

    def __init__(self, resolution: int, ch: int, n_classes: int, cond: str, embed_dim: int,
                 attn_res: int = 0, sn_eps: float = 1e-6, attn_impl: str = "sdpa", shortcut: str = "biggan",
                 pool_impl: str = "nearest_grad", downconv_impl: str = "separate") -> None:
        super().__init__()
        if resolution not in D_ARCH:
            raise ValueError(f"BigGAN resolution {resolution} is not one of {sorted(D_ARCH)}")
        arch = D_ARCH[resolution]
        which_conv = partial(SNConv2d, kernel_size=3, padding=1, sn_eps=sn_eps)
        pool = make_pool(pool_impl)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        res = resolution
        for i, (cin, cout, down) in enumerate(zip(arch["in"], arch["out"], arch["down"])):
            cin = 3 if cin is None else cin * ch
            self.blocks.append(DBlock(cin, cout * ch, which_conv, preactivation=i > 0, downsample=down,
                                      relu_shortcut=shortcut == "studiogan", which_pool=pool,
                                      downconv_impl=downconv_impl))
            res = res // 2 if down else res
            if res == attn_res and down:
                self.attn[str(i)] = attention_block(cout * ch, which_conv, attn_impl, "d", res)
        if attn_res and not len(self.attn):
            raise UserError(f"model.d_attn_res={attn_res} is not a D block resolution at {resolution} px")
        feat = arch["out"][-1] * ch
        self.head = ConditioningHead(feat, n_classes, cond, embed_dim, partial(SNLinear, sn_eps=sn_eps), sn_eps)
        orthogonal_init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        return F.relu(run_blocks(self.blocks, self.attn, x)).sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        return self.head(self.features(x), y)
