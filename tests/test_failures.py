"""Failure behaviour, with faults injected for real (tests/faults.py) into real 2-rank jobs: an exception on one rank
ends the job in seconds with that rank's report first; a hung rank is dumped and times out; non-finite steps stop
or are skipped alike on every rank; a failed checkpoint write keeps the previous one; the launch-environment fixes;
the preflight."""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpc_gan.dist import launch
from hpc_gan.errors import UserError
from hpc_gan.train import checkpoint
from hpc_gan.train.loop import train
from hpc_gan.train.trainer import Trainer
from procenv import child_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FAULTS = ROOT / "tests" / "faults.py"
TINY = ["--config", str(ROOT / "configs" / "demo.yaml"), "model.g_ch=8", "model.d_ch=8", "model.embed_dim=16",
        "data.synthetic_size=256", "train.batch_size=8", "train.log_every=1", "train.sample_every=1000",
        "train.demo_classifier=false", "run.tensorboard=false", "train.standing_stats=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra):
    return child_env(drop=("TRITON_INTERPRET",), **extra)


def faulty_torchrun(kind, rank, step, *args, timeout=300):
    """A 2-rank torchrun job with a fault on one rank; returns (exit code, stderr, seconds from the fault to the
    end of the job)."""
    cmd = [BIN / "torchrun", "--nproc-per-node", "2", "--master-port", free_port(), FAULTS, kind, rank, step,
           "train", *TINY, *args]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env(),
                          cwd=ROOT)
    end = time.time()
    injected = re.search(r"faults.py: injecting \w+ on rank \d+ at step \d+ \(t=([\d.]+)\)", proc.stderr)
    assert injected, f"the fault was never injected:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.returncode, proc.stderr, end - float(injected.group(1))


def test_an_exception_on_one_rank_ends_the_job_fast_with_its_report_first(tmp_path):
    code, err, seconds = faulty_torchrun("raise", 1, 3, f"run.dir={tmp_path / 'run'}", "train.steps=50")
    assert code != 0 and seconds < 60, (code, seconds)  # dist.timeout_s stays at its default, 600 s
    first = err.index("hpc-gan: rank 1 of 2 failed")
    assert "RuntimeError: injected failure on rank 1 at step 3" in err[first:first + 3000]
    peer = err.find("hpc-gan: rank 0 of 2 failed")
    assert peer == -1 or peer > first, "rank 0's collateral report came before the failing rank's"
    assert peer == -1 or "the first rank's report is the cause" in err[peer:peer + 1000]


def test_a_hung_rank_is_dumped_and_the_job_times_out_in_seconds(tmp_path):
    code, err, seconds = faulty_torchrun("hang", 1, 6, f"run.dir={tmp_path / 'run'}", "train.steps=50",
                                         "dist.step_timeout_s=5", "dist.hang_dump_factor=3")
    assert code != 0 and seconds < 60, (code, seconds)
    assert err.count("most recent call first") >= 2  # both ranks dumped their stacks: the sleeper and the waiter
    assert "in faulty_step" in err and "in all_reduce" in err
    assert "hpc-gan: rank 0 of 2 failed: a collective timed out" in err


def test_a_nonfinite_step_is_skipped_alike_on_every_rank(tmp_path):
    run = tmp_path / "run"
    code, err, _ = faulty_torchrun("nan", 1, 3, f"run.dir={run}", "train.steps=5", "train.nonfinite=skip",
                                   "train.checkpoint_every=5")
    assert code == 0, err[-3000:]  # the checkpoint's replica check passed: both ranks skipped the same update
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in records if "nonfinite_steps" in r] == [0, 0, 1, 0, 0]
    state = checkpoint.load_consolidated(run)
    assert state["step"] == 5 and all(torch.isfinite(v).all() for v in state["D"].values() if v.is_floating_point())


# ---- non-finite steps, one process ------------------------------------------------------------------------------
def nan_at(trainer, step):
    """Make the D loss of the trainer's step ``step`` (1-based) NaN, as tests/faults.py does for a CLI run."""
    d_loss = trainer._d_loss

    def patched(*args, **kwargs):
        loss = d_loss(*args, **kwargs)
        return loss * float("nan") if trainer.step + 1 >= step else loss
    trainer._d_loss = patched


def test_skip_leaves_a_nonfinite_update_unapplied(tiny_cfg):
    tr = Trainer(tiny_cfg("train.nonfinite=skip"), torch.device("cpu"))
    tr.train_step()
    before = {k: v.clone() for k, v in tr.d.module.state_dict().items() if "sn_" not in k}
    moments = {k: v.clone() for k, v in tr.d.opt.state[next(tr.d.module.parameters())].items()}
    nan_at(tr, 2)
    tr.d_step(0)  # its loss is NaN: parameters and Adam state must stay as they were
    assert all(torch.equal(before[k], v) for k, v in tr.d.module.state_dict().items() if k in before)
    assert all(torch.equal(moments[k], v) for k, v in tr.d.opt.state[next(tr.d.module.parameters())].items())
    del tr._d_loss  # the class's method again
    tr.d_step(1)  # a finite update is applied again
    assert any(not torch.equal(before[k], v) for k, v in tr.d.module.state_dict().items() if k in before)


