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
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_", "TORCHELASTIC_"))
         and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET")}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", **extra)
    return e


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


def test_doctor_fails_on_missing_data_and_a_batch_the_job_cannot_make(tmp_path):
    proc = doctor("--config", "configs/demo.yaml", "--skip-compile", "data.name=shards", f"data.path={tmp_path}",
                  "train.batch_size=12", SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="4",
                  SLURM_CPUS_PER_TASK="8")
    assert proc.returncode == 1
    assert re.search(r"fail\s+data\s+.*no dataset.json", proc.stdout)
    assert re.search(r"fail\s+launch\s+Slurm job 77: 2 nodes x 4 tasks: .*does not split over 8 ranks", proc.stdout)
    assert re.search(r"warn\s+slurm cpus\s+.*SRUN_CPUS_PER_TASK", proc.stdout)


def test_the_gpu_check_pack_runs_every_stage_in_smoke_mode(tmp_path):
    """scripts/gpu-check.sh --smoke: every stage at toy sizes on the CPU (kernels in Triton's interpreter), each
    reported in report.json and report.md, so the pack a GPU session runs cannot rot."""
    from hpc_gan.models.layers import auto_resample
    from hpc_gan.models.resample_conv import resolve
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env(), cwd=ROOT, timeout=900)
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["env", "accuracy", "kernels", "sn", "layers", "tests", "determinism", "dali",
                            "deepspeed", "train"]
    assert all(s["status"] in ("ok", "skip") for s in stages.values()), (proc.stdout, stages)
    assert proc.returncode == 0 and report["smoke"] is True
    assert stages["accuracy"]["worst_fp32_rel_error"] < 1e-4 and stages["determinism"]["bitwise_equal"]
    assert {r["mode"] for r in stages["accuracy"]["d2d_ce"]} == {"matrix", "fused"}  # both D2D-CE forwards
    assert {r["variant"] for r in stages["kernels"]["rows"]} >= {"triton", "triton_fused", "eager"}
    tiles = stages["sn"]["tiles"]  # the SN tiling sweep ran every candidate, with the same sigma
    assert len(tiles) == 2 and all(t["ms"] > 0 and t["sigma_max_rel_diff"] < 1e-5 for t in tiles), tiles
    assert stages["train"]["runs"][0]["sec_per_step"] > 0 and stages["train"]["runs"][0]["compiled_graphs"] == 0
    layers = stages["layers"]  # every implementation timed at every shape D and G resample at
    assert {(r["op"], r["impl"]) for r in layers["rows"]} == {("pool", "nearest_grad"), ("pool", "reshape"),
                                                            ("pool", "avg_pool2d"), ("upsample", "interpolate"),
                                                            ("upsample", "expand")}
    assert all(v > 0 for per in layers["ms_per_iteration"].values() for v in per.values())
    # every attention implementation at G's block and at D's (its D-step and G-step batches)
    assert sorted((r["net"], r["impl"], r["shape"][0]) for r in layers["attention_rows"]) == sorted(
        (net, impl, b) for impl in ("sdpa", "sdpa_narrow", "explicit") for net, b in (("G", 4), ("D", 8), ("D", 4)))
    assert set(layers["attention_ms_per_iteration"]) == {"sdpa", "sdpa_narrow", "explicit"}
    # where the layers stage's fastest are not what the defaults run on the CPU, one training case runs them
    wanted = [k for k in ("pool", "upsample") if layers["best"][k] != auto_resample(k, "cpu")] + \
        (["attention"] if layers["attention_best"] != "sdpa" else []) + \
        [side for side, v in layers["rgb_conv_best"].items() if v != "conv2d"] + \
        [side for side, v in layers["resample_conv_best"].items()
         if v != resolve("auto", {"g": "up", "d": "down"}[side], "cpu")]
    # D's image convolutions (3x3, 1x1 shortcut) and G's output convolution under every formulation of their side
    assert {(r["conv"][0], r["impl"]) for r in layers["rgb_conv_rows"]} == {
        ("D", "conv2d"), ("D", "nchw"), ("D", "unfold_mm"), ("G", "conv2d"), ("G", "nchw"), ("G", "pad_out")}
    assert set(layers["rgb_conv_best"]) == {"d", "g"}
    # G's upsampling convolutions and D's pooled ones, separate and fused, checked against each other as timed
    assert {(r["conv"][0], r["impl"]) for r in layers["resample_conv_rows"]} == {
        ("G", "separate"), ("G", "fused"), ("D", "separate"), ("D", "fused")}
    assert set(layers["resample_conv_best"]) == {"d", "g"}
    assert max(r["rel_error"] for r in layers["resample_conv_rows"]) < 1e-5
    modes = [r["mode"] for r in stages["train"]["runs"]]
    assert modes == ["eager"] + (["eager fastest layers"] if wanted else []), (modes, layers["best"])
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]  # stage files stay out of DIR
    md = (out / "report.md").read_text()
    assert all(f"| {name} |" in md for name in stages)
    assert "Speed goals" in md and "| not host-bound at 32 per GPU" in md
    assert "| shape | wall | device | fused, device |" in md  # D2D-CE's two modes side by side
    assert "- attention, ms per iteration at batch 4" in md and "(br/bc/ch/warps/stages/rch)" in md
    assert "- RGB convolution D 3->" in md and "- RGB convolution G " in md
    assert "- resampling convolution G " in md and "- resampling convolutions, faster over each network's" in md


