import os
import sys
from pathlib import Path

import pytest
import torch

# The Triton kernels run on CPU tensors through triton's interpreter, which must be chosen before triton is
# imported; on a machine with CUDA the kernel tests use the GPU instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # fast paths are compared with references at fp32 tolerances: TF32 convolutions and matmuls would round
    # both sides' inputs to 10 mantissa bits, so a 1e-7 difference in a weight flips roundings (seen on an H100)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from hpc_gan.config import load  # noqa: E402
from hpc_gan.mkl_vml import warm_vml_dispatch  # noqa: E402

warm_vml_dispatch()  # the tests' own CPU math, compared bitwise and at fp32 tolerances (hpc_gan.mkl_vml)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A tiny, fast config on the synthetic set (16 px, ch 8)."""
    def make(*overrides):
        return load(ROOT / "configs" / "demo.yaml", [
            f"run.dir={tmp_path / 'run'}", "run.tensorboard=false", "model.g_ch=8", "model.d_ch=8",
            "model.embed_dim=16", "data.synthetic_size=256", "train.batch_size=8", "train.steps=4",
            "train.log_every=2", "train.sample_every=4", "train.checkpoint_every=2", "train.ema_start=1",
            "train.standing_stats=2", "train.demo_classifier=false", *overrides])
    return make
