"""Sampling from G: the truncation trick and sample sheets (one row per class, fixed z)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from PIL import Image


def truncated_normal(n: int, dim: int, threshold: float, generator: torch.Generator,
                     device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """z ~ N(0, I) with every entry of magnitude above ``threshold`` resampled (BigGAN's truncation trick);
    threshold 0 means no truncation."""
    z = torch.randn(n, dim, generator=generator, device=device)
    if threshold <= 0:
        return z
    for _ in range(1000):  # each round resamples a fraction ~P(|z|>t); 1000 rounds is far beyond need
        bad = z.abs() > threshold
        if not bool(bad.any()):
            return z
        z = torch.where(bad, torch.randn(n, dim, generator=generator, device=device), z)
    raise RuntimeError(f"truncation threshold {threshold} is too small to sample from")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW floats to uint8 NHWC."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, rows: int, pad: int = 1) -> np.ndarray:
    n, h, w, c = images.shape
    cols = -(-n // rows)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    return out


def sheet_classes(n_classes: int, max_rows: int = 16) -> list:
    """Classes shown on a sheet: all of them, or ``max_rows`` spread evenly over a large label set."""
    if n_classes <= max_rows:
        return list(range(n_classes))
    return [int(round(i * (n_classes - 1) / (max_rows - 1))) for i in range(max_rows)]


@torch.no_grad()
def sample_sheet(G: nn.Module, path: Union[str, Path], classes: Sequence[int], per_class: int, z_dim: int,
                 generator: torch.Generator, truncation: float = 0.0, batch: int = 256) -> Path:
    """A PNG with one row per class in ``classes`` and the same z (from ``generator``) in every row."""
    device = next(G.parameters()).device
    z = truncated_normal(per_class, z_dim, truncation, generator, device).repeat(len(classes), 1)
    y = torch.tensor(classes, device=device).repeat_interleave(per_class)
    imgs = torch.cat([G(z[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)])
    Image.fromarray(grid(to_uint8(imgs), rows=len(classes))).save(path)
    return Path(path)
