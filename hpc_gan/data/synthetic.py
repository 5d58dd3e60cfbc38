"""The embedded demo data set: 10 classes of distinct shapes, generated in code (no download), each image with a
random foreground and background colour, size and position. Small enough to learn on a 2-core CPU in minutes and
structured enough that a classifier can tell whether G got the classes right."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from hpc_gan.errors import UserError

CLASS_NAMES = ("disk", "square", "ring", "plus", "x", "diamond", "triangle", "h-stripes", "v-stripes", "frame")


def _masks(dx: np.ndarray, dy: np.ndarray, s: np.ndarray) -> list:
    """Boolean masks (N, H, W) of every class; dx, dy are offsets from each shape's centre, s its half-size."""
    r = np.sqrt(dx ** 2 + dy ** 2)
    box = np.maximum(np.abs(dx), np.abs(dy))
    t = s / 3.0
    return [
        r < s,
        box < s,
        (r < s) & (r > 0.55 * s),
        ((np.abs(dx) < t) & (np.abs(dy) < s)) | ((np.abs(dy) < t) & (np.abs(dx) < s)),
        (np.abs(np.abs(dx) - np.abs(dy)) < t) & (box < s),
        np.abs(dx) + np.abs(dy) < s,
        (dy > -s) & (dy < s) & (np.abs(dx) < (dy + s) / 2.0),
        (box < s) & (np.floor((dy + s) / (s / 2.0)) % 2 == 0),
        (box < s) & (np.floor((dx + s) / (s / 2.0)) % 2 == 0),
        (box < s) & (box > 0.55 * s),
    ]


def make_synthetic(n: int, resolution: int, num_classes: int = 10, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, H, W, 3), labels int64 (n,)), balanced over classes, deterministic in ``seed``."""
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise UserError(f"the synthetic data set has at most {len(CLASS_NAMES)} classes; got data.num_classes="
                        f"{num_classes}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    res = resolution
    s = rng.uniform(0.28, 0.45, n)[:, None, None] * res
    cx = rng.uniform(0.0, 1.0, n)[:, None, None] * (res - 2 * s) + s
    cy = rng.uniform(0.0, 1.0, n)[:, None, None] * (res - 2 * s) + s
    grid = np.arange(res, dtype=np.float64) + 0.5
    dx = grid[None, None, :] - cx
    dy = grid[None, :, None] - cy
    masks = np.stack(_masks(dx, dy, s), axis=0)                      # (classes, n, H, W)
    mask = masks[labels, np.arange(n)]                               # (n, H, W)
    fg = rng.uniform(0, 255, (n, 3))
    bg = rng.uniform(0, 255, (n, 3))
    # Keep shapes visible: push the background away from the foreground where they are too close.
    close = np.abs(fg - bg).sum(1) < 200
    bg[close] = 255.0 - fg[close]
    img = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :])
    return img.round().astype(np.uint8), labels.astype(np.int64)