def test_the_gpu_check_runs_the_train_cases_asked_for(monkeypatch, capsys):
    """--cases picks the train stage's cases and their order (a second call on a warm node measures what the first
    call's box left out); a case or stage that does not exist is one line naming the valid ones."""
    from hpc_gan import gpucheck
    monkeypatch.setenv(gpucheck.CASES_ENV, "32:cuda_graphs 256:compile")
    _, _, cases = gpucheck.train_cases(smoke=False)
    assert [(b, label) for b, label, _ in cases] == [(32, "cuda_graphs"), (256, "compile")]
    assert "train.cuda_graphs=true" in cases[0][2] and "train.compile=default" in cases[1][2]
    monkeypatch.delenv(gpucheck.CASES_ENV)
    _, _, cases = gpucheck.train_cases(smoke=False)
    assert [gpucheck.case_key(b, label) for b, label, _ in cases][:4] == ["256:eager", "256:cuda_graphs",
                                                                          "32:cuda_graphs", "32:eager"]
    for argv, said in ((["--smoke", "--cases", "256:turbo"], "--cases 256:turbo: no such train case here; the cases "
                                                                "are 8:eager 8:eager_fastest_layers"),
                       (["--smoke", "--stages", "train", "bench"], "--stages bench: no such stage; the stages are env"),
                       (["--smoke", "--stages", "env", "train", "--cases", "8:eager_fastest_layers"],
                        "--cases 8:eager_fastest_layers runs what the layers stage found fastest: add layers")):
        with pytest.raises(SystemExit):
            gpucheck.main(argv)
        assert said in capsys.readouterr().err


