"""Small building blocks that BigGAN's networks are assembled from.

Blocks take their conv / linear / BN constructors as arguments (``which_conv``, ``which_linear``, ``which_bn``) so
a distributed run can swap in cross-replica BN, or a kernel build a fused spectral norm, without touching the blocks.
"""
from __future__ import annotations

import typing
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpc_gan.config import AttnGamma, AttnImpl
from kernels import sn_power_iteration
from kernels.dispatch import autocast_off


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling in x's own dtype. CUDA's autocast lists upsample_nearest2d among its fp32 ops,
    so under bf16 autocast every G block upsampled in fp32 and the next conv cast the 4x larger result back (H100,
    batch 256: 59 ms of a 725 ms iteration, docs/benchmarks.md). Nearest upsampling only copies values, so the
    dtype it runs in cannot change a result."""
    with autocast_off(x.device.type):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


def is_channels_last(x: torch.Tensor) -> bool:
    """x is 4-D and laid out NHWC, and not also NCHW (a 1 x 1 image or a single channel is both)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _pixels(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """x (N, C, H, W) as the view whose dims follow its memory, and the dim of H in it: (N, H, W, C) when x is
    channels-last, else x itself. A reshape of that view touches memory in order, so it stays a view."""
    if is_channels_last(x):
        return x.permute(0, 2, 3, 1), 1
    return x, 2


def _as_nchw(p: torch.Tensor, h_dim: int) -> torch.Tensor:
    return p.permute(0, 3, 1, 2) if h_dim == 1 else p


def upsample2x_expand(x: torch.Tensor) -> torch.Tensor:
    """upsample2x as one broadcast copy in x's own memory layout (model.upsample_impl=expand): each pixel expanded
    to a 2x2 block and reshaped; its backward is one sum over the blocks (the gradient's four terms summed in
    another order than torch's: within an ulp). The values are upsample2x's bit for bit. Why: on the first H100 run
    torch's channels-last nearest-upsampling kernel moved ~0.8 TB/s of the 3 the device copies at (its kernel time
    against the bytes of G's 30 upsamplings); a broadcast copy along contiguous channels should come closer."""
    p, h = _pixels(x)
    size = list(p.shape)
    grid = p.unsqueeze(h + 2).unsqueeze(h + 1)  # (..., H, 1, W, 1, ...)
    size[h:h + 2] = [size[h], 2, size[h + 1], 2]
    out = grid.expand(size).flatten(h + 2, h + 3).flatten(h, h + 1)
    return _as_nchw(out, h)


def avg_pool2x2_reshape(x: torch.Tensor) -> torch.Tensor:
    """F.avg_pool2d(x, 2) as a mean over 2x2 blocks of a view in x's own memory layout (model.pool_impl=reshape):
    one reduction forward, one broadcast backward (autograd's). A trailing odd row / column is dropped, as torch
    does."""
    p, h = _pixels(x)
    if p.shape[h] % 2 or p.shape[h + 1] % 2:  # only then: a narrowed view costs two kernels in the backward
        p = p.narrow(h, 0, p.shape[h] // 2 * 2).narrow(h + 1, 0, p.shape[h + 1] // 2 * 2)
    size = list(p.shape)
    size[h:h + 2] = [size[h] // 2, 2, size[h + 1] // 2, 2]
    return _as_nchw(p.reshape(size).mean((h + 1, h + 3)), h)


class _AvgPool2x2(torch.autograd.Function):
    """F.avg_pool2d(x, 2) whose backward is upsample2x(grad / 4): avg_pool2d's own gradient bit for bit (the
    division by 4 is exact), as one bandwidth-bound copy. CUDA's avg_pool2d backward for channels-last took 110 ms
    of a 725 ms iteration on an H100 at batch 256; on the 2-core CPU the two agree bitwise and the upsampling is
    1.1-2.2x faster."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.odd = (x.shape[-1] % 2, x.shape[-2] % 2)  # a trailing odd row / column gets no gradient, as in torch
        return F.avg_pool2d(x, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = upsample2x(grad * 0.25)
        return F.pad(out, (0, ctx.odd[0], 0, ctx.odd[1])) if any(ctx.odd) else out


POOLS = {"nearest_grad": _AvgPool2x2.apply, "reshape": avg_pool2x2_reshape, "avg_pool2d": lambda x: F.avg_pool2d(x, 2)}
UPSAMPLES = {"interpolate": upsample2x, "expand": upsample2x_expand}
RESAMPLES = {"pool": POOLS, "upsample": UPSAMPLES}
# "auto": per device type, what measured fastest there. H100, BigGAN-128 at batch 256, bf16, channels-last, device
# ms per training iteration (GPU pack's layers stage, 2026-11-27): pool reshape 27 / nearest_grad 71 / avg_pool2d 137,
# upsample expand 23 / interpolate 49. On the 2-core CPU the view-based forms are the slower (strided reductions).
AUTO_RESAMPLE = {"cuda": {"pool": "reshape", "upsample": "expand"}}
AUTO_RESAMPLE_ELSEWHERE = {"pool": "nearest_grad", "upsample": "interpolate"}


def auto_resample(kind: str, device_type: str) -> str:
    """The implementation "auto" runs for ``kind`` ("pool" or "upsample") on ``device_type``."""
    return AUTO_RESAMPLE.get(device_type, AUTO_RESAMPLE_ELSEWHERE)[kind]


def _make_resample(kind: str, impl: str) -> Callable[[torch.Tensor], torch.Tensor]:
    table = RESAMPLES[kind]
    if impl == "auto":  # chosen per call from the tensor's device: models are built on the CPU, then moved
        return lambda x: table[auto_resample(kind, x.device.type)](x)
    if impl not in table:
        raise ValueError(f"{kind}_impl={impl!r} is not one of {sorted(table) + ['auto']}")
    return table[impl]


def make_pool(impl: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """D's 2x2 average pooling (``model.pool_impl``): "nearest_grad" (its backward as an upsampling), "reshape" (a
    mean over a view), "avg_pool2d" (torch's, the reference) or "auto" (``auto_resample``)."""
    return _make_resample("pool", impl)


def make_upsample(impl: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """G's 2x nearest upsampling (``model.upsample_impl``): "interpolate" (torch's, the reference), "expand" (a
    broadcast copy) or "auto" (``auto_resample``)."""
    return _make_resample("upsample", impl)


class SpectralNormMixin:
    """Spectral normalization of ``self.weight`` (Miyato et al. 2018) with the semantics of
    torch.nn.utils.parametrizations.spectral_norm: in training mode one (or n) power-iteration step(s) update the
    u, v buffers without gradient, then sigma = u^T W v is differentiated through W only. This per-layer path is
    the reference (kernels.sn_power_iteration, backend "torch"); a network-wide FusedSpectralNorm (sn_fused.py) may
    normalize all layers' weights at once and hand each layer its W / sigma before the forward (``fused_weight``),
    in which case the layer uses that."""

    weight: torch.Tensor
    fused_weight: Optional[torch.Tensor] = None
    autocasts = True  # the layer's op (conv, linear) runs in autocast's dtype, weight included

    def _init_sn(self, n_power_iterations: int, eps: float) -> None:
        out = self.weight.shape[0]
        w = self.weight.detach().reshape(out, -1)
        self.sn_iters, self.sn_eps = n_power_iterations, eps
        self.register_buffer("sn_u", F.normalize(w.new_empty(out).normal_(), dim=0, eps=eps))
        self.register_buffer("sn_v", torch.zeros(w.shape[1], dtype=w.dtype, device=w.device))
        self.sn_warm_start()

    @torch.no_grad()
    def sn_warm_start(self, n_iters: int = 15) -> None:
        """Start u, v near the top singular pair, as torch's spectral_norm does (again after re-initializing W)."""
        self._sn_update(n_iters)

    def sn_matrix(self) -> torch.Tensor:
        return self.weight.reshape(self.weight.shape[0], -1)

    def _sn_update(self, n_iters: int) -> torch.Tensor:
        sigmas, us, vs = sn_power_iteration([self.sn_matrix()], [self.sn_u.float()], n_iters, self.sn_eps,
                                            backend="torch")
        with torch.no_grad():
            self.sn_u.copy_(us[0])
            self.sn_v.copy_(vs[0])
        return sigmas[0]

    @torch.no_grad()
    def sn_sigma(self) -> torch.Tensor:
        """The current estimate of W's top singular value, u^T W v from the stored u, v (BigGAN's sigma_0)."""
        return torch.dot(self.sn_u.float(), self.sn_matrix().float() @ self.sn_v.float())

    def sn_weight(self) -> torch.Tensor:
        fused, self.fused_weight = self.fused_weight, None
        if fused is not None:
            return fused
        # fp32 even under autocast: u, v and sigma lose too much in bf16 (the layer's conv may still run in bf16)
        with autocast_off(self.weight.device.type):
            if self.training:
                sigma = self._sn_update(self.sn_iters)
            else:  # no iteration in eval mode; u, v cloned so a later update cannot alter a saved graph
                sigma = torch.dot(self.sn_u.float().clone(), self.sn_matrix().float() @ self.sn_v.float().clone())
        return self.weight / sigma


class SNConv2d(nn.Conv2d, SpectralNormMixin):
    # (x, W / sigma, bias, padding) -> output in place of F.conv2d: the RGB convolutions' other formulations
    # (rgb_conv.set_rgb_conv); None: F.conv2d
    conv_fn: Optional[Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int], torch.Tensor]] = None

    def __init__(self, *args, sn_iters: int = 1, sn_eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_sn(sn_iters, sn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_fn is not None:
            return self.conv_fn(x, self.sn_weight(), self.bias, self.padding[0])
        return self._conv_forward(x, self.sn_weight(), self.bias)


class SNLinear(nn.Linear, SpectralNormMixin):
    def __init__(self, *args, sn_iters: int = 1, sn_eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_sn(sn_iters, sn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sn_weight(), self.bias)


class SNEmbedding(nn.Embedding, SpectralNormMixin):
    autocasts = False  # embedding lookups keep the weight's dtype under autocast

    def __init__(self, *args, sn_iters: int = 1, sn_eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_sn(sn_iters, sn_eps)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.embedding(y, self.sn_weight())


def spectral_norm_layers(module: nn.Module) -> list:
    """All spectral-normalized layers of a network, in a fixed order (for logging sigma, or a fused kernel)."""
    return [m for m in module.modules() if isinstance(m, SpectralNormMixin)]


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine parameters, then per-sample gains (centred at 1) and biases projected linearly
    from the conditioning vector (shared class embedding + a chunk of z in BigGAN)."""

    def __init__(self, num_features: int, cond_dim: int, which_linear: Callable[..., nn.Module],
                 which_bn: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.bn = which_bn(num_features, affine=False)
        self.gain = which_linear(cond_dim, num_features, bias=False)
        self.bias = which_linear(cond_dim, num_features, bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gain = (1.0 + self.gain(cond))[:, :, None, None]
        bias = self.bias(cond)[:, :, None, None]
        return self.bn(x) * gain + bias


ATTENTIONS = typing.get_args(AttnImpl)  # model.attn_impl's choices, defined in the config


class SelfAttention(nn.Module):
    """SA-GAN's non-local block: keys and values max-pooled 2x, channels reduced 8x (query/key) and 2x (value);
    the output is added with a learned scale that starts at 0. ``impl``: "sdpa" computes softmax(theta^T phi) g^T
    with torch's scaled_dot_product_attention (unscaled logits, scale=1.0), "explicit" builds the (hw x hw/4) map
    (the reference). Zero channels appended to theta and phi leave every logit as it is, so:
    - "sdpa" pads them (c/8) to g's c/2: the flash and cuDNN kernels want one head dim for queries, keys and values
      (measured on the 2-core CPU, 8 x 64x64, c 32, forward + backward: 98 ms against 531 ms for the explicit map,
      422 ms for SDPA's unpadded fallback). At BigGAN-128 that is 4x the q.k products of G's attention (24 -> 96).
    - "sdpa_narrow" pads them only to a multiple of 8 (G 24, D 12 -> 16), which CUDA's memory-efficient kernel
      takes beside a wider v; elsewhere SDPA falls back to its math path. The check pack's layers stage times the
      three at BigGAN-128's shapes."""

    # where gamma scales (model.attn_gamma; set_attn_gamma): "weight" folds it into o's weight, so that
    # gamma * o(a) is o's convolution with gamma * W / sigma, and gamma's gradient is a sum over that weight (c/2 x c)
    # and its gradient, which the backward computes anyway. "output" (BigGAN's form, the reference) scales o's
    # output: an extra pass over the activation forward, and gamma's gradient a sum over two n x c x h x w tensors,
    # which inductor read channels-last tensors for in NCHW order (5.85 ms of the H200's CUDA-graph step at 256 per
    # GPU, its longest fused kernel, 2026-11-27)
    gamma_in: AttnGamma = "weight"
    MIN_CHANNELS = 8  # query and key take ch // 8

    def __init__(self, ch: int, which_conv: Callable[..., nn.Module], impl: str = "sdpa") -> None:
        super().__init__()
        if impl not in ATTENTIONS:
            raise ValueError(f"SelfAttention: impl={impl!r} is not one of {ATTENTIONS}")
        if ch < self.MIN_CHANNELS:
            raise ValueError(f"SelfAttention: needs at least {self.MIN_CHANNELS} channels, got {ch}")
        self.ch, self.impl = ch, impl
        self.theta = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.phi = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.g = which_conv(ch, ch // 2, kernel_size=1, padding=0, bias=False)
        self.o = which_conv(ch // 2, ch, kernel_size=1, padding=0, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        theta = self.theta(x).flatten(2)                                   # (n, c/8, hw)
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)                     # (n, c/8, hw/4)
        g = F.max_pool2d(self.g(x), 2).flatten(2)                         # (n, c/2, hw/4)
        if self.impl != "explicit":
            width = c // 2 if self.impl == "sdpa" else -(-(c // 8) // 8) * 8
            pad = (0, width - c // 8)
            q = F.pad(theta.transpose(1, 2), pad).contiguous()[:, None]    # (n, 1, hw, width)
            k = F.pad(phi.transpose(1, 2), pad).contiguous()[:, None]      # (n, 1, hw/4, width)
            v = g.transpose(1, 2).contiguous()[:, None]                    # (n, 1, hw/4, c/2)
            o = F.scaled_dot_product_attention(q, k, v, scale=1.0)[:, 0]   # (n, hw, c/2)
            o = o.transpose(1, 2).reshape(n, c // 2, h, w)
        else:
            attn = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)     # (n, hw, hw/4)
            o = (g @ attn.transpose(1, 2)).reshape(n, c // 2, h, w)
        if self.gamma_in == "output":
            return x + self.gamma * self.o(o)
        w = self.o.sn_weight() if isinstance(self.o, SpectralNormMixin) else self.o.weight
        return x + F.conv2d(o, self.gamma * w)  # o: 1x1, no bias, no padding


ATTN_GAMMAS = typing.get_args(AttnGamma)  # model.attn_gamma's choices, defined in the config


def set_attn_gamma(net: nn.Module, where: str) -> None:
    """Make every self-attention block of ``net`` apply its learned scale ``where`` (SelfAttention.gamma_in)."""
    if where not in ATTN_GAMMAS:
        raise ValueError(f"attn_gamma={where!r} is not one of {ATTN_GAMMAS}")
    for m in net.modules():
        if isinstance(m, SelfAttention):
            m.gamma_in = where


class GOutput(nn.Module):
    """G's last layers: BatchNorm (with its own affine parameters), ReLU, 3x3 conv to RGB, tanh."""

    def __init__(self, ch: int, which_conv: Callable[..., nn.Module], which_bn: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.bn = which_bn(ch)
        self.conv = which_conv(ch, 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(F.relu(self.bn(h))))


def run_blocks(blocks: nn.ModuleList, attn: nn.ModuleDict, h: torch.Tensor,
               conds: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Residual blocks in order, with self-attention after the block whose index keys ``attn``; block i gets
    ``conds[i]`` as its condition when conditions are given (G), none otherwise (D)."""
    for i, block in enumerate(blocks):
        h = block(h) if conds is None else block(h, conds[i])
        if str(i) in attn:
            h = attn[str(i)](h)
    return h


def orthogonal_init(module: nn.Module) -> None:
    """Orthogonal initialization (Saxe et al.) of every conv, linear and embedding weight, as BigGAN does."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
            nn.init.orthogonal_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, SpectralNormMixin):
                m.sn_warm_start()


def make_bn(bn_eps: float, bn_momentum: Optional[float] = 0.1) -> Callable[..., nn.Module]:
    """Default ``which_bn``: torch's BatchNorm2d; a distributed run passes its cross-replica BN here instead."""

    def which_bn(num_features: int, affine: bool = True) -> nn.Module:
        return nn.BatchNorm2d(num_features, eps=bn_eps, momentum=bn_momentum, affine=affine)

    return which_bn
