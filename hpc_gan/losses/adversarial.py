"""Adversarial losses on D's ``adv`` scores: hinge (BigGAN, ReACGAN's default), non-saturating, least-squares and
Wasserstein (with the gradient penalty of Gulrajani et al.)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hpc_gan.config import choices


def d_adv_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """D's loss from its scores on real and fake images (both (N,))."""
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    if kind == "nonsaturating":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "least_squares":
        return 0.5 * ((real - 1.0) ** 2).mean() + 0.5 * (fake ** 2).mean()
    if kind == "wasserstein":
        return fake.mean() - real.mean()
    raise ValueError(f"adversarial loss {kind!r} is not one of {choices('loss.adv')}")


def g_adv_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """G's loss from D's scores on its fakes."""
    if kind in ("hinge", "wasserstein"):
        return -fake.mean()
    if kind == "nonsaturating":
        return F.softplus(-fake).mean()
    if kind == "least_squares":
        return 0.5 * ((fake - 1.0) ** 2).mean()
    raise ValueError(f"adversarial loss {kind!r} is not one of {choices('loss.adv')}")


def gradient_penalty(d_adv: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     alpha: torch.Tensor) -> torch.Tensor:
    """E[(||grad_x D(x_hat)|| - 1)^2] on interpolates x_hat = alpha * real + (1 - alpha) * fake (WGAN-GP);
    alpha (N, 1, 1, 1) uniform in [0, 1), drawn by the caller so it follows the step's seeding. D's
    self-attention runs scaled_dot_product_attention's math kernel here: the penalty is differentiated again,
    and the flash, memory-efficient and cuDNN kernels have no double backward."""
    x_hat = (alpha * real.detach() + (1.0 - alpha) * fake.detach()).requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        score = d_adv(x_hat).sum()
    (grad,) = torch.autograd.grad(score, x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()
