"""Exponential moving average of G's weights (kept in fp32) and BigGAN's standing statistics."""
from __future__ import annotations

import copy
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from hpc_gan.plan import RandomStreams


class EMA:
    """G_ema = decay * G_ema + (1 - decay) * G from ``start`` on; before it G_ema copies G. Buffers (BN running
    statistics, SN vectors) are copied, as BigGAN does. Follows the tensors of ``model`` as given here (optimizers
    and engines update them in place).

    Where the fp32 master weights are sharded (ZeRO), :meth:`follow_masters` makes each rank average only the
    master slices it owns: the EMA is taken of the fp32 masters, not of the engine's bf16 weights (at lr 5e-5 most
    updates are below one bf16 unit), and each rank does 1/W of the work. :meth:`synchronize` (collective) then
    assembles the whole EMA on every rank before anything reads it."""

    def __init__(self, model: nn.Module, decay: float, start: int) -> None:
        self.decay, self.start = decay, start
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._src = list(model.parameters())
        self._dst = list(self.model.parameters())
        self._src_buffers = list(model.buffers())
        self._dst_buffers = list(self.model.buffers())
        self._fragments: Optional[List[Tuple[int, int, torch.Tensor]]] = None
        self._frag_src: List[torch.Tensor] = []  # the fp32 master fragments, and the EMA slices (views) they
        self._frag_dst: List[torch.Tensor] = []  # average into: built once, not every step
        self.stale = False  # sharded updates not yet assembled

    def follow_masters(self, fragments: Optional[List[Tuple[int, int, torch.Tensor]]]) -> None:
        """Average these (parameter index, flat offset, fp32 master fragment) instead of the module's weights
        (None: keep following the weights). Parameter indices are in ``model.parameters()`` order."""
        self._fragments = fragments
        self._frag_src = [f for _, _, f in fragments or []]
        self._frag_dst = [self._dst[i].view(-1).narrow(0, start, f.numel()) for i, start, f in fragments or []]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after G's optimizer step ``step`` (1-based). A few foreach ops, whatever the number of tensors."""
        if self._fragments is not None:
            dst, src = self._frag_dst, self._frag_src
            self.stale = True
        else:
            # fp32 weights as they are: no cast dispatched per tensor and step
            dst, src = self._dst, [p if p.dtype == torch.float32 else p.float() for p in self._src]
        if dst and step < self.start:
            torch._foreach_copy_(dst, src)
        elif dst:
            torch._foreach_lerp_(dst, src, 1.0 - self.decay)
        if self._dst_buffers:
            torch._foreach_copy_(self._dst_buffers, self._src_buffers)

    @torch.no_grad()
    def synchronize(self) -> None:
        """Assemble the sharded EMA on every rank (collective; nothing to do unless sharded updates are pending):
        each rank writes the slices it owns into a zero vector and one all-reduce sums them (the slices of all ranks
        cover every element once)."""
        if not self.stale:
            return
        sizes = [p.numel() for p in self._dst]
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        flat = torch.zeros(sum(sizes), dtype=torch.float32, device=self._dst[0].device)
        for (i, start, frag), mine in zip(self._fragments or [], self._frag_dst):
            flat.narrow(0, offsets[i] + start, frag.numel()).copy_(mine)
        dist.all_reduce(flat)
        torch._foreach_copy_(self._dst, [v.view_as(p) for v, p in zip(flat.split(sizes), self._dst)])
        self.stale = False


@torch.no_grad()
def standing_stats(model: nn.Module, n_passes: int, sample_inputs: Callable[[int], tuple]) -> None:
    """Replace every BN's running statistics by the cumulative mean over ``n_passes`` forward passes of fresh
    inputs (BigGAN appendix C), so samples do not depend on the sampling batch. Only BN layers run in training mode;
    spectral-norm vectors are left as they are."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or n_passes <= 0:
        return
    was_training = model.training
    model.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    for i in range(n_passes):
        model(*sample_inputs(i))
    for m, mom in zip(bns, saved):
        m.momentum = mom
        m.eval()
    model.train(was_training)


def standing_stats_from_noise(model: nn.Module, n_passes: int, n_classes: int, z_dim: int,
                              generator: torch.Generator, batch: int = 64) -> None:
    """Standing statistics of a generator from ``n_passes`` batches of N(0, I) z and uniform labels drawn from
    ``generator`` (on the model's device)."""
    device = next(model.parameters()).device

    def inputs(_: int) -> tuple:
        return (torch.randn(batch, z_dim, generator=generator, device=device),
                torch.randint(0, n_classes, (batch,), generator=generator, device=device))

    standing_stats(model, n_passes, inputs)


def sampling_standing_stats(G: nn.Module, cfg: Any, n_passes: Optional[int] = None) -> None:
    """Standing statistics of a run's G_ema as every sampler of that run computes them (``train.standing_stats``
    passes unless ``n_passes``; the run's standing-statistics stream, so training, eval and the CLI agree)."""
    n = cfg.train.standing_stats if n_passes is None else n_passes
    gen = RandomStreams(cfg.train.seed).standing_stats(next(G.parameters()).device)
    standing_stats_from_noise(G, n, cfg.data.num_classes, cfg.model.z_dim, gen)
