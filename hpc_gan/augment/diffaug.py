"""DiffAugment (Zhao et al. 2020): colour, translation and cutout applied to D's inputs, differentiable w.r.t. the
images so G's gradient passes through; and the flip + translation of consistency regularization (Zhang et al. 2020).

Random parameters come from :class:`Draws`, which draws them for the whole global batch and hands each caller its
rows: a sample's augmentation depends on (seed, step, its index in the global batch) only, not on how the batch is
split over ranks and micro-batches, and a resumed run replays it exactly."""
from __future__ import annotations

from typing import Sequence

import torch

from hpc_gan.config import DIFFAUG_POLICIES
from hpc_gan.plan import StepPlan


class Draws:
    """Random numbers for the rows of one micro-batch of a global batch, from one generator: each call draws for all
    ``total`` samples and keeps rows [offset, offset + n)."""

    def __init__(self, generator: torch.Generator, offset: int, n: int, total: int) -> None:
        if not (0 <= offset and offset + n <= total):
            raise ValueError(f"rows {offset}..{offset + n} are outside a global batch of {total}")
        self.g, self.device = generator, generator.device
        self.offset, self.n, self.total = offset, n, total

    @classmethod
    def micro_batch(cls, generator: torch.Generator, plan: StepPlan, m: int) -> "Draws":
        """The rows of this rank's micro-batch m of the plan's global batch."""
        return cls(generator, plan.offset(m), plan.micro, plan.batch)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.offset:self.offset + self.n]

    def rand(self, *shape: int) -> torch.Tensor:
        return self._rows(torch.rand(self.total, *shape, generator=self.g, device=self.device))

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        return self._rows(torch.randint(low, high, (self.total, *shape), generator=self.g, device=self.device))


def color(x: torch.Tensor, d: Draws) -> torch.Tensor:
    x = x + (d.rand(1, 1, 1).to(x.dtype) - 0.5)                                    # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (d.rand(1, 1, 1).to(x.dtype) * 2.0) + mean                    # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (d.rand(1, 1, 1).to(x.dtype) + 0.5) + mean                 # contrast


def translation(x: torch.Tensor, d: Draws, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ratio x size pixels, filling with zeros."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = d.randint(-sh, sh + 1, 1, 1)
    dx = d.randint(-sw, sw + 1, 1, 1)
    ys = torch.arange(h, device=x.device)[None, :, None] - dy                     # source row of each output row
    xs = torch.arange(w, device=x.device)[None, None, :] - dx
    valid = ((ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)).to(x.dtype)[:, None]
    idx = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)).reshape(n, 1, h * w).expand(-1, x.shape[1], -1)
    return x.flatten(2).gather(2, idx).view_as(x) * valid


def cutout(x: torch.Tensor, d: Draws, ratio: float = 0.5) -> torch.Tensor:
    """Zero one square of side ratio x size, centred anywhere in the image (clipped at the border)."""
    _, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = d.randint(0, h, 1, 1) - ch // 2
    left = d.randint(0, w, 1, 1) - cw // 2
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
    return x * (~inside).to(x.dtype)[:, None]


POLICIES = {"color": color, "translation": translation, "cutout": cutout}
assert tuple(POLICIES) == DIFFAUG_POLICIES, "config.DIFFAUG_POLICIES names the functions of this table"


def diff_augment(x: torch.Tensor, policies: Sequence[str], d: Draws) -> torch.Tensor:
    for name in policies:
        x = POLICIES[name](x, d)
    return x


def consistency_augment(x: torch.Tensor, d: Draws) -> torch.Tensor:
    """Random horizontal flip and a translation of up to 1/8 of the size."""
    flip = d.rand(1, 1, 1) < 0.5
    x = torch.where(flip, x.flip(3), x)
    return translation(x, d, ratio=0.125)
