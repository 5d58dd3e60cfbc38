"""GAN metrics from features, so any backbone works: FID, Inception Score, precision/recall as the ReACGAN paper
reports (Sajjadi et al. 2018: F8 ~ recall, F1/8 ~ precision) and improved precision/recall/density/coverage
(Kynkäänniemi et al. 2019; Naeem et al. 2020, k = 5). Everything statistical is float64."""
from __future__ import annotations

import warnings
from typing import Dict, Tuple

import numpy as np
import torch


def feature_stats(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), with the usual fixes: an eps * I offset when the product's
    square root is singular or not finite, and the real part when round-off leaves a tiny imaginary one."""
    from scipy import linalg
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"frechet_distance: shapes differ: {mu1.shape}/{mu2.shape}, {s1.shape}/{s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is handled below, not worth a warning
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, splits: int = 10) -> Tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split of the (N, C) class probabilities: (mean, std) over splits. 10 splits
    as in Salimans et al.; StudioGAN compares with 1."""
    p = np.asarray(probs, dtype=np.float64)
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(py, 1e-30, None)))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _kmeans(x: np.ndarray, k: int, seed: int, iters: int = 50) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; returns the cluster of every row."""
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min(((x[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
        centers.append(x[rng.choice(len(x), p=d / d.sum()) if d.sum() > 0 else rng.integers(len(x))])
    c = np.asarray(centers)
    for _ in range(iters):
        assign = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return assign


def prd(real: np.ndarray, fake: np.ndarray, clusters: int = 20, angles: int = 1001, runs: int = 10,
        seed: int = 0) -> Dict[str, float]:
    """Sajjadi et al.'s precision and recall for distributions: k-means on the union of features, histograms, the
    PRD curve over slopes, averaged over ``runs`` clusterings; reported as F8 (recall) and F1/8 (precision)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    slopes = np.tan(np.linspace(1e-10, np.pi / 2 - 1e-10, angles))
    curves = []
    for r in range(runs):
        assign = _kmeans(np.concatenate([real, fake]), clusters, seed + r)
        hr = np.bincount(assign[:len(real)], minlength=clusters) / len(real)
        hf = np.bincount(assign[len(real):], minlength=clusters) / len(fake)
        precision = np.minimum(hr[None, :] * slopes[:, None], hf[None, :]).sum(1)
        recall = precision / slopes
        curves.append((np.clip(precision, 0, 1), np.clip(recall, 0, 1)))
    precision, recall = np.mean([c[0] for c in curves], 0), np.mean([c[1] for c in curves], 0)

    def f_beta(beta: float) -> float:
        with np.errstate(invalid="ignore", divide="ignore"):
            f = (1 + beta ** 2) * precision * recall / (beta ** 2 * precision + recall)
        return float(np.nanmax(np.where(np.isfinite(f), f, 0.0)))
    return {"prd_f8": f_beta(8.0), "prd_f1_8": f_beta(1 / 8)}


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is its own nearest neighbour


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> Dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al.) and density and coverage (Naeem et al.) with k-NN
    balls; exact pairwise distances in float64 (fine for the 10k-50k samples these are computed on)."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    rr, rf = _knn_radii(r, k), _knn_radii(f, k)
    d = torch.cdist(r, f)                                        # (N_real, N_fake)
    in_real_ball = d <= rr[:, None]
    return {
        "precision": float(in_real_ball.any(0).double().mean()),
        "recall": float((d <= rf[None, :]).any(1).double().mean()),
        "density": float(in_real_ball.double().sum(0).mean() / k),
        "coverage": float((d.min(1).values <= rr).double().mean()),
    }
