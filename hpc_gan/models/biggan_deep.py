"""BigGAN-deep (Brock et al. 2019, appendix B, Tables 7-8): bottleneck residual blocks (1x1 reduce by 4, two 3x3,
1x1 expand), two blocks per resolution, identity-preserving skips (G drops channels, D concatenates new ones), and
the whole z concatenated with the shared class embedding as every block's condition."""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpc_gan.errors import UserError
from hpc_gan.models.biggan import BOTTOM, attention_block
from hpc_gan.models.heads import ConditioningHead
from hpc_gan.models.layers import (ConditionalBatchNorm2d, GOutput, SNConv2d, SNLinear, make_bn,
                                   make_pool, make_upsample, orthogonal_init, run_blocks, upsample2x)
from hpc_gan.models.resample_conv import check_conv3x3, conv_after_upsample

G_ARCH = {128: {"in": [16, 16, 8, 4, 2], "out": [16, 8, 4, 2, 1]},
          256: {"in": [16, 16, 8, 8, 4, 2], "out": [16, 8, 8, 4, 2, 1]}}
D_ARCH = {128: {"in": [1, 2, 4, 8, 16], "out": [2, 4, 8, 16, 16]},
          256: {"in": [1, 2, 4, 8, 8, 16], "out": [2, 4, 8, 8, 16, 16]}}
DEPTH = 2


def check_bottlenecks(ch: int, multipliers: list, net: str) -> None:
    """Every block's bottleneck takes a quarter of the block's channels (``multipliers`` x ``ch``): none may be
    empty. ``net``: "g" or "d"."""
    if min(multipliers) * ch // 4 < 1:
        raise UserError(f"model.{net}_ch={ch}: BigGAN-deep's bottleneck blocks take a quarter of a block's channels, "
                        f"none at this width; use model.{net}_ch >= {-(-4 // min(multipliers))}")


class DeepGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cond_dim: int, which_conv: Callable, which_linear: Callable,
                 which_bn: Callable, upsample: bool, which_upsample: Callable = upsample2x,
                 upconv_impl: str = "separate") -> None:
        super().__init__()
        hidden, self.cout = cin // 4, cout
        self.upsample, self.upconv_impl = (which_upsample if upsample else None), upconv_impl
        cbn = partial(ConditionalBatchNorm2d, cond_dim=cond_dim, which_linear=which_linear, which_bn=which_bn)
        self.bn1, self.bn2, self.bn3, self.bn4 = cbn(cin), cbn(hidden), cbn(hidden), cbn(hidden)
        self.conv1 = which_conv(cin, hidden, kernel_size=1, padding=0)
        self.conv2 = which_conv(hidden, hidden)
        self.conv3 = which_conv(hidden, hidden)
        self.conv4 = which_conv(hidden, cout, kernel_size=1, padding=0)
        if upsample:
            self.conv2.resampling = "up"  # for resampling_convs (benches): the conv that reads the upsampled input
        if upsample and upconv_impl != "separate":
            check_conv3x3(self.conv2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.bn1(x, cond)))
        h = F.relu(self.bn2(h, cond))
        x = x[:, :self.cout]  # identity skip: keep the first channels
        if self.upsample is not None:
            h, x = conv_after_upsample(self.conv2, h, self.upsample, self.upconv_impl), self.upsample(x)
        else:
            h = self.conv2(h)
        h = self.conv3(F.relu(self.bn3(h, cond)))
        h = self.conv4(F.relu(self.bn4(h, cond)))
        return h + x


