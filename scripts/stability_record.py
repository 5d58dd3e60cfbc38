"""The stability record (docs/stability.md): ACGAN vs ReACGAN vs projection on the demo's embedded data, with the
watchdog on, and the curves it is built from. A benchmark, not a test: ~25 minutes on 2 CPU cores.

    .venv/bin/python scripts/stability_record.py [--steps 3000] [--out runs/stability] [--png docs/stability]

Runs configs/demo.yaml four times (2 at a time, 1 thread each): ReACGAN (the demo: d2d_ce, m_p 0.75), ReACGAN at
m_p 0.98 (the within-class collapse of docs/benchmarks.md), ACGAN (ac) and projection (pd); checkpoints every 500
steps are kept. Then plots, one PNG each: the conditioning-loss gradient norm (ReACGAN Fig. 2b), D's feature norm
(Fig. 2a), the largest sigma_0 of G and D (BigGAN §4.1), the class accuracy of samples, and the within-class
diversity of G_ema's samples (mean per-pixel std over 16 samples of a class, per checkpoint), and prints each
run's alarms.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = {
    "reacgan": ["loss.cond=d2d_ce"],
    "reacgan_mp098": ["loss.cond=d2d_ce", "loss.m_p=0.98"],
    "acgan": ["loss.cond=ac"],
    "projection": ["loss.cond=pd"],
}
CURVES = {
    "cond_grad": ("diag_cond_grad_norm", "conditioning-loss gradient norm (ReACGAN Fig. 2b)"),
    "feature_norm": ("diag_feature_norm", "D feature norm ||h|| (ReACGAN Fig. 2a)"),
    "sigma": (("diag_sigma_G_max", "diag_sigma_D_max"), "largest sigma_0 of G (solid) and D (dashed)"),
    "accuracy": ("sample_class_accuracy", "class accuracy of G_ema samples (chance 0.1)"),
}


def train_all(out: Path, steps: int) -> None:
    procs = []
    for name, extra in RUNS.items():
        run = out / name
        if (run / "checkpoints" / f"step-{steps:08d}").exists():
            continue
        args = [str(ROOT / ".venv" / "bin" / "hpc-gan"), "train", "--config", str(ROOT / "configs" / "demo.yaml"),
                f"run.dir={run}", f"train.steps={steps}", "train.keep_checkpoints=0", "train.checkpoint_every=500",
                "run.tensorboard=false", *extra] + (["--resume", "auto"] if (run / "checkpoints").exists() else [])
        log = open(out / f"{name}.log", "w")
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                       "OMP_NUM_THREADS": "1"}))
        if len(procs) == 2:
            for p in procs:
                p.wait()
            procs = []
    for p in procs:
        p.wait()


def series(run: Path, key: str):
    xs, ys = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get(key) is not None:
            xs.append(r["step"])
            ys.append(r[key])
    return xs, ys


@torch.no_grad()
def diversity(run: Path):
    """Mean per-pixel std over 16 samples of each class, per checkpoint (G_ema, standing statistics as sampled)."""
    from hpc_gan.config import apply_overrides, from_dict
    from hpc_gan.mkl_vml import warm_vml_dispatch
    from hpc_gan.models import build_generator
    from hpc_gan.train.checkpoint import complete_checkpoints, load_consolidated
    from hpc_gan.train.ema import sampling_standing_stats
    warm_vml_dispatch()  # before G's first threaded tanh (hpc_gan.mkl_vml): samples as every entry point draws them
    xs, ys = [], []
    for ckpt in complete_checkpoints(run / "checkpoints"):
        state = load_consolidated(ckpt)
        cfg = from_dict(apply_overrides(state["config"], []))
        G = build_generator(cfg.model, cfg.data.num_classes)
        G.load_state_dict(state["G_ema"])
        G.eval()
        sampling_standing_stats(G, cfg)
        g = torch.Generator().manual_seed(0)
        stds = []
        for c in range(cfg.data.num_classes):
            x = G(torch.randn(16, cfg.model.z_dim, generator=g), torch.full((16,), c))
            stds.append(float(x.std(dim=0).mean()))
        xs.append(state["step"])
        ys.append(sum(stds) / len(stds))
    return xs, ys


def plot(out: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    png.parent.mkdir(parents=True, exist_ok=True)
    colors = dict(zip(RUNS, ("tab:blue", "tab:purple", "tab:red", "tab:green")))
    panels = dict(CURVES, diversity=(None, "within-class diversity of G_ema samples (real data: 0.58)"))
    for name, (key, title) in panels.items():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for run in RUNS:
            if name == "diversity":
                xs, ys = diversity(out / run)
                ax.plot(xs, ys, marker="o", color=colors[run], label=run)
                continue
            for k, style in zip(key if isinstance(key, tuple) else (key,), ("-", "--")):
                xs, ys = series(out / run, k)
                if xs:
                    ax.plot(xs, ys, style, color=colors[run], label=run if style == "-" else None,
                            marker="o" if name == "accuracy" else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{png}-{name}.png", dpi=90)
        plt.close(fig)
        print(f"wrote {png}-{name}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", default=str(ROOT / "runs" / "stability"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "stability"))
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        train_all(out, args.steps)
    plot(out, Path(args.png))
    for run in RUNS:
        path = out / run / "alarms.jsonl"
        alarms = path.read_text().strip().splitlines() if path.exists() else []
        acc = series(out / run, "sample_class_accuracy")[1]
        print(f"{run}: final accuracy {acc[-1] if acc else float('nan'):.3f}; {len(alarms)} alarm(s)")
        for a in alarms:
            print(f"   {a}")


if __name__ == "__main__":
    main()
