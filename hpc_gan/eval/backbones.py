"""Feature extractors for the metrics, one interface: ``backbone(images in [-1, 1] NCHW) -> {"pool": (N, D),
"logits": (N, C)}`` plus ``name`` (part of the reference-statistics cache key).

- ``inception``: Inception-v3 as the standard GAN metrics use it, with the TF-ported weights
  ``pt_inception-2015-12-05-6726825d.pth`` of pytorch-fid / torch-fidelity / StudioGAN (the FID variants of the
  Mixed blocks: average pools that do not count padding, a max pool in the last block; 1008 logits). Written here
  (torchvision is not a dependency); the weights come from ``eval.inception_path``, $HPC_GAN_INCEPTION, or a one-time
  download verified against its SHA-256 prefix.
- ``tiny``: a small conv net with fixed seeded weights, for tests and the CPU demo (numbers are not comparable with
  published ones).
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpc_gan.config import choices
from hpc_gan.errors import UserError

INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"


class _Conv(nn.Module):
    def __init__(self, cin: int, cout: int, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # the TF graph's pooling


class _A(nn.Module):
    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, kernel_size=1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, kernel_size=1), _Conv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _Conv(cin, pool, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg(x))], 1)


class _B(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _C(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7_2 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x))], 1)


class _D(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, kernel_size=1), _Conv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = _Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)


class _E(nn.Module):
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool  # the last block of the TF graph pools with max, not average
        self.branch1x1 = _Conv(cin, 320, kernel_size=1)
        self.branch3x3_1 = _Conv(cin, 384, kernel_size=1)
        self.branch3x3_2a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


class InceptionV3FID(nn.Module):
    """Inception-v3 of the FID / IS literature: 299x299 bilinear resize, 2048-d pool features, 1008 logits."""

    name = "inception-v3-pt_inception-2015-12-05"

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _A(192, 32), _A(256, 64), _A(288, 64)
        self.Mixed_6a = _B(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = _C(768, 128), _C(768, 160), _C(768, 160), \
            _C(768, 192)
        self.Mixed_7a = _D(768)
        self.Mixed_7b, self.Mixed_7c = _E(1280, max_pool=False), _E(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)  # input in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return {"pool": pool, "logits": self.fc(pool)}


class TinyBackbone(nn.Module):
    """Fixed random conv features (seeded): deterministic, fast, for tests and the demo only."""

    name = "tiny-seed0"

    def __init__(self, dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 32, 3, 2, 1), nn.Conv2d(32, dim, 3, 2, 1)
        self.fc = nn.Linear(dim, classes)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = F.interpolate(x.float(), size=(32, 32), mode="bilinear", align_corners=False)
        pool = F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3))
        return {"pool": pool, "logits": self.fc(pool)}


def sha256_prefix_ok(path: Path, prefix: str = INCEPTION_SHA256_PREFIX) -> bool:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest().startswith(prefix)


def _inception_weights(path: Optional[str]) -> Path:
    path = path or os.environ.get("HPC_GAN_INCEPTION")
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"Inception weights {p} do not exist; set eval.inception_path (or HPC_GAN_INCEPTION) "
                            f"to pt_inception-2015-12-05-6726825d.pth from {INCEPTION_URL}")
        if not sha256_prefix_ok(p):
            raise UserError(f"{p} does not have the SHA-256 prefix {INCEPTION_SHA256_PREFIX} of "
                            f"pt_inception-2015-12-05; download it again from {INCEPTION_URL}")
        return p
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hpc-gan" / Path(INCEPTION_URL).name
    if cache.is_file() and sha256_prefix_ok(cache):
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".part")
    try:
        urllib.request.urlretrieve(INCEPTION_URL, tmp)
    except OSError as e:
        raise UserError(f"Inception weights are not here and cannot be downloaded ({e}); fetch {INCEPTION_URL} "
                        f"on a machine with internet and set eval.inception_path or HPC_GAN_INCEPTION") from None
    if not sha256_prefix_ok(tmp):
        tmp.unlink()
        raise UserError(f"the download of {INCEPTION_URL} failed its SHA-256 check; try again")
    tmp.replace(cache)
    return cache


def build_backbone(name: str, inception_path: Optional[str] = None, device: torch.device = torch.device("cpu")
                   ) -> nn.Module:
    if name == "tiny":
        return TinyBackbone().to(device).eval().requires_grad_(False)
    if name == "inception":
        net = InceptionV3FID()
        net.load_state_dict(torch.load(_inception_weights(inception_path), map_location="cpu"))
        return net.to(device).eval().requires_grad_(False)
    raise UserError(f"eval.backbone={name!r} is not one of {', '.join(choices('eval.backbone'))}")
