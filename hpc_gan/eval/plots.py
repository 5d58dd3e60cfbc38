"""PNG plots: a run's training curves (losses, FID, IS over steps), the truncation sweep (IS vs FID) and scaling
efficiency."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

from hpc_gan.errors import UserError


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install -e .[plots]") from None


def read_metrics(run_dir: Path) -> List[Dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; is {run_dir} a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run_dir: Path, out: Path, keys: Sequence[str] = ("d_loss", "g_loss", "d_cond", "g_cond", "fid", "is",
                                                                 "sample_class_accuracy")) -> List[str]:
    """One panel per logged quantity present in metrics.jsonl; returns the keys drawn."""
    rows = read_metrics(run_dir)
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        raise UserError(f"{run_dir}/metrics.jsonl has none of {', '.join(keys)} yet")
    plt = _plt()
    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 2.8), squeeze=False)
    for ax, k in zip(axes[0], present):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return present


def plot_truncation_sweep(rows: List[Dict], out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 3.2))
    ax.plot([r["is"] for r in rows], [r["fid"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(f"{r['truncation']:g}", (r["is"], r["fid"]), fontsize=7)
    ax.set_xlabel("IS")
    ax.set_ylabel("FID")
    ax.set_title("truncation sweep")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_scaling(rows: List[Dict], out: Path) -> None:
    """Scaling efficiency over the number of devices (``hpc-gan bench --scaling``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([r["world"] for r in rows], [r["efficiency"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("devices")
    ax.set_ylabel("scaling efficiency")
    ax.set_ylim(0, 1.1)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
