"""All-gather with the backward a data-parallel loss needs (global negatives for D2D-CE).

Every rank computes the gradient of its own loss w.r.t. all gathered rows. The rows of rank r then need the sum of
those gradients over all ranks: backward = all-reduce (sum) and keep this rank's slice. Data-parallel averaging of
the parameter gradients then divides by W once, giving the gradient of the mean loss over the global batch.
(StudioGAN's GatherLayer returns only the local gradient, which is the sum's 1/W share: too small by a factor W.)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def gather_rows(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Rows of every rank concatenated in rank order (equal row counts), differentiable as described above."""
    return _GatherRows.apply(x, group)


def gather_negatives(embed: torch.Tensor, labels: torch.Tensor, group: Optional[dist.ProcessGroup] = None
                     ) -> Tuple[Tuple[torch.Tensor, torch.Tensor], int]:
    """((embed_all, labels_all), row_offset) for kernels.d2d_ce(negatives=..., row_offset=...)."""
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, labels.contiguous(), group=group)
    return (gather_rows(embed, group), torch.cat(parts)), dist.get_rank(group) * embed.shape[0]
