"""Metrics against independent float64 computations and toy distributions with known answers, sharded sampling on
2 gloo ranks against one process, the Inception-v3 network's shapes and weight checks, eval / plot / bench
commands."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_gan.cli import main
from hpc_gan.errors import UserError
from hpc_gan.eval import metrics as M
from hpc_gan.eval.backbones import InceptionV3FID, build_backbone, sha256_prefix_ok

ROOT = Path(__file__).resolve().parents[1]


def random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_equals_an_independent_computation():
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 31, (1,))))
    d = 7
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(d, rng), random_spd(d, rng)
    # independent: Tr sqrt(S1 S2) = Tr sqrt(A S2 A) with A = S1^(1/2), all via symmetric eigendecompositions
    w, v = np.linalg.eigh(s1)
    a = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(a @ s2 @ a)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8, abs=1e-8)
    # diagonal Gaussians: |mu1 - mu2|^2 + sum (s1 - s2)^2 of the standard deviations
    sd1, sd2 = rng.random(d) + 0.5, rng.random(d) + 0.5
    got = M.frechet_distance(mu1, np.diag(sd1 ** 2), mu2, np.diag(sd2 ** 2))
    assert got == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2), rel=1e-9)


def test_frechet_distance_is_zero_for_identical_sets_and_handles_singular_covariances():
    feats = np.random.default_rng(0).standard_normal((500, 16))
    mu, sigma = M.feature_stats(feats)
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    low_rank = np.random.default_rng(1).standard_normal((5, 16))  # 5 samples: rank-4 covariance in 16 dims
    mu2, sigma2 = M.feature_stats(low_rank)
    assert np.isfinite(M.frechet_distance(mu2, sigma2, mu, sigma))


def test_inception_score_extremes():
    n, c = 1000, 10
    assert M.inception_score(np.full((n, c), 1 / c))[0] == pytest.approx(1.0)
    confident = np.eye(c)[np.arange(n) % c]
    mean, std = M.inception_score(confident, splits=10)
    assert mean == pytest.approx(c) and std == pytest.approx(0.0, abs=1e-9)
    assert M.inception_score(confident, splits=1)[0] == pytest.approx(c)
    one_class = np.eye(c)[np.zeros(n, dtype=int)]
    assert M.inception_score(one_class)[0] == pytest.approx(1.0)


def toy(n, modes, rng, spread=0.05):
    centers = np.eye(8)[:modes] * 5
    return centers[rng.integers(0, modes, n)] + spread * rng.standard_normal((n, 8))


def test_precision_recall_on_toy_distributions():
    rng = np.random.default_rng(2)
    real = toy(600, 4, rng)
    same = toy(600, 4, rng)
    half = toy(600, 2, rng)       # mode dropping: precise, half the recall
    far = toy(600, 4, rng) + 50   # nothing in common
    r = M.prdc(real, same)
    assert r["precision"] > 0.9 and r["recall"] > 0.9 and 0.7 < r["density"] < 1.3 and r["coverage"] > 0.9
    r = M.prdc(real, half)
    assert r["precision"] > 0.9 and 0.35 < r["recall"] < 0.65 and 0.35 < r["coverage"] < 0.65
    r = M.prdc(real, far)
    assert r["precision"] == 0 and r["recall"] == 0 and r["coverage"] == 0
    p_same, p_half = M.prd(real, same, clusters=8, runs=3), M.prd(real, half, clusters=8, runs=3)
    assert p_same["prd_f8"] > 0.9 and p_same["prd_f1_8"] > 0.9
    assert p_half["prd_f1_8"] > 0.9 and p_half["prd_f8"] < 0.7  # F1/8 ~ precision stays, F8 ~ recall drops


def test_sharded_sampling_on_two_ranks_equals_one_process(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from dist_worker import eval_case
    from test_dist import torchrun

    from hpc_gan.eval.evaluate import sample_features
    from hpc_gan.plan import RandomStreams
    torchrun(ROOT / "tests" / "dist_worker.py", "eval", tmp_path)
    got = torch.load(tmp_path / "eval.pt")
    G, backbone = eval_case()
    want = sample_features(G, backbone, 250, 5, 24, RandomStreams(7), truncation=0.8, batch=40)
    for k in ("pool", "probs"):
        assert got[k].shape[0] == 250
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-5, atol=1e-7)
    small = torch.load(tmp_path / "eval_small.pt")
    want_small = sample_features(G, backbone, 30, 5, 24, RandomStreams(7), batch=40)
    np.testing.assert_allclose(small["pool"].numpy(), want_small["pool"], rtol=1e-5, atol=1e-7)
    mu1, s1 = M.feature_stats(got["pool"].numpy())
    mu2, s2 = M.feature_stats(want["pool"])
    assert abs(M.frechet_distance(mu1, s1, mu2, s2)) < 1e-6


def test_inception_network_shapes_and_weight_checks(tmp_path, monkeypatch):
    net = InceptionV3FID().eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    n_params = sum(p.numel() for p in net.parameters())
    assert 23_000_000 < n_params < 24_500_000, n_params  # Inception-v3 without aux head, 1008-way fc
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not the weights")
    assert not sha256_prefix_ok(bad)
    with pytest.raises(UserError, match="SHA-256 prefix 6726825d"):
        build_backbone("inception", str(bad))
    with pytest.raises(UserError, match="do not exist"):
        build_backbone("inception", str(tmp_path / "missing.pth"))


def test_eval_plot_and_bench_commands(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--config", str(ROOT / "configs" / "demo.yaml"), "model.g_ch=8", "model.d_ch=8", "train.batch_size=8",
              "run.tensorboard=false", "train.demo_classifier=false", "train.standing_stats=2"]
    assert main(["train", *common, f"run.dir={run}", "train.steps=2", "train.log_every=1", "train.sample_every=100",
                 "train.checkpoint_every=2", "eval.every=1", "eval.backbone=tiny", "eval.n=120", "eval.ref_n=200",
                 f"eval.ref_cache={tmp_path / 'cache'}"]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("fid" in r and "is" in r for r in lines) == 2
    assert len(list((tmp_path / "cache").glob("ref-*.npz"))) == 1  # computed once, then cached
    assert main(["eval", "--run", str(run), "--metrics", "fid", "is", "prdc", "--n", "150", "--sweep", "0.5", "1"]) == 0
    result = json.loads((run / "eval" / "step-00000002.json").read_text())
    assert {"fid", "is", "precision", "recall", "density", "coverage"} <= set(result)
    assert len(result["truncation_sweep"]) == 2 and (run / "eval" / "truncation-sweep.png").stat().st_size > 1000
    assert main(["plot", "--run", str(run)]) == 0 and (run / "curves.png").stat().st_size > 1000
    out = tmp_path / "bench.json"
    assert main(["bench", *common, "--steps", "2", "--warmup", "1", "--out", str(out), "--peak-tflops", "1"]) == 0
    b = json.loads(out.read_text())
    for key in ("sec_per_step", "phase_ms_per_step", "samples_per_s_per_device", "images_per_s_per_device",
                "tflops_per_device", "mfu", "peak_memory_gib", "world", "device", "allreduce_all_grads_ms",
                "phase_host_ms_per_step", "aten_ops_per_iteration", "first_step_seconds"):
        assert key in b, key
    assert set(b["phase_ms_per_step"]) == {"data", "d_forward", "d_backward", "d_optimizer", "g_forward",
                                           "g_backward", "g_optimizer", "ema"}
    assert all(v >= 0 for v in b["phase_ms_per_step"].values()) and b["phase_ms_per_step"]["d_forward"] > 0
    assert 0 < b["mfu"] < 1 and b["samples_per_s_per_device"] > 0
    assert b["aten_ops_per_iteration"] > 100 and b["cuda_kernels_per_iteration"] is None
    assert b["peak_reserved_gib"] is None  # the CUDA allocator's (CUDA graphs' pools included); none on a CPU
    two = dict(b, world=2, samples_per_s_per_device=b["samples_per_s_per_device"] * 0.9)
    (tmp_path / "b2.json").write_text(json.dumps(two))
    assert main(["bench", "--scaling", str(out), str(tmp_path / "b2.json"), "--out", str(tmp_path / "scale.json")]) == 0
    rows = json.loads((tmp_path / "scale.json").read_text())
    assert [r["world"] for r in rows] == [1, 2] and rows[1]["efficiency"] == pytest.approx(0.9)