class Generator(nn.Module):
    memory_format = torch.contiguous_format  # of the activations; torch.channels_last: NHWC (see model.memory_format)

    def __init__(self, resolution: int, ch: int, n_classes: int, z_dim: int, shared_dim: int,
                 attn_res: int = 64, sn_eps: float = 1e-6, bn_eps: float = 1e-4,
                 attn_impl: str = "sdpa", upsample_impl: str = "interpolate", upconv_impl: str = "separate") -> None:
        super().__init__()
        if resolution not in G_ARCH:
            raise ValueError(f"BigGAN-deep resolution {resolution} is not one of {sorted(G_ARCH)}")
        arch = G_ARCH[resolution]
        check_bottlenecks(ch, arch["in"], "g")  # DeepGBlock: a quarter of its input's channels
        self.resolution, self.n_classes, self.z_dim = resolution, n_classes, z_dim
        which_conv = partial(SNConv2d, kernel_size=3, padding=1, sn_eps=sn_eps)
        which_linear = partial(SNLinear, sn_eps=sn_eps)
        which_bn = make_bn(bn_eps)
        cond_dim = z_dim + shared_dim
        self.shared = nn.Embedding(n_classes, shared_dim)
        self.first_ch = arch["in"][0] * ch
        self.linear = which_linear(cond_dim, self.first_ch * BOTTOM * BOTTOM)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        res = BOTTOM
        for cin, cout in zip(arch["in"], arch["out"]):
            for j in range(DEPTH):
                last = j == DEPTH - 1
                self.blocks.append(DeepGBlock(cin * ch, (cout if last else cin) * ch, cond_dim, which_conv,
                                              which_linear, which_bn, upsample=last,
                                              which_upsample=make_upsample(upsample_impl),
                                              upconv_impl=upconv_impl))
            res *= 2
            if res == attn_res:
                self.attn[str(len(self.blocks) - 1)] = attention_block(cout * ch, which_conv, attn_impl, "g", res)
        if attn_res and not len(self.attn):
            raise UserError(f"model.g_attn_res={attn_res} is not a G resolution at {resolution} px")
        self.out = GOutput(arch["out"][-1] * ch, which_conv, which_bn)
        orthogonal_init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cond = torch.cat([z, self.shared(y)], dim=1)
        h = self.linear(cond).view(z.shape[0], self.first_ch, BOTTOM, BOTTOM).contiguous(
            memory_format=self.memory_format)
        return self.out(run_blocks(self.blocks, self.attn, h, [cond] * len(self.blocks)))


class DeepDBlock(nn.Module):
    def __init__(self, cin: int, cout: int, which_conv: Callable, downsample: bool,
                 which_pool: Callable = make_pool("avg_pool2d")) -> None:
        super().__init__()
        hidden, self.downsample, self.pool = cout // 4, downsample, which_pool
        self.conv1 = which_conv(cin, hidden, kernel_size=1, padding=0)
        self.conv2 = which_conv(hidden, hidden)
        self.conv3 = which_conv(hidden, hidden)
        self.conv4 = which_conv(hidden, cout, kernel_size=1, padding=0)
        # Identity skip: pass the input channels through, a 1x1 conv makes only the missing ones.
        self.conv_sc = which_conv(cin, cout - cin, kernel_size=1, padding=0) if cout > cin else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(x))  # out of place: x feeds the skip unchanged
        h = self.conv3(F.relu(self.conv2(F.relu(h))))
        h = F.relu(h)
        if self.downsample:
            h, x = self.pool(h), self.pool(x)
        if self.conv_sc is not None:
            x = torch.cat([x, self.conv_sc(x)], dim=1)
        return self.conv4(h) + x


class Discriminator(nn.Module):
    memory_format = torch.contiguous_format  # of the activations; torch.channels_last: NHWC (see model.memory_format)

    def __init__(self, resolution: int, ch: int, n_classes: int, cond: str, embed_dim: int,
                 attn_res: int = 64, sn_eps: float = 1e-6, attn_impl: str = "sdpa",
                 pool_impl: str = "nearest_grad") -> None:
        super().__init__()
        if resolution not in D_ARCH:
            raise ValueError(f"BigGAN-deep resolution {resolution} is not one of {sorted(D_ARCH)}")
        arch = D_ARCH[resolution]
        check_bottlenecks(ch, arch["out"], "d")  # DeepDBlock: a quarter of its output's channels
        which_conv = partial(SNConv2d, kernel_size=3, padding=1, sn_eps=sn_eps)
        self.input_conv = which_conv(3, arch["in"][0] * ch)
        pool = make_pool(pool_impl)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        res = resolution
        for cin, cout in zip(arch["in"], arch["out"]):
            for j in range(DEPTH):
                self.blocks.append(DeepDBlock((cin if j == 0 else cout) * ch, cout * ch, which_conv,
                                              downsample=j == 0, which_pool=pool))
            res //= 2
            if res == attn_res:
                self.attn[str(len(self.blocks) - 1)] = attention_block(cout * ch, which_conv, attn_impl, "d", res)
        if attn_res and not len(self.attn):
            raise UserError(f"model.d_attn_res={attn_res} is not a D resolution at {resolution} px")
        feat = arch["out"][-1] * ch
        self.head = ConditioningHead(feat, n_classes, cond, embed_dim, partial(SNLinear, sn_eps=sn_eps), sn_eps)
        orthogonal_init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        return F.relu(run_blocks(self.blocks, self.attn, self.input_conv(x))).sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        return self.head(self.features(x), y)
