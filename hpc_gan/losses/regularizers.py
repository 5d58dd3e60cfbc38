"""BigGAN's orthogonal regularization in its off-diagonal form (Brock et al. 2019, Eq. 3)."""
from __future__ import annotations

from typing import Iterable

import torch


def orthogonal_reg(weights: Iterable[torch.Tensor], beta: float) -> torch.Tensor:
    """beta * sum_W ||W W^T * (1 - I)||_F^2 with W the (out, fan_in) view: pairwise filter similarities are pushed
    to zero, filter norms are left free."""
    total = None
    for w in weights:
        w = w.reshape(w.shape[0], -1)
        gram = w @ w.t()
        off = gram - torch.diag_embed(torch.diagonal(gram))
        term = (off ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("orthogonal_reg: no weights given")
    return beta * total


def ortho_weights(model: torch.nn.Module) -> list:
    """The weights BigGAN regularizes: every conv/linear weight of G, not the shared class embedding, biases or
    BN parameters."""
    return [p for name, p in model.named_parameters()
            if p.dim() >= 2 and not name.startswith("shared.")]