def test_stop_stops_at_the_first_nonfinite_step(tiny_cfg, tmp_path, monkeypatch):
    orig = Trainer.train_step

    def step(self, *args, **kwargs):
        if self.step == 2 and not getattr(self, "_nan", False):
            nan_at(self, 3)
            self._nan = True
        return orig(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(UserError, match=r"non-finite loss or gradients at step 3 .*newest checkpoint is .*step-00000002"):
        train(tiny_cfg("train.steps=8", "train.log_every=4", "train.checkpoint_every=2"), log=lambda s: None)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000002"]


def test_skip_stops_after_too_many_consecutive_skips(tiny_cfg, monkeypatch):
    orig = Trainer.train_step

    def step(self, *args, **kwargs):
        if not getattr(self, "_nan", False):
            nan_at(self, 3)  # from step 3 on, every step
            self._nan = True
        return orig(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(UserError, match=r"3 consecutive steps with non-finite loss or gradients up to step 5"):
        train(tiny_cfg("train.steps=20", "train.log_every=10", "train.nonfinite=skip", "train.nonfinite_max=3"),
              log=lambda s: None)


# ---- preemption before sheets, a failed checkpoint write ---------------------------------------------------------
def test_preemption_saves_before_sheets_and_evaluation(tiny_cfg, tmp_path, monkeypatch):
    import signal
    orig = Trainer.train_step

    def step(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # a real signal, as Slurm's --signal sends it
    monkeypatch.setattr(Trainer, "train_step", step)
    summary = train(tiny_cfg("train.steps=10", "train.sample_every=1", "eval.every=1", "eval.backbone=tiny",
                             "eval.n=16", "eval.ref_n=64", f"eval.ref_cache={tmp_path / 'cache'}"), log=lambda s: None)
    run = tmp_path / "run"
    assert summary.get("preempted") and checkpoint.latest(run / "checkpoints").name == "step-00000003"
    assert not (run / "samples" / "step-00000003.png").exists()  # the save did not wait behind the sheet
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "fid" in r] == [1, 2]


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_resume_is_exact(tmp_path):
    """A real write failure (the file size limit makes write() fail with EFBIG, as a full disk does with ENOSPC)."""
    common = [*TINY, "train.checkpoint_every=2", "train.log_every=2"]
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-m", "hpc_gan.cli", "train", *common, f"run.dir={straight}", "train.steps=6"],
                   check=True, capture_output=True, env=env(), cwd=ROOT)
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "hpc_gan.cli", "train", *common, f"run.dir={run}", "train.steps=2"],
                   check=True, capture_output=True, env=env(), cwd=ROOT)
    limit = (run / "checkpoints" / "step-00000002" / "state.pt").stat().st_size // 2
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from hpc_gan.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "train", *common, f"run.dir={run}", "train.steps=6",
                           "--resume", "auto"], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "step-00000004 failed (File too large); the previous checkpoint step-00000002 is intact" in proc.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]  # nothing half-written
    subprocess.run([sys.executable, "-m", "hpc_gan.cli", "train", *common, f"run.dir={run}", "train.steps=6",
                    "--resume", "auto"], check=True, capture_output=True, env=env(), cwd=ROOT)
    got, want = checkpoint.load_consolidated(run), checkpoint.load_consolidated(straight)
    for net in ("G", "D", "G_ema"):
        for k, v in want[net].items():
            assert torch.equal(got[net][k], v), f"{net}.{k}"


# ---- the launch environment ------------------------------------------------------------------------------------
def test_each_rank_takes_the_gpu_it_can_see():
    assert launch.local_device_index(5, n_gpus=1, local_world=8) == 0   # --gpus-per-task=1 / --gpu-bind
    assert launch.local_device_index(5, n_gpus=8, local_world=8) == 5   # every rank sees the node's GPUs
    with pytest.raises(UserError, match="8 ranks on this node but 4 GPUs visible"):
        launch.local_device_index(5, n_gpus=4, local_world=8)


def test_job_ports_stay_below_the_ephemeral_range():
    ports = {launch.port_from_job(str(j)) for j in range(0, 200_000, 7)}
    assert min(ports) >= 1024 and max(ports) < 32768 and len(ports) > 10_000


def test_the_rendezvous_address_is_not_a_loopback_one():
    assert launch.is_loopback("127.0.1.1") and launch.is_loopback("::1") and not launch.is_loopback("10.0.0.3")
    addr = launch.rendezvous_address("localhost")  # a name that resolves to loopback only, like Debian's hostname
    if addr == "127.0.0.1":
        pytest.skip(reason="this machine has no non-loopback interface to fall back to")
    assert not launch.is_loopback(addr)


