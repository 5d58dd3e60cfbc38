"""Conditioning losses, all with one interface: ``cond_loss(method, out, labels, cfg)`` where ``out`` is D's dict.

- d2d_ce: ReACGAN's Data-to-Data Cross-Entropy (kernels.d2d_ce) on (embed, proxy).
- 2c: ContraGAN's conditional contrastive loss on (embed, proxy): positives in the numerator include the other
  samples of the same class, the denominator all other samples (false negatives included).
- ac: cross-entropy of ``cls_logits`` (ACGAN).
- mh: multi-class hinge (Crammer-Singer) of ``cls_logits``, margin 1 (the MH-GAN classifier objective).
- pd / none: the projection is already in ``adv``; zero.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import kernels


def contrastive_2c(embed: torch.Tensor, proxy: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    f = F.normalize(embed.float(), dim=1)
    v = F.normalize(proxy.float(), dim=1)
    n = f.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=f.device)
    sim = (f @ f.t() / temperature).masked_fill(eye, float("-inf"))
    pos_proxy = (f * v).sum(1, keepdim=True) / temperature
    same = (labels[:, None] == labels[None, :]) & ~eye
    numer = torch.logsumexp(torch.cat([pos_proxy, sim.masked_fill(~same, float("-inf"))], 1), dim=1)
    denom = torch.logsumexp(torch.cat([pos_proxy, sim], 1), dim=1)
    return (denom - numer).mean()


def multi_hinge(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    target = logits.gather(1, labels[:, None])
    others = logits.float().scatter(1, labels[:, None], float("-inf"))
    return F.relu(1.0 + others.max(dim=1, keepdim=True).values - target.float()).mean()


Negatives = Callable[[torch.Tensor, torch.Tensor], Tuple[Tuple[torch.Tensor, torch.Tensor], int]]


def cond_loss(method: str, out: Dict[str, torch.Tensor], labels: torch.Tensor, loss_cfg: Any,
              negatives: Optional[Negatives] = None) -> torch.Tensor:
    """Conditioning loss of D's output dict ``out`` for ``labels``; ``loss_cfg`` is the config's loss section.
    ``negatives(embed, labels) -> ((embed_all, labels_all), row_offset)`` supplies D2D-CE's columns from the whole
    global batch (hpc_gan.dist.gather.gather_negatives); None: this batch's rows only."""
    if method == "d2d_ce":
        cols, offset = negatives(out["embed"], labels) if negatives is not None else (None, 0)
        return kernels.d2d_ce(out["embed"], out["proxy"], labels, loss_cfg.temperature, loss_cfg.m_p, loss_cfg.m_n,
                              mode=loss_cfg.d2d_mode, backend=loss_cfg.backend, negatives=cols, row_offset=offset)
    if method == "2c":
        return contrastive_2c(out["embed"], out["proxy"], labels, loss_cfg.temperature)
    if method == "ac":
        return F.cross_entropy(out["cls_logits"].float(), labels)
    if method == "mh":
        return multi_hinge(out["cls_logits"], labels)
    if method in ("pd", "none"):
        return out["adv"].new_zeros(())
    raise ValueError(f"conditioning method {method!r} is unknown")

