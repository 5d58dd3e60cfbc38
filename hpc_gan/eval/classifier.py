"""A small CNN classifier of the training data, used to tell whether G draws the class it was asked for: the
accuracy of its predictions on generated samples (chance = 1 / classes at step 0). Meant for the demo and small
data sets, not as a metric to compare with papers."""
from __future__ import annotations

import time
from typing import Callable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallClassifier(nn.Module):
    def __init__(self, n_classes: int, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, n_classes: int, generator: torch.Generator,
                     init_seed: int, epochs: int = 2, batch: int = 128) -> Tuple[nn.Module, float, float]:
    """Train on uint8 NCHW images (held-out split and order from ``generator``, initial weights from
    ``init_seed``); returns (model in eval mode, held-out accuracy, seconds)."""
    t0 = time.perf_counter()
    g = generator
    x = images.float() / 127.5 - 1.0
    n_val = max(len(x) // 10, 1)
    perm = torch.randperm(len(x), generator=g)
    val, tr = perm[:n_val], perm[n_val:]
    torch.manual_seed(init_seed)
    model = SmallClassifier(n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        order = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[val]).argmax(1) == labels[val]).float().mean().item()
    return model, acc, time.perf_counter() - t0


@torch.no_grad()
def sample_scores(classifier: nn.Module, sample: Callable[[torch.Tensor], torch.Tensor], n_classes: int,
                  per_class: int) -> Tuple[float, float]:
    """(accuracy, within-class diversity) of ``per_class`` generated samples of each class: the fraction that the
    classifier assigns to the class they were generated for, and the per-pixel standard deviation over a class's
    samples, averaged over pixels and classes (0 when G draws one image per class; ~0.58 on the demo's real data)."""
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = sample(y).float().cpu()
    accuracy = (classifier(x).argmax(1) == y).float().mean().item()
    diversity = x.reshape(n_classes, per_class, -1).std(dim=1).mean().item()
    return accuracy, diversity
