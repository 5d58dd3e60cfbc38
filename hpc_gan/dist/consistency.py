"""Check that every rank holds the same networks (parameters and buffers): before each checkpoint and on demand.

Replicas drift apart silently when something rank-dependent sneaks into a step (an unsynchronized buffer, a
rank-seeded random draw); catching it at the checkpoint keeps a diverged state from being saved as if it were one."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn as nn


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    x = t.detach().double().flatten()
    w = torch.arange(x.numel(), device=x.device, dtype=torch.float64).remainder_(97).add_(1)
    return torch.stack([x.sum(), (x * w).sum()])  # order-sensitive, so a permutation is caught too


def check_replicas(modules: Dict[str, nn.Module]) -> None:
    """Raise RuntimeError naming the first tensor that differs between rank 0 and another rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    names: List[str] = []
    prints = []
    for tag, module in modules.items():
        for name, t in module.state_dict().items():
            if torch.is_tensor(t) and t.numel():
                names.append(f"{tag}.{name}")
                prints.append(_fingerprint(t))
    mine = torch.stack(prints)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    for r, theirs in enumerate(everyone[1:], start=1):
        bad = (theirs != everyone[0]).any(dim=1).nonzero()
        if len(bad):
            raise RuntimeError(f"replicas diverged: {names[int(bad[0])]} differs between rank 0 and rank {r} "
                               f"({len(bad)} tensors differ); not saving a checkpoint of a diverged state")
