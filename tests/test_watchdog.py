"""The collapse watchdog: its rules on observation sequences (a healthy demo run's recorded series raises nothing),
and for real in training runs with a spectral blow-up injected (tests/faults.py sigma): the alarm within one
diagnostics interval, warn / stop / rollback as documented, and the pre-alarm checkpoint kept by retention."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from hpc_gan.config import load
from hpc_gan.train import checkpoint
from hpc_gan.train.watchdog import Watchdog

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
T = load(DEMO).train  # the documented default thresholds
# recorded from `make demo` (configs/demo.yaml, 3000 steps, 2026-11-26), every 100 steps: sigma_0 max of G and D,
# the conditioning-gradient norm, d_real - d_fake, and the class accuracy of samples every 500 steps
HEALTHY = {
    "G": [1.24, 1.54, 1.93, 2.26, 2.58, 2.82, 3.0, 3.16, 3.27, 3.41, 3.54, 3.65, 3.76, 3.85, 3.94, 4.04, 4.17, 4.32,
          4.48, 4.6, 4.74, 4.84, 4.93, 5.04, 5.14, 5.24, 5.35, 5.45, 5.54, 5.64],
    "D": [1.83, 2.42, 2.64, 2.66, 2.6, 2.51, 2.42, 2.33, 2.24, 2.15, 2.07, 2.03, 2.05, 2.08, 2.11, 2.14, 2.18, 2.21,
          2.26, 2.29, 2.34, 2.36, 2.41, 2.43, 2.45, 2.46, 2.47, 2.48, 2.49, 2.5],
    "grad": [0.63, 0.578, 0.509, 0.462, 0.452, 0.432, 0.502, 0.714, 0.531, 0.492, 0.383, 0.489, 0.533, 0.447, 0.64,
             0.54, 0.415, 0.43, 0.218, 0.561, 0.312, 0.222, 0.18, 0.241, 0.282, 0.303, 0.276, 0.154, 0.248, 0.106],
    "gap": [0.745, 1.31, 1.663, 2.065, 2.05, 2.208, 2.541, 2.938, 2.815, 3.259, 3.526, 3.506, 3.593, 3.381, 3.529,
            3.615, 3.284, 3.186, 2.789, 2.758, 2.78, 2.75, 2.837, 2.963, 3.063, 3.062, 3.136, 3.102, 3.234, 3.301],
    "acc": {5: 0.13, 10: 0.232, 15: 0.38, 20: 0.678, 25: 0.76, 30: 0.752},
}
TINY = ["model.g_ch=8", "model.d_ch=8", "model.embed_dim=16", "data.synthetic_size=256", "train.batch_size=8",
        "train.log_every=2", "train.checkpoint_every=4", "train.sample_every=1000", "train.demo_classifier=false",
        "run.tensorboard=false", "train.standing_stats=0"]


def obs(i, **over):
    v = {"diag_sigma_G_max": HEALTHY["G"][i], "diag_sigma_D_max": HEALTHY["D"][i],
         "diag_cond_grad_norm": HEALTHY["grad"][i], "d_real": HEALTHY["gap"][i], "d_fake": 0.0}
    v.update(over)
    return v


def test_a_healthy_demo_run_raises_nothing():
    dog = Watchdog(T)
    for i in range(30):
        evals = {"sample_class_accuracy": HEALTHY["acc"][i + 1]} if i + 1 in HEALTHY["acc"] else {}
        assert dog.observe(100 * (i + 1), obs(i), evals) == [], i


def test_each_rule_fires_and_then_stays_quiet_for_a_window():
    dog = Watchdog(T)
    for i in range(8):
        dog.observe(i, obs(i))
    (a,) = dog.observe(8, obs(8, diag_sigma_D_max=10.0))
    assert (a.kind, a.value) == ("sigma_D", 10.0) and a.threshold == 3.0 * min(HEALTHY["D"][3:8])
    assert dog.observe(9, obs(9, diag_sigma_D_max=30.0)) == []  # quiet for watch_window observations
    kinds = [x.kind for x in dog.observe(10, obs(10, diag_cond_grad_norm=50.0))]
    assert kinds == ["cond_grad"]
    dog = Watchdog(T)
    for i in range(12):
        dog.observe(i, obs(i))
    fired = [dog.observe(12 + k, obs(12, d_real=0.1)) for k in range(T.watch_window)]
    assert [len(f) for f in fired] == [0] * (T.watch_window - 1) + [1] and fired[-1][0].kind == "d_gap"
    dog = Watchdog(T)
    assert dog.observe(0, {}, {"sample_class_accuracy": 0.7, "fid": 20.0}) == []
    assert [x.kind for x in dog.observe(1, {}, {"sample_class_accuracy": 0.5, "fid": 26.0})] == ["accuracy", "fid"]
    assert [x.kind for x in Watchdog(T).observe(0, {"d_loss": float("nan")})] == ["nonfinite"]


def test_a_within_class_collapse_raises_a_diversity_alarm():
    """docs/stability.md's runs, by checkpoint: ACGAN's diversity fell from 0.405 to 0.057 while its accuracy rose
    (no other alarm saw it); ReACGAN's and projection's stayed within 0.91 of their best."""
    acgan = [0.405, 0.320, 0.229, 0.187, 0.095, 0.057]
    dog = Watchdog(T)
    fired = [dog.observe(i, {}, {"sample_class_diversity": v}) for i, v in enumerate(acgan)]
    assert [len(f) for f in fired] == [0, 0, 0, 1, 0, 0]  # at 0.187 < 0.5 x 0.405, then quiet for a window
    assert fired[3][0].kind == "diversity" and fired[3][0].threshold == T.watch_div_fraction * 0.405
    for healthy in ([0.528, 0.509, 0.520, 0.497, 0.497, 0.524], [0.501, 0.496, 0.526, 0.525, 0.528, 0.547]):
        dog = Watchdog(T)
        assert all(dog.observe(i, {}, {"sample_class_diversity": v}) == [] for i, v in enumerate(healthy))


def test_sample_scores_measure_accuracy_and_within_class_diversity():
    from hpc_gan.eval.classifier import sample_scores

    class Oracle(torch.nn.Module):  # reads the class off the first pixel
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()
    same = sample_scores(Oracle(), lambda y: y.float()[:, None, None, None].expand(-1, 3, 4, 4), 3, per_class=5)
    assert same == (1.0, 0.0)  # one image per class: every sample right, no variety
    g = torch.Generator().manual_seed(0)
    noisy = lambda y: torch.cat([y.float()[:, None, None, None].expand(-1, 1, 4, 4),  # noqa: E731
                                 torch.randn(len(y), 2, 4, 4, generator=g) * 2.0], 1)
    acc, div = sample_scores(Oracle(), noisy, 3, per_class=400)
    assert acc == 1.0 and abs(div - 2.0 * 2 / 3) < 0.1  # std 2 in 2 of 3 channels, 0 in the label channel


def test_the_gap_rule_waits_until_d_separates():
    dog = Watchdog(T)  # a gap that never reached 0.5 (the first steps of any run) is not a collapse
    assert all(dog.observe(i, {"d_real": 0.01, "d_fake": 0.0}) == [] for i in range(20))


def faults(tmp_path, *args, timeout=300, **env):
    return subprocess.run([sys.executable, str(ROOT / "tests" / "faults.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


def sigma_run(tmp_path, *extra, steps=16):
    run = tmp_path / "run"
    proc = faults(tmp_path, "sigma", 0, 9, "train", "--config", DEMO, f"run.dir={run}", f"train.steps={steps}",
                  *TINY, *extra)
    alarms = [json.loads(x) for x in (run / "alarms.jsonl").read_text().splitlines()] \
        if (run / "alarms.jsonl").exists() else []
    return proc, run, alarms


def test_injected_sigma_explosion_warns_within_one_diagnostics_interval(tmp_path):
    proc, run, alarms = sigma_run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    # weights x20 before step 9; diagnostics at every logging step (2): the alarm is at step 10
    assert [(a["step"], a["kind"], a["action"]) for a in alarms] == [(10, "sigma_G", "warn")]
    assert alarms[0]["checkpoint"].endswith("step-00000008") and "sigma_G alarm at step 10" in proc.stdout
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("alarm_sigma_G") for r in records if r["step"] == 10)


def test_stop_exits_3_naming_the_alarm_and_the_checkpoint(tmp_path):
    proc, run, alarms = sigma_run(tmp_path, "train.on_alarm=stop")
    assert proc.returncode == 3, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "sigma_G alarm at step 10" in err and "step-00000008" in err and "--resume" in err
    assert checkpoint.latest(run / "checkpoints").name == "step-00000008" and alarms[0]["action"] == "stop"


def test_rollback_reloads_the_pre_alarm_checkpoint_with_lower_learning_rates(tmp_path):
    proc, run, alarms = sigma_run(tmp_path, "train.on_alarm=rollback", "train.max_rollbacks=1")
    assert proc.returncode == 0, proc.stderr
    assert "rolled back to" in proc.stdout and [a["action"] for a in alarms] == ["rollback"]
    final = checkpoint.load_consolidated(run)
    assert final["step"] == 16
    for key, lr in (("g_opt", 4e-4), ("d_opt", 4e-4)):  # the demo's rates, halved once
        assert final[key]["adam"]["param_groups"][0]["lr"] == lr * 0.5
    # the run continued from step 8's weights (x20 undone): G's largest sigma is back near 1
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-2 if "summary" in records[-1] else -1].get("diag_sigma_G_max", 1.0) < 3.0


def test_rollbacks_used_up_stop_the_run(tmp_path):
    proc, _, alarms = sigma_run(tmp_path, "train.on_alarm=rollback", "train.max_rollbacks=0")
    assert proc.returncode == 3 and "rollbacks used up" in proc.stderr and alarms[0]["action"] == "stop"


def test_the_pre_alarm_checkpoint_survives_retention(tmp_path):
    proc, run, _ = sigma_run(tmp_path, "train.keep_checkpoints=1", steps=20)
    assert proc.returncode == 0, proc.stderr
    assert [c.name for c in checkpoint.complete_checkpoints(run / "checkpoints")] == ["step-00000008",
                                                                                      "step-00000020"]


def test_two_ranks_roll_back_alike(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-port",
                           str(port), str(ROOT / "tests" / "faults.py"), "sigma", "0", "9", "train", "--config",
                           str(DEMO), f"run.dir={run}", "train.steps=12", "train.on_alarm=rollback", *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("rolled back to") == 1  # rank 0 logs; both ranks reloaded (replicas are checked)
    state = checkpoint.load_consolidated(run)
    assert state["step"] == 12 and state["world_size"] == 2
    assert torch.isfinite(torch.cat([v.flatten().float() for v in state["G"].values()])).all()
