"""Cross-replica (synchronized) BatchNorm: statistics over the global batch, exact gradients.

torch.nn.SyncBatchNorm refuses CPU tensors and hides its communication; this one is written out so it is tested on
CPU with gloo and reads like the math. Forward: one all-reduce of [n mean, n (var + mean^2), n] per channel, from
each rank's own stable mean and variance, in double. Backward: one all-reduce of [sum dy, sum dy * x_hat]; then
dx = invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)) with global means, which is exactly single-process
BatchNorm's gradient on the concatenated batch. In G the per-sample class-conditional gains and biases come after
this affine-free normalization and need no communication.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from hpc_gan.errors import UserError


def _world(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class _CrossReplicaNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, group: Optional[dist.ProcessGroup]):
        c = x.shape[1]
        xf = x.float()
        n_local = xf.numel() // c
        # Each rank's mean and variance in one stable pass, combined across ranks in double (Chan et al.): raw
        # sums of x and x^2 in fp32 cancel catastrophically where a channel's |mean| >> std (measured: a negative
        # variance at mean 30, std 0.01), which then normalizes by 1/sqrt(eps).
        var_l, mean_l = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
        mean_l, var_l = mean_l.double(), var_l.double()
        stats = torch.cat([mean_l * n_local, (var_l + mean_l * mean_l) * n_local,
                           torch.full((1,), float(n_local), dtype=torch.float64, device=x.device)])
        dist.all_reduce(stats, group=group)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)  # biased, as BN normalizes with
        invstd = torch.rsqrt(var + eps).float()
        mean = mean.float()
        x_hat = (xf - mean[None, :, None, None]) * invstd[None, :, None, None]
        ctx.save_for_backward(x_hat, invstd)
        ctx.group, ctx.n = group, n
        var, n = var.float(), n.float()
        ctx.mark_non_differentiable(mean, var, n)
        return x_hat.to(x.dtype), mean, var, n

    @staticmethod
    def backward(ctx, g: torch.Tensor, _gm, _gv, _gn):
        x_hat, invstd = ctx.saved_tensors
        gf = g.float()
        c = x_hat.shape[1]
        sums = torch.cat([gf.sum((0, 2, 3)), (gf * x_hat).sum((0, 2, 3))])
        dist.all_reduce(sums, group=ctx.group)
        mean_g, mean_gx = (sums[:c] / ctx.n).float(), (sums[c:] / ctx.n).float()
        dx = (gf - mean_g[None, :, None, None] - x_hat * mean_gx[None, :, None, None]) * invstd[None, :, None, None]
        return dx.to(g.dtype), None, None


class CrossReplicaBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics span the ranks of ``group`` (None: the default group when
    one is initialized, else this process only). Same parameters and buffers as nn.BatchNorm2d, so checkpoints,
    standing statistics and eval mode are unchanged; running statistics are identical on every rank."""

    def __init__(self, *args, group: Optional[dist.ProcessGroup] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world(self.group) == 1:
            return super().forward(x)
        y, mean, var, n = _CrossReplicaNorm.apply(x, self.eps, self.group)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                mom = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), mom)
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), mom)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_cross_replica_bn(module: nn.Module, group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Replace every BatchNorm2d of ``module`` (in place) by a CrossReplicaBatchNorm2d that holds the very same
    parameter and buffer tensors, so optimizers, the EMA and anything else referencing them stay valid."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = CrossReplicaBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats, group=group, device="meta")
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                setattr(new, key, getattr(child, key))
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_cross_replica_bn(child, group)
    return module


def bn_process_group(group_size: int, rank: int, world: int, dedicated: bool = True
                     ) -> Optional[dist.ProcessGroup]:
    """BN over groups of ``group_size`` consecutive ranks (0 or >= world: all ranks). Every rank must call this, since
    new_group is collective. ``dedicated``: all ranks get a communicator of their own rather than the default group
    (which carries DDP's gradient buckets: a BN all-reduce in G's backward would queue behind them)."""
    if group_size <= 0 or group_size >= world:
        return dist.new_group(list(range(world))) if dedicated else None
    if world % group_size:
        raise UserError(f"dist.bn_group_size={group_size} does not divide the world size {world}")
    mine = None
    for start in range(0, world, group_size):
        g = dist.new_group(list(range(start, start + group_size)))
        if start <= rank < start + group_size:
            mine = g
    return mine


def average_running_stats(module: nn.Module) -> None:
    """All-reduce-average BN running statistics (used where BN is per rank, before checkpoints), so every rank
    holds the same buffers."""
    if _world(None) == 1:
        return
    bufs = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var) if b is not None]
    if not bufs:
        return
    flat = torch.cat([b.flatten().double() for b in bufs])
    dist.all_reduce(flat)
    flat /= _world(None)
    torch._foreach_copy_(bufs, [v.view_as(b) for v, b in zip(flat.split([b.numel() for b in bufs]), bufs)])