def test_slurm_common_leaves_the_rendezvous_to_launch_and_sets_the_cluster_defaults(tmp_path):
    script = (f"source {ROOT}/slurm/common.sh; echo MASTER_ADDR=${{MASTER_ADDR-unset}} MASTER_PORT=${{MASTER_PORT-unset}} "
              "SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK NCCL=$TORCH_NCCL_ASYNC_ERROR_HANDLING "
              "TRACE=$TORCH_NCCL_TRACE_BUFFER_SIZE DUMP=$TORCH_NCCL_DUMP_ON_TIMEOUT FLAGS=\"$SRUN_FLAGS\"")
    e = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SLURM_JOB_ID": "123", "SLURM_CPUS_PER_TASK": "6",
         "SLURM_SUBMIT_DIR": str(ROOT), "HPC_GAN": "/bin/true", "SLURM_JOB_NODELIST": "n[1-2]"}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=e, check=True).stdout
    assert "MASTER_ADDR=unset MASTER_PORT=unset" in out and "SRUN_CPUS_PER_TASK=6" in out
    assert "NCCL=3" in out and "TRACE=2000" in out and "DUMP=1" in out
    assert "--kill-on-bad-exit=1" in out and "--label" in out and "--cpu-bind=cores" in out


def test_rank_zero_chooses_the_checkpoint_to_resume_from(tmp_path):
    """Rank 1 sees no checkpoint (a stale NFS view, faked: the one thing here that cannot happen for real on one
    machine); both ranks still resume from rank 0's, and the run finishes with replicas that agree."""
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "hpc_gan.cli", "train", *TINY, f"run.dir={run}", "train.steps=2",
                    "train.checkpoint_every=2"], check=True, capture_output=True, env=env(), cwd=ROOT)
    script = tmp_path / "stale.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from hpc_gan.train import checkpoint
if os.environ["RANK"] == "1":
    checkpoint.latest = lambda root: None
from hpc_gan.cli import main
sys.exit(main(sys.argv[1:]))
""")
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
                           str(script), "train", *TINY, f"run.dir={run}", "train.steps=4", "train.checkpoint_every=2",
                           "--resume", "auto"], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert checkpoint.load_consolidated(run)["step"] == 4


# ---- the preflight -----------------------------------------------------------------------------------------------
def doctor(*args, **extra_env):
    return subprocess.run([sys.executable, "-m", "hpc_gan.cli", "doctor", *args], capture_output=True, text=True,
                          env=env(**extra_env), cwd=ROOT, timeout=600)


def test_doctor_checks_this_node_and_compiles_the_kernels():
    proc = doctor("--config", "configs/demo.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[1]: line.split()[0] for line in proc.stdout.splitlines()[:-1]}
    for name in ("gpus", "cuda/nccl", "triton", "dali", "deepspeed", "mpi4py", "data", "disk", "launch"):
        assert name in lines, proc.stdout
    assert lines["triton"] == "ok" and "kernel builds for sm_90 and sm_80, bf16" in proc.stdout
    assert lines["gpus"] in ("ok", "skip") and lines["disk"] == "ok"


def test_doctor_fails_on_a_class_count_the_data_does_not_have(tmp_path):
    from hpc_gan.config import load
    from hpc_gan.doctor import run_checks
    for c in ("cat", "dog", "eel"):
        (tmp_path / c).mkdir()
    found = {}
    for n in (5, 3):
        cfg = load(ROOT / "configs" / "demo.yaml",
                   ["data.name=folder", f"data.path={tmp_path}", f"data.num_classes={n}"])
        found[n] = next(c for c in run_checks(cfg, compile_kernels=False) if c.name == "data")
    assert found[5].status == "fail" and found[5].detail.endswith("3 class folders but data.num_classes=5; set "
                                                                  "data.num_classes=3"), found[5]
    assert found[3].status == "warn", found[3]  # right count; raw folders on many ranks are slow


def test_doctor_fails_on_missing_data_and_a_batch_the_job_cannot_make(tmp_path):
    proc = doctor("--config", "configs/demo.yaml", "--skip-compile", "data.name=shards", f"data.path={tmp_path}",
                  "train.batch_size=12", SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="4",
                  SLURM_CPUS_PER_TASK="8")
    assert proc.returncode == 1
    assert re.search(r"fail\s+data\s+.*no dataset.json", proc.stdout)
    assert re.search(r"fail\s+launch\s+Slurm job 77: 2 nodes x 4 tasks: .*does not split over 8 ranks", proc.stdout)
    assert re.search(r"warn\s+slurm cpus\s+.*SRUN_CPUS_PER_TASK", proc.stdout)