def test_the_fastest_layers_run_eager_and_under_cuda_graphs(tmp_path, monkeypatch):
    """The layers stage's winners run in two step cases on a GPU: eager, and under CUDA graphs (where the MFU goal
    is measured, and where inductor may fuse a formulation differently). A winning pool_impl=nearest_grad stays out
    of the compiled case, which would refuse it; with nothing else to change, that case is not run."""
    from hpc_gan import gpucheck
    monkeypatch.setenv(gpucheck.STAGE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(gpucheck.CASES_ENV, raising=False)
    stage = tmp_path / "stage-layers.json"

    def cases(best, attention="sdpa", rgb=None):
        stage.write_text(json.dumps({"device": "cuda", "best": best, "attention_best": attention,
                                     "rgb_conv_best": rgb or {"d": "conv2d", "g": "conv2d"}}))
        _, _, found = gpucheck.train_cases(smoke=False)
        return {label: flags for batch, label, flags in found if "fastest" in label}

    got = cases({"pool": "nearest_grad", "upsample": "expand"}, rgb={"d": "unfold_mm", "g": "conv2d"})
    eager, graphs = got["eager fastest layers"], got["cuda_graphs fastest layers"]
    assert "model.pool_impl=nearest_grad" in eager and "model.d_rgb_conv_impl=unfold_mm" in eager
    assert "model.pool_impl=nearest_grad" not in graphs and "model.pool_impl=reshape" not in graphs
    assert {"model.d_rgb_conv_impl=unfold_mm", "train.cuda_graphs=true"} <= set(graphs)
    assert list(cases({"pool": "nearest_grad", "upsample": "expand"})) == ["eager fastest layers"]
    assert cases({"pool": "reshape", "upsample": "expand"}) == {}  # the defaults won: nothing more to run
    for _ in range(2):  # the defaults won, then no layers stage at all: asked for, the case is one clear line
        with pytest.raises(ValueError, match="the fastest layers' case runs only where the layers stage found"):
            gpucheck.train_cases(smoke=False, wanted=["256:cuda_graphs_fastest_layers"])
        stage.unlink(missing_ok=True)


def test_the_gpu_check_gives_the_last_stage_what_seconds_leaves(tmp_path, capsys):
    """--seconds is the whole call's time: a second call on a warm machine gives the train stage all of it; a stage
    with nothing left is reported as skipped, not run."""
    from hpc_gan import gpucheck
    assert gpucheck.main(["--smoke", "--stages", "env", "--seconds", "45", "--out", str(tmp_path / "a")]) == 0
    assert "gpu-check: env (at most 45 s)" in capsys.readouterr().out
    assert gpucheck.main(["--smoke", "--stages", "env", "--seconds", "0.4", "--out", str(tmp_path / "b")]) == 0
    (stage,) = json.loads((tmp_path / "b" / "report.json").read_text())["stages"]
    assert stage["status"] == "skip" and "out of time" in stage["why"]


def test_the_gpu_check_fits_one_call_of_eight_minutes():
    """The stages' GPU boxes add up to 480 s (issue 15: one call of at most 8 minutes on one GPU; what a stage leaves
    goes to the next, so the call ends within the sum), and each train case's estimate fits the train box alone."""
    from hpc_gan import gpucheck
    boxes = {name: gpu_s for name, gpu_s, _ in gpucheck.STAGES}
    assert sum(boxes.values()) == 480, boxes
    assert max(max(v) for v in gpucheck.CASE_SECONDS.values()) < boxes["train"]


def test_the_train_stage_skips_a_case_that_cannot_finish(monkeypatch):
    """A train case is started only where what is left of the box holds it (gpucheck.case_seconds): the H200's
    first call, 2026-11-27, started the CUDA-graph case at 32 with ~70 s left, and its ~100 s of compiling were cut
    off with nothing to report. Here 20 s are left: every GPU case is skipped, none is started, and each says why
    (an eager case at 32 needs less than one at 256)."""
    from hpc_gan import gpucheck
    monkeypatch.delenv(gpucheck.CASES_ENV, raising=False)
    monkeypatch.delenv(gpucheck.STAGE_DIR_ENV, raising=False)
    t0 = time.time()
    runs = gpucheck.stage_train(False, t0 + 25, lambda partial: None)["runs"]
    assert time.time() - t0 < 10  # nothing ran
    assert [r["status"] for r in runs] == ["skip"] * len(runs) and len(runs) == 8
    why = {gpucheck.case_key(r["batch"], r["mode"]): r["why"] for r in runs}
    assert "needs ~45 s" in why["256:eager"] and "needs ~100 s" in why["32:cuda_graphs"], why
    assert "needs ~25 s" in why["32:eager"] and "needs ~160 s" in why["256:cuda_graphs_tuned"], why


def test_a_boxed_stage_stopped_by_its_box_keeps_what_it_said():
    """A case killed by its time box still returns its stderr (which graph it was compiling, say): the H200's
    CUDA-graph case at 32 came back as a bare timeout (2026-11-27)."""
    from hpc_gan.gpucheck import run_boxed
    said = "import sys, time; print('compiling graph 2', file=sys.stderr, flush=True); time.sleep(60)"
    rc, err = run_boxed([sys.executable, "-c", said], dict(os.environ), 3)
    assert rc is None and "compiling graph 2" in err


def test_the_gpu_check_reads_its_goals_off_the_h200_run():
    """The goals table from the H200's second call (docs/gpu-runs/2026-11-27-h200-run2.json, the train cases the
    first call's box left out): CUDA graphs keep the GPU busy at 32 and at 256 per GPU; MFU at 256 is short of 45%."""
    from hpc_gan.gpucheck import goal_rows
    report = json.loads((ROOT / "docs" / "gpu-runs" / "2026-11-27-h200-run2.json").read_text())
    rows = {goal: (measured, verdict) for goal, measured, verdict in goal_rows(report)}
    assert rows["not host-bound at 32 per GPU with compile or CUDA graphs (GPU busy, best case)"] == ("101% busy", "met")
    assert rows["not host-bound at 256 per GPU with compile or CUDA graphs (GPU busy, best case)"] == ("97% busy", "met")
    assert rows["train step MFU >= 45% at 256 per GPU (best case)"] == ("41.8%", "missed")


def test_the_report_says_what_the_longest_inductor_kernels_compute(tmp_path):
    """A compiled case's longest inductor kernels get a line each in report.md: time, calls, and the sizes, hints
    and aten ops of their definitions (the sources stay in report.json); a kernel whose source was not found says
    so. On the H200's CUDA-graph case at 32 (run 4), given the definitions a GPU run would find."""
    from hpc_gan.gpucheck import write_report
    report = json.loads((ROOT / "docs" / "gpu-runs" / "2026-11-27-h200-run4.json").read_text())
    run = next(r for s in report["stages"] for r in s.get("runs", []) if r.get("mode") == "cuda_graphs")
    found = {"sizes": {"xnumel": 24576, "r0_numel": 16384}, "hints": ["reduction_hint=ReductionHint.OUTER"],
             "aten": "aten.mul, aten.sum", "origin": "", "source": "def k(): pass", "file": "cab.py"}
    run["inductor_kernels"] = [{"name": "triton_red_fused_mul_sum_19", "ms": 5.8514, "calls": 1,
                                "definitions": [found]},
                               {"name": "triton_poi_fused_relu_4", "ms": 1.5, "calls": 2, "definitions": []}]
    write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    assert ("  - inductor kernel triton_red_fused_mul_sum_19: 5.85 ms in 1 calls (xnumel 24576, r0_numel 16384; "
            "reduction_hint=ReductionHint.OUTER; aten aten.mul, aten.sum)") in md
    assert "  - inductor kernel triton_poi_fused_relu_4: 1.50 ms in 2 calls (source not found)" in md
    assert "def k(): pass" not in md and "def k(): pass" in (tmp_path / "report.json").read_text()


def test_every_shape_is_not_met_while_shapes_are_unmeasured():
    """The H200's third call (docs/gpu-runs/2026-11-27-h200-run3.json): the kernels stage's box left 5 of 16 D2D-CE
    shapes out, so "at every shape" is partly measured, not met, though the 11 measured are all faster on the device;
    the 3x goal at 256 x 2048 x 2048 bf16 and both SN goals are met."""
    from hpc_gan.gpucheck import goal_rows
    report = json.loads((ROOT / "docs" / "gpu-runs" / "2026-11-27-h200-run3.json").read_text())
    rows = {goal: (measured, verdict) for goal, measured, verdict in goal_rows(report)}
    assert rows["D2D-CE fwd+bwd >= best torch path at every shape (device)"] == (
        "1.04x (slowest of 11; 5 not measured)", "partly measured")
    assert rows["D2D-CE fwd+bwd >= best torch path at every shape (wall)"] == ("0.78x (slowest shape)", "missed")
    assert rows["D2D-CE >= 3x best torch at 256x2048x2048 bfloat16 (device)"] == ("3.38x", "met")
    assert rows["SN within 1.5x of the bandwidth floor (device time)"] == ("1.13x", "met")
    assert rows["SN, all layers, per forward: >= 5x the per-layer loop"] == ("5.72x", "met")


def test_the_gpu_check_reads_its_goals_off_the_first_h100_run():
    """The report's goals table, from the first H100 run's own report (docs/gpu-runs): every speed goal missed or
    not measured there, with the numbers docs/benchmarks.md quotes."""
    from hpc_gan.gpucheck import goal_rows
    report = json.loads((ROOT / "docs" / "gpu-runs" / "2026-11-26-h100-run2.json").read_text())
    rows = {goal: (measured, verdict) for goal, measured, verdict in goal_rows(report)}
    assert rows["D2D-CE >= 3x best torch at 256x2048x2048 bfloat16 (wall)"] == ("0.41x", "missed")
    assert rows["train step MFU >= 45% at 256 per GPU (best case)"] == ("18.6%", "missed")
    assert rows["SN, all layers, per forward: >= 5x the per-layer loop"] == ("n/a", "not measured")
    assert not any(verdict == "met" for _, verdict in rows.values())
