"""D's output heads. D returns a dict that the losses consume (StudioGAN's habit):

- ``adv`` (N,): the adversarial score, always; for ``pd`` the projection term <embed(y), h> is folded in.
- ``h`` (N, C): pooled features entering the heads (ReACGAN's Fig. 2 logs their norm).
- ``embed`` (N, d) and ``proxy`` (N, d): linear head P on h and the class embedding of y (``d2d_ce``, ``2c``).
- ``cls_logits`` (N, K): a class-logit head (``ac``, ``mh``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from hpc_gan.config import CONDITIONING
from hpc_gan.models.layers import SNEmbedding


class ConditioningHead(nn.Module):
    def __init__(self, feat: int, n_classes: int, cond: str, embed_dim: int, which_linear: Callable[..., nn.Module],
                 sn_eps: float) -> None:
        super().__init__()
        if cond not in CONDITIONING:
            raise ValueError(f"conditioning method {cond!r} is not one of {tuple(CONDITIONING)}")
        self.kind = CONDITIONING[cond].head
        self.adv = which_linear(feat, 1)
        if self.kind == "projection":
            self.class_embed = SNEmbedding(n_classes, feat, sn_eps=sn_eps)
        elif self.kind == "embedding":
            self.linear_p = which_linear(feat, embed_dim)
            self.proxy = SNEmbedding(n_classes, embed_dim, sn_eps=sn_eps)
        elif self.kind == "classifier":
            self.classifier = which_linear(feat, n_classes, bias=False)  # as StudioGAN's AC head

    def cond_parameter_names(self) -> List[str]:
        """Names of the conditioning head's weights (all but the adversarial linear layer), whose gradient norm
        ReACGAN's Fig. 2(b) tracks."""
        return [name for name, _ in self.named_parameters() if not name.startswith("adv.")]

    def forward(self, h: torch.Tensor, y: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = {"h": h, "adv": self.adv(h).squeeze(1)}
        if self.kind == "projection":
            if y is None:
                raise ValueError("a projection discriminator needs labels y")
            out["adv"] = out["adv"] + (self.class_embed(y) * h).sum(1)
        elif self.kind == "embedding":
            out["embed"] = self.linear_p(h)
            if y is not None:
                out["proxy"] = self.proxy(y)
        elif self.kind == "classifier":
            out["cls_logits"] = self.classifier(h)
        return out


class NamedBatch:
    """Named parts of one D forward (e.g. real, fake, consistency), concatenated in the given order; D's output dict
    on the concatenation is split back by name, so no caller does index arithmetic."""

    def __init__(self, **parts: Tuple[torch.Tensor, torch.Tensor]) -> None:
        self.sizes = {name: x.shape[0] for name, (x, _) in parts.items()}
        self.images = torch.cat([x for x, _ in parts.values()])
        self.labels = torch.cat([y for _, y in parts.values()])

    def split(self, out: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
        """{part name: {output key: that part's rows}}."""
        names, sizes = list(self.sizes), list(self.sizes.values())
        pieces = {key: value.split(sizes) for key, value in out.items()}
        return {name: {key: pieces[key][i] for key in out} for i, name in enumerate(names)}
