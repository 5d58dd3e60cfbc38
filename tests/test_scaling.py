"""hpc-gan plan: the alpha-beta model against hand-derived values, and the command end to end (JSON rows). Its
check against measured all-reduces is a benchmark (docs/scaling.md), not a timed test."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_gan import scaling
from hpc_gan.config import load
from hpc_gan.info import model_info

ROOT = Path(__file__).resolve().parents[1]
B2048 = ROOT / "configs" / "imagenet128_reacgan_b2048.yaml"


def test_ring_and_tree_formulas():
    # 1 GB over 2 parties at 8 Gbit/s, no latency: each sends and receives half twice -> 2 * 1/2 * 1 s
    assert scaling.ring_allreduce_s(1e9, 2, 8.0, 0.0) == pytest.approx(1.0)
    assert scaling.ring_allreduce_s(0, 5, 8.0, 10.0) == pytest.approx(2 * 4 * 10e-6)
    assert scaling.tree_allreduce_s(0, 256, 8.0, 10.0) == pytest.approx(2 * 8 * 10e-6)
    assert scaling.ring_allreduce_s(1e9, 1, 8.0, 10.0) == 0.0
    # hierarchical: 16 GPUs = 2 nodes of 8; a large message's inter-node part is the node's bytes over its link
    f = scaling.Fabric(8, 400.0, 1e9, 0.0, 0.0, 1.0)  # NVLink effectively free
    assert scaling.allreduce_s(1e9, 16, f) == pytest.approx(2 * 0.5 * 1e9 * 8 / 400e9, rel=1e-6)


def test_fit_recovers_alpha_and_bandwidth():
    points = [{"bytes": n, "seconds": scaling.ring_allreduce_s(n, 4, 25.0, 30.0)} for n in (1e3, 1e5, 1e7, 1e8)]
    fit = scaling.fit_alpha_beta(points[:2], points[2:], 4)
    assert fit["gbps"] == pytest.approx(25.0) and fit["alpha_us"] == pytest.approx(30.0)


def test_plan_rows_add_up_and_scale():
    cfg = load(B2048)
    info = model_info(cfg)
    rows = scaling.plan_rows(cfg, info, [1, 8, 64, 256], scaling.Fabric())
    one = rows[0]
    # 1 GPU: compute only, = FLOPs of an iteration at batch 2048 over 45% of 989.4 TFLOP/s (re-derived here)
    assert one.comm_ms == one.bn_ms == one.negatives_ms == 0 and one.efficiency == 1
    assert one.compute_ms == pytest.approx(info["gflops_per_sample_iteration"] * 1e9 * 2048 / (989.4e12 * 0.45) * 1e3)
    for r in rows:
        assert r.per_gpu_batch == 2048 / r.gpus
        assert r.step_ms == pytest.approx(r.compute_ms + r.comm_ms + r.bn_ms + r.negatives_ms)
        assert r.samples_per_s == pytest.approx(2048 / r.step_ms * 1e3)
        assert r.compute_ms == pytest.approx(one.compute_ms / r.gpus)
    # gradient bytes: fp32 at 256 GPUs exposes ~2 x 1.02 GB / 400 Gb/s at 80% (~51 ms); bf16 halves it
    assert 40 < rows[-1].comm_ms < 60
    bf16 = scaling.plan_rows(load(B2048, ["dist.grad_compression=bf16"]), info, [256], scaling.Fabric())[0]
    assert bf16.comm_ms == pytest.approx(rows[-1].comm_ms / 2, rel=0.1)
    # BN over groups of one node: latency of NVLink only, the same at any GPU count
    grouped = scaling.plan_rows(load(B2048, ["dist.bn_group_size=8"]), info, [64, 256], scaling.Fabric())
    assert grouped[0].bn_ms == pytest.approx(grouped[1].bn_ms) and grouped[1].bn_ms < rows[-1].bn_ms


def test_plan_command_prints_json_rows():
    proc = subprocess.run([sys.executable, "-m", "hpc_gan.cli", "plan", "--config", str(B2048), "--gpus", "8", "64",
                           "--link-gbps", "3200", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["gpus"] for r in out["rows"]] == [8, 64] and out["assumptions"]
    assert set(out["rows"][0]) == {"gpus", "per_gpu_batch", "compute_ms", "comm_ms", "bn_ms", "negatives_ms",
                                   "step_ms", "samples_per_s", "efficiency"}
    bad = subprocess.run([sys.executable, "-m", "hpc_gan.cli", "plan", "--config", str(B2048), "--gpus", "48"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not split over 48 GPUs" in bad.stderr


def test_measure_allreduce_under_torchrun(tmp_path):
    """The validation command runs over a real 2-rank process group and reports a fit and a prediction per size
    (the numbers themselves are docs/scaling.md's benchmark, not asserted here)."""
    import os
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = tmp_path / "ar.json"
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-port",
                           str(port), "-m", "hpc_gan.cli", "plan", "--measure-allreduce", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["backend"] == "gloo" and result["fit"]["gbps"] > 0
    sizes = [m["bytes"] for m in result["measured"]]
    assert sizes == sorted(sizes) and len(sizes) == 8
    assert all(m["seconds"] > 0 and m["predicted"] > 0 for m in result["measured"])
