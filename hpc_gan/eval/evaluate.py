"""Distributed evaluation: features of G_ema samples and of the data set, sharded over ranks, and the metrics.

Samples are drawn in chunks whose z and labels come from the run's evaluation stream of that chunk index
(hpc_gan.plan.RandomStreams.eval_chunk); rank r computes chunks r, r + W, ...
and the features are gathered back in chunk order, so the sample set (and every statistic) is the same whatever the
world size. Reference statistics are computed once per (data set, split, resolution, resizer, backbone, n) and
cached as .npz.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from hpc_gan.config import METRICS, comma_list
from hpc_gan.data import InMemoryDataset
from hpc_gan.eval import metrics as M
from hpc_gan.eval.sampling import truncated_normal
from hpc_gan.plan import RandomStreams


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_chunks(local: List[torch.Tensor], n_chunks: int) -> torch.Tensor:
    """Concatenate float64 (rows, width) chunk results computed round-robin over ranks back in chunk order (all
    ranks get all). A rank may hold fewer chunks, or none."""
    rank, world = _world()
    if world == 1:
        return torch.cat(local)
    per_rank = math.ceil(n_chunks / world)
    # [width, rows of chunk 0, rows of chunk 1, ...] of every rank (a rank without chunks does not know the width)
    meta = torch.tensor([local[0].shape[1] if local else 0] + [t.shape[0] for t in local]
                        + [0] * (per_rank - len(local)))
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta)
    width = max(int(m[0]) for m in metas)
    rows = [m[1:] for m in metas]
    padded = torch.zeros(max(int(r.sum()) for r in rows), width, dtype=torch.float64)
    mine = torch.cat(local) if local else padded[:0]
    padded[:mine.shape[0]] = mine
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = []
    for k in range(n_chunks):
        r, j = k % world, k // world
        start = int(rows[r][:j].sum())
        out.append(parts[r][start:start + int(rows[r][j])])
    return torch.cat(out)


@torch.no_grad()
def sample_features(G: nn.Module, backbone: nn.Module, n: int, num_classes: int, z_dim: int, streams: RandomStreams,
                    truncation: float = 0.0, batch: int = 100, device: torch.device = torch.device("cpu")
                    ) -> Dict[str, np.ndarray]:
    """Backbone features and class probabilities of n G samples (uniform labels), sharded over the ranks."""
    rank, world = _world()
    n_chunks = math.ceil(n / batch)
    pools, probs = [], []
    for k in range(rank, n_chunks, world):
        m = min(batch, n - k * batch)
        g = streams.eval_chunk(k, device)
        z = truncated_normal(m, z_dim, truncation, g, device)
        y = torch.randint(0, num_classes, (m,), generator=g, device=device)
        out = backbone(G(z, y).float().clamp(-1, 1))
        pools.append(out["pool"].double().cpu())
        probs.append(torch.softmax(out["logits"].double(), 1).cpu())
    return {"pool": _gather_chunks(pools, n_chunks).numpy(), "probs": _gather_chunks(probs, n_chunks).numpy()}


@torch.no_grad()
def dataset_features(dataset: Any, backbone: nn.Module, n: int, batch: int = 100,
                     device: torch.device = torch.device("cpu")) -> np.ndarray:
    """Backbone features of the first n images of the data set (in index order), sharded over the ranks."""
    rank, world = _world()
    n = min(n, len(dataset))
    n_chunks = math.ceil(n / batch)
    pools = []
    for k in range(rank, n_chunks, world):
        idx = range(k * batch, min(n, (k + 1) * batch))
        if isinstance(dataset, InMemoryDataset):
            x, _ = dataset.gather(torch.as_tensor(list(idx)))
        else:
            x = torch.stack([dataset[i][0] for i in idx])
        x = x.to(device).float().div(127.5).sub(1.0)
        pools.append(backbone(x)["pool"].double().cpu())
    return _gather_chunks(pools, n_chunks).numpy()


def reference_key(data_cfg: Any, resolution: int, backbone_name: str, n: int, split: str = "train") -> str:
    path = str(Path(data_cfg.path).resolve()) if data_cfg.path else ""
    desc = {"data": data_cfg.name, "path": path, "synthetic_size": data_cfg.synthetic_size, "split": split,
            "resolution": resolution, "resizer": "bilinear", "backbone": backbone_name, "n": n}
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def reference_stats(dataset: Any, data_cfg: Any, resolution: int, backbone: nn.Module, n: int, cache_dir: str,
                    device: torch.device = torch.device("cpu"), log: Callable[[str], None] = print
                    ) -> Dict[str, np.ndarray]:
    """(mu, sigma, features) of the data set, from the cache or computed (sharded) and cached by rank 0."""
    rank, world = _world()
    cache = Path(os.path.expanduser(cache_dir)) / f"ref-{reference_key(data_cfg, resolution, backbone.name, n)}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in ("mu", "sigma", "features")}
    log(f"eval: computing reference statistics of {min(n, len(dataset))} real images ({backbone.name}) -> {cache}")
    feats = dataset_features(dataset, backbone, n, device=device)
    mu, sigma = M.feature_stats(feats)
    if rank == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma, features=feats.astype(np.float32))
        os.replace(tmp, cache)
    if world > 1:
        dist.barrier()
    return {"mu": mu, "sigma": sigma, "features": feats}


def compute_metrics(fake: Dict[str, np.ndarray], ref: Dict[str, np.ndarray], which: Sequence[str],
                    prdc_n: int = 10000) -> Dict[str, float]:
    unknown = [m for m in which if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    out: Dict[str, float] = {}
    if "fid" in which:
        mu, sigma = M.feature_stats(fake["pool"])
        out["fid"] = M.frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    if "is" in which:
        out["is"], out["is_std"] = M.inception_score(fake["probs"], splits=10)
        out["is_1split"] = M.inception_score(fake["probs"], splits=1)[0]
    if "prd" in which:
        k = min(prdc_n, len(ref["features"]), len(fake["pool"]))
        out.update(M.prd(ref["features"][:k], fake["pool"][:k]))
    if "prdc" in which:
        k = min(prdc_n, len(ref["features"]), len(fake["pool"]))
        out.update(M.prdc(ref["features"][:k], fake["pool"][:k], k=5))
    return out


def evaluate_generator(G: nn.Module, backbone: nn.Module, ref: Dict[str, np.ndarray], which: Sequence[str], n: int,
                       num_classes: int, z_dim: int, streams: RandomStreams, truncation: float,
                       device: torch.device, batch: int = 100) -> Dict[str, float]:
    fake = sample_features(G, backbone, n, num_classes, z_dim, streams, truncation, batch, device)
    return compute_metrics(fake, ref, which)


def truncation_sweep(G: nn.Module, backbone: nn.Module, ref: Dict[str, np.ndarray], thresholds: Sequence[float],
                     n: int, num_classes: int, z_dim: int, streams: RandomStreams, device: torch.device,
                     out_dir: Optional[Path] = None) -> List[Dict[str, float]]:
    """IS and FID per truncation threshold (BigGAN Fig. 17); JSON + PNG plot written by rank 0 to out_dir."""
    rows = []
    for t in thresholds:
        r = evaluate_generator(G, backbone, ref, ("fid", "is"), n, num_classes, z_dim, streams, t, device)
        rows.append({"truncation": t, **r})
    if out_dir is not None and _world()[0] == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "truncation-sweep.json").write_text(json.dumps(rows, indent=1))
        from hpc_gan.eval.plots import plot_truncation_sweep
        plot_truncation_sweep(rows, out_dir / "truncation-sweep.png")
    return rows


class RunEvaluator:
    """The metrics of a config's ``eval`` section for generators of one run (backbone and reference statistics
    built once, on first use). Collective when distributed: every rank calls it."""

    def __init__(self, cfg: Any, dataset: Any, device: torch.device, log: Callable[[str], None] = print) -> None:
        self.cfg, self.dataset, self.device, self.log = cfg, dataset, device, log
        self.which = comma_list(cfg.eval.metrics)
        self.streams = RandomStreams(cfg.train.seed)
        self.backbone: Optional[nn.Module] = None
        self.ref: Optional[Dict[str, np.ndarray]] = None

    def _setup(self) -> None:
        if self.backbone is None:
            from hpc_gan.eval.backbones import build_backbone
            e = self.cfg.eval
            self.backbone = build_backbone(e.backbone, e.inception_path or None, self.device)
            self.ref = reference_stats(self.dataset, self.cfg.data, self.cfg.model.resolution, self.backbone,
                                       e.ref_n, e.ref_cache, self.device, self.log)

    def __call__(self, G: nn.Module, truncation: Optional[float] = None, n: Optional[int] = None,
                 which: Optional[Sequence[str]] = None) -> Dict[str, float]:
        self._setup()
        e, c = self.cfg.eval, self.cfg
        t = e.truncation if truncation is None else truncation
        return evaluate_generator(G, self.backbone, self.ref, which or self.which, n or e.n, c.data.num_classes,
                                  c.model.z_dim, self.streams, t, self.device, e.batch)

    def sweep(self, G: nn.Module, thresholds: Sequence[float], out_dir: Optional[Path], n: Optional[int] = None
              ) -> List[Dict[str, float]]:
        self._setup()
        c = self.cfg
        return truncation_sweep(G, self.backbone, self.ref, thresholds, n or c.eval.n, c.data.num_classes,
                                c.model.z_dim, self.streams, self.device, out_dir)
