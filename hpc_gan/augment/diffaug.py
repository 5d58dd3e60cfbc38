"""DiffAugment (Zhao et al. 2020): colour, translation and cutout applied identically to real and fake images
before D, differentiable w.r.t. the images so G's gradient passes through. Randomness comes from an explicit
generator, so a step's augmentation is a function of (seed, step) and resumes exactly."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _rand(x: torch.Tensor, g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(x.shape[0], *shape, device=x.device, generator=g, dtype=x.dtype)


def color(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = x + (_rand(x, g, 1, 1, 1) - 0.5)                                           # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(x, g, 1, 1, 1) * 2.0) + mean                          # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, g, 1, 1, 1) + 0.5) + mean                       # contrast


def translation(x: torch.Tensor, g: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ratio x size pixels, filling with zeros."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device, generator=g)
    dx = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device, generator=g)
    ys = torch.arange(h, device=x.device)[None, :, None] - dy                     # source row of each output row
    xs = torch.arange(w, device=x.device)[None, None, :] - dx
    valid = ((ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)).to(x.dtype)[:, None]
    idx = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)).reshape(n, 1, h * w).expand(-1, x.shape[1], -1)
    return x.flatten(2).gather(2, idx).view_as(x) * valid


def cutout(x: torch.Tensor, g: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zero one square of side ratio x size at a random position per image."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h, (n, 1, 1), device=x.device, generator=g) - ch // 2   # square centred anywhere
    left = torch.randint(0, w, (n, 1, 1), device=x.device, generator=g) - cw // 2
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
    return x * (~inside).to(x.dtype)[:, None]


POLICIES = {"color": color, "translation": translation, "cutout": cutout}


def diff_augment(x: torch.Tensor, policies: Sequence[str], g: torch.Generator) -> torch.Tensor:
    for name in policies:
        x = POLICIES[name](x, g)
    return x


def consistency_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The augmentation of consistency regularization (Zhang et al. 2020): random flip and a small translation."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=g) < 0.5
    x = torch.where(flip, x.flip(3), x)
    return translation(x, g, ratio=0.125)
