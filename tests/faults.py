"""Run the hpc-gan command with a fault injected for real into one rank of the training loop, for the failure tests:
    python tests/faults.py KIND RANK STEP [hpc-gan arguments ...]
KIND  raise: an exception at the start of step STEP (what an unreadable image or an OOM looks like)
      hang:  that step sleeps for an hour (a rank stuck outside any collective)
      nan:   that step's D loss is NaN (a numerical blow-up)
      sigma: before step STEP, every rank multiplies G's raw weights by 20, once (a spectral blow-up: sigma_0 jumps,
             as in BigGAN's collapses); RANK is ignored, since replicas must stay identical
Every other rank, and every other step, runs the real code."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_gan.cli import main  # noqa: E402
from hpc_gan.train import trainer as T  # noqa: E402

kind, rank, step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
train_step, d_loss = T.Trainer.train_step, T.Trainer._d_loss


injected = []


def faulty_step(self, *args, **kwargs):
    if kind == "sigma" and self.step + 1 == step and not injected:
        import torch
        print(f"faults.py: scaling G's weights x20 before step {step}", file=sys.stderr, flush=True)
        with torch.no_grad():
            for name, p in self.g.module.named_parameters():
                if name.endswith("weight") and p.dim() > 1:
                    p.mul_(20.0)
        injected.append(step)
    elif kind != "sigma" and self.rank == rank and self.step + 1 == step:
        print(f"faults.py: injecting {kind} on rank {rank} at step {step} (t={time.time():.3f})", file=sys.stderr,
              flush=True)
        if kind == "raise":
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        if kind == "hang":
            time.sleep(3600)
    return train_step(self, *args, **kwargs)


def nan_loss(self, *args, **kwargs):
    loss = d_loss(self, *args, **kwargs)
    return loss * float("nan") if (self.rank == rank and self.step + 1 == step) else loss


T.Trainer.train_step = faulty_step
if kind == "nan":
    T.Trainer._d_loss = nan_loss
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
sys.exit(main(sys.argv[4:]))
