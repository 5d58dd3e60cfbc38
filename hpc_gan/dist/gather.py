"""All-gather with the backward a data-parallel loss needs (global negatives for D2D-CE).

Every rank computes the gradient of its own loss w.r.t. all gathered rows. The rows of rank r then need the sum of
those gradients over all ranks, and only rank r needs it: the backward is a reduce-scatter (sum), which moves half
the bytes of an all-reduce and lands each rank's slice directly. It runs in fp32 whatever the autocast dtype (a bf16
sum over 256 ranks loses the small terms). Data-parallel averaging of the parameter gradients then divides by W
once, giving the gradient of the mean loss over the global batch. (StudioGAN's GatherLayer returns only the local
gradient, which is the sum's 1/W share: too small by a factor W.)

``all_reduce=True`` is the reference twin of the backward: all-reduce the whole gradient and keep this rank's rows.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

# torch >= 2.13 names the single-tensor collectives *_single (the *_tensor names warn); older torch has only those
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_rows(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Rows of every rank concatenated in rank order, into one tensor (one collective, no per-rank list)."""
    x = x.contiguous()
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    _ALL_GATHER(out, x, group=group)
    return out


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Optional[dist.ProcessGroup], all_reduce: bool) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.n, ctx.all_reduce = group, dist.get_rank(group), x.shape[0], all_reduce
        return all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g32 = g.float().contiguous()  # a copy where g is not fp32: the collective writes no autograd buffer
        if ctx.all_reduce:
            g32 = g32.clone() if g32 is g else g32
            dist.all_reduce(g32, group=ctx.group)
            mine = g32[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]
        else:
            mine = g32.new_empty((ctx.n, *g32.shape[1:]))
            _REDUCE_SCATTER(mine, g32, op=dist.ReduceOp.SUM, group=ctx.group)
        return mine.to(g.dtype), None, None


def gather_rows(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None, all_reduce: bool = False
                ) -> torch.Tensor:
    """Rows of every rank concatenated in rank order (equal row counts), differentiable as described above."""
    return _GatherRows.apply(x, group, all_reduce)


def gather_negatives(embed: torch.Tensor, labels: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                     all_reduce: bool = False) -> Tuple[Tuple[torch.Tensor, torch.Tensor], int]:
    """((embed_all, labels_all), row_offset) for kernels.d2d_ce(negatives=..., row_offset=...)."""
    return ((gather_rows(embed, group, all_reduce), all_gather_rows(labels, group)),
            dist.get_rank(group) * embed.shape[0])
