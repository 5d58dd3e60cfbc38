"""Conditioning losses, all with one interface: ``cond_loss(method, out, labels, cfg)`` where ``out`` is D's dict.
:data:`COND_LOSSES` registers one function per method that has a loss (``config.CONDITIONING[m].has_loss``):

- d2d_ce: ReACGAN's Data-to-Data Cross-Entropy (kernels.d2d_ce) on (embed, proxy).
- 2c: ContraGAN's conditional contrastive loss on (embed, proxy): positives in the numerator include the other
  samples of the same class, the denominator all other samples (false negatives included).
- ac: cross-entropy of ``cls_logits`` (ACGAN).
- mh: multi-class hinge (Crammer-Singer) of ``cls_logits``, margin 1 (the MH-GAN classifier objective).

pd (its projection term is already in ``adv``) and none have no loss of their own.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import kernels
from hpc_gan.config import CONDITIONING


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


def _d2d_ce(out: Dict[str, torch.Tensor], labels: torch.Tensor, lc: Any, negatives: Optional[Negatives]
            ) -> torch.Tensor:
    cols, offset = negatives(out["embed"], labels) if negatives is not None else (None, 0)
    return kernels.d2d_ce(out["embed"], out["proxy"], labels, lc.temperature, lc.m_p, lc.m_n, mode=lc.d2d_mode,
                          backend=lc.backend, negatives=cols, row_offset=offset)


COND_LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "d2d_ce": _d2d_ce,
    "2c": lambda out, labels, lc, negatives: contrastive_2c(out["embed"], out["proxy"], labels, lc.temperature),
    "ac": lambda out, labels, lc, negatives: F.cross_entropy(out["cls_logits"].float(), labels),
    "mh": lambda out, labels, lc, negatives: multi_hinge(out["cls_logits"], labels),
}
if set(COND_LOSSES) != {m for m, c in CONDITIONING.items() if c.has_loss}:
    raise ImportError("losses.conditioning.COND_LOSSES must register exactly the methods that config.CONDITIONING "
                      "says have a loss")


def has_cond_loss(method: str) -> bool:
    """Whether a conditioning method adds a loss of its own (weighted by cond_lambda_d / cond_lambda_g)."""
    return CONDITIONING[method].has_loss


def cond_loss(method: str, out: Dict[str, torch.Tensor], labels: torch.Tensor, loss_cfg: Any,
              negatives: Optional[Negatives] = None) -> torch.Tensor:
    """Conditioning loss of D's output dict ``out`` for ``labels``; ``loss_cfg`` is the config's loss section.
    ``negatives(embed, labels) -> ((embed_all, labels_all), row_offset)`` supplies D2D-CE's columns from the whole
    global batch (hpc_gan.dist.gather.gather_negatives); None: this batch's rows only. Zero for a method without
    a loss of its own (pd, none)."""
    if not has_cond_loss(method):
        return out["adv"].new_zeros(())
    return COND_LOSSES[method](out, labels, loss_cfg, negatives)
