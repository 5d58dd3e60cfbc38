"""What the GPU check pack's modules share: the repository root, the environment variables that pass a run's
choices to its child processes, the device and its measured copy bandwidth, and running a command in a time box."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
STAGE_DIR_ENV = "HPC_GAN_GPU_CHECK_STAGES"  # where the stages' own result files are, for the stages after them
CASES_ENV = "HPC_GAN_GPU_CHECK_CASES"  # --cases, for the train stage's process
Save = Callable[[Dict[str, Any]], None]  # a looping stage's partial result, written after each case


def device_for(smoke: bool) -> Any:
    """The GPU, or the CPU in smoke mode (or where none is visible)."""
    import torch
    return torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")


def copy_gb_per_s(dev: Any) -> float:
    """Device-to-device copy bandwidth, bytes read plus bytes written, of 1 GiB of random fp32 (4 MiB on a CPU)."""
    import torch

    from kernels.bench import median_ms
    n = (1 << 28) if dev.type == "cuda" else (1 << 20)
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    return round(2 * src.numel() * 4 / median_ms(lambda: dst.copy_(src), dev) / 1e6, 1)


def biggan128_sn_shapes() -> List[Tuple[int, int]]:
    """(rows, columns) of the 65 spectrally normalized matrices of the BigGAN-128 preset."""
    from hpc_gan.config import load
    from hpc_gan.info import sn_shapes
    return sn_shapes(load(ROOT / "configs" / "imagenet128_reacgan_b2048.yaml"))


def run_boxed(cmd: List[str], env: Dict[str, str], limit: float) -> Tuple[Optional[int], str]:
    """(exit code or None when the time box ran out, stderr). Its own process group, killed whole on time-out, so
    no compile worker or pytest child lives on holding the GPU."""
    import signal
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=limit)
        return proc.returncode, err
    except subprocess.TimeoutExpired:  # what it said before the kill tells where it was (compiling, say)
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return None, err
