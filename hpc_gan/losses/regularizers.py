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


@torch.no_grad()
def add_orthogonal_grad_(weights: Iterable[torch.Tensor], beta: float) -> torch.Tensor:
    """Add the gradient of ``orthogonal_reg(weights, beta)``, 4 beta (W W^T * (1 - I)) W, to each weight's .grad
    without autograd (a few ops per weight, no backward graph: BigGAN-PyTorch's way); returns the regularizer's
    value. For gradients that are complete and unscaled: after the (synchronized) backward, before the step."""
    grams = []
    for w in weights:
        m = w.view(w.shape[0], -1)
        gram = m @ m.t()
        gram.diagonal().zero_()
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        w.grad.view_as(m).addmm_(gram, m, alpha=4.0 * beta)
        grams.append(gram)
    if not grams:
        raise ValueError("add_orthogonal_grad_: no weights given")
    return beta * torch.stack(torch._foreach_norm(grams)).square().sum()


def ortho_weights(model: torch.nn.Module) -> list:
    """The weights BigGAN regularizes: every conv/linear weight of G, not the shared class embedding, biases or
    BN parameters."""
    return [p for name, p in model.named_parameters()
            if p.dim() >= 2 and not name.startswith("shared.")]
