"""D's output heads. D returns a dict that the losses consume (StudioGAN's habit):

- ``adv`` (N,): the adversarial score, always; for ``pd`` the projection term <embed(y), h> is folded in.
- ``h`` (N, C): pooled features entering the heads (ReACGAN's Fig. 2 logs their norm).
- ``embed`` (N, d) and ``proxy`` (N, d): linear head P on h and the class embedding of y (``d2d_ce``, ``2c``).
- ``cls_logits`` (N, K): a class-logit head (``ac``, ``mh``).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from hpc_gan.models.layers import SNEmbedding

COND_METHODS = ("d2d_ce", "2c", "ac", "mh", "pd", "none")


class ConditioningHead(nn.Module):
    def __init__(self, feat: int, n_classes: int, cond: str, embed_dim: int, which_linear: Callable[..., nn.Module],
                 sn_eps: float) -> None:
        super().__init__()
        if cond not in COND_METHODS:
            raise ValueError(f"conditioning method {cond!r} is not one of {COND_METHODS}")
        self.cond = cond
        self.adv = which_linear(feat, 1)
        if cond == "pd":
            self.class_embed = SNEmbedding(n_classes, feat, sn_eps=sn_eps)
        elif cond in ("d2d_ce", "2c"):
            self.linear_p = which_linear(feat, embed_dim)
            self.proxy = SNEmbedding(n_classes, embed_dim, sn_eps=sn_eps)
        elif cond in ("ac", "mh"):
            self.classifier = which_linear(feat, n_classes)

    def cond_parameters(self) -> list:
        """Weights of the conditioning head, whose gradient norm ReACGAN's Fig. 2(b) tracks."""
        return [p for name, p in self.named_parameters() if not name.startswith("adv.")]

    def forward(self, h: torch.Tensor, y: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = {"h": h, "adv": self.adv(h).squeeze(1)}
        if self.cond == "pd":
            if y is None:
                raise ValueError("a projection discriminator needs labels y")
            out["adv"] = out["adv"] + (self.class_embed(y) * h).sum(1)
        elif self.cond in ("d2d_ce", "2c"):
            out["embed"] = self.linear_p(h)
            if y is not None:
                out["proxy"] = self.proxy(y)
        elif self.cond in ("ac", "mh"):
            out["cls_logits"] = self.classifier(h)
        return out
