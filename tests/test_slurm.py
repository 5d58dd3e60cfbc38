"""The sbatch scripts against a real Slurm (slurm/local: slurmctld + two slurmd as nodes n1, n2 on this machine):
a 2-node training job, preemption and requeue with exact resume, a sweep array, the bench job, and a killed rank
failing the job instead of hanging it. Skipped, with the reason, where Slurm cannot be started (not root, no apt)."""
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpc_gan.dist import launch
from hpc_gan.train import checkpoint
from hpc_gan.train.preempt import slurm_job_key

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ("model.g_ch=8 model.d_ch=8 model.embed_dim=16 data.synthetic_size=256 train.batch_size=8 train.log_every=1 "
        "train.sample_every=1000 train.demo_classifier=false run.tensorboard=false train.standing_stats=0 "
        "dist.timeout_s=30")


def node_states(env) -> list:
    """sinfo's state of each node ("idle", "allocated", "completing", ...); none when Slurm does not answer."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=env, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.stdout.split() if out.returncode == 0 else []


def _slurm_up(env) -> bool:
    return len([s for s in node_states(env) if s in ("idle", "mixed", "allocated")]) == 2


def _free_port_block(span=16) -> int:
    """A base port with BASE+1, +2, +10 (slurm/local's daemons) free, below the trainer's rendezvous ports."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, launch.PORT_BASE - span, span)
        try:
            for port in (base + 1, base + 2, base + 10):
                with socket.socket() as s:
                    s.bind(("", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports in [10000, 15000) for a local Slurm")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    env = dict(os.environ)
    if env.get("SLURM_CONF") and _slurm_up(env):
        yield env
        return
    # A cluster of this session's own: a second test run on the machine must neither share its daemons (whichever
    # run ends first would stop them under the other's jobs) nor its job ids (equal ids derive equal ports).
    cluster = Path(os.environ.get("HPC_GAN_SLURM_DIR") or tmp_path_factory.mktemp("slurm"))
    env.update(SLURM_LOCAL_PORT_BASE=str(_free_port_block()), SLURM_LOCAL_FIRST_JOB_ID=str(random.randrange(1, 10**6)))
    proc = subprocess.run(["bash", str(ROOT / "slurm/local/start.sh"), str(cluster)], capture_output=True, text=True,
                          timeout=600, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(reason=f"no local Slurm could be started (needs root and apt, or a running Slurm with "
                           f"SLURM_CONF set): slurm/local/start.sh said: {last}")
    env["SLURM_CONF"] = str(cluster / "slurm.conf")
    yield env
    subprocess.run(["bash", str(ROOT / "slurm/local/stop.sh"), str(cluster)], capture_output=True)


def submit(env, tmp, script, *args, sbatch=(), **variables):
    e = {k: v for k, v in env.items() if not k.startswith(("SLURM_JOB", "SLURM_ARRAY", "SLURM_PROCID"))}
    e.update(HPC_GAN=str(BIN / "hpc-gan"), PYTHONPATH=str(ROOT))
    e.update(variables)
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
           f"--output={tmp}/%x-%A_%a.out" if any(a.startswith("--array") for a in sbatch) else f"--output={tmp}/%x-%j.out",
           *sbatch, str(ROOT / "slurm" / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_state(env, job):
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return fields.get("JobState"), fields.get("Reason"), fields


def wait(env, job, timeout=300, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")):
    end = time.time() + timeout
    while time.time() < end:
        state, reason, _ = job_state(env, job)
        if state in states:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"job {job} still {state} ({reason}) after {timeout} s")


def logs(tmp):
    return "\n".join(p.read_text() for p in Path(tmp).glob("*.out"))


def release_requeued(env, job, timeout=60):
    """Start a requeued job now instead of at its BeginTime (~100 s later), once its nodes have finished the
    previous run: Slurm revokes that run's credential with one-second resolution, so a start within the same second
    fails ("Killing non-startable batch job: Job credential revoked", the job FAILED), which is why Slurm delays it."""
    end = time.time() + timeout
    while time.time() < end:
        states = node_states(env)
        if states and all(st == "idle" for st in states):
            break
        time.sleep(0.5)
    time.sleep(2.0)  # past the revocation's second
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)


def wait_for_step(run_dir, step, timeout=180):
    end = time.time() + timeout
    path = Path(run_dir) / "metrics.jsonl"
    while time.time() < end:
        if path.exists() and any(json.loads(x).get("step", 0) >= step for x in path.read_text().splitlines() if x):
            return
        time.sleep(0.3)
    raise AssertionError(f"{path} never reached step {step}")


def test_train_sbatch_on_two_nodes(slurm, tmp_path):
    run = tmp_path / "run"
    job = submit(slurm, tmp_path, "train.sbatch", "configs/demo.yaml", RUN_DIR=str(run),
                 OVERRIDES=TINY + " train.steps=6 train.checkpoint_every=3")
    assert wait(slurm, job) == "COMPLETED", logs(tmp_path)
    assert [p.name for p in checkpoint.complete_checkpoints(run / "checkpoints")] == ["step-00000003", "step-00000006"]
    assert "distributed: 2 ranks via srun" in logs(tmp_path)
    settings = (run / "slurm-job.env").read_text()
    assert "SLURM_JOB_NUM_NODES=2" in settings and f"SLURM_JOB_ID={job}" in settings and "MASTER_ADDR=" in settings
    assert checkpoint.load_consolidated(run)["world_size"] == 2


def test_preemption_requeues_and_resumes_exactly(slurm, tmp_path):
    steps = f"{TINY} train.steps=40 train.checkpoint_every=100"  # long enough to signal mid-run
    straight = tmp_path / "straight"
    job = submit(slurm, tmp_path, "train.sbatch", "configs/demo.yaml", RUN_DIR=str(straight), OVERRIDES=steps)
    assert wait(slurm, job) == "COMPLETED", logs(tmp_path)

    run = tmp_path / "preempted"
    job = submit(slurm, tmp_path, "train.sbatch", "configs/demo.yaml", RUN_DIR=str(run), OVERRIDES=steps)
    wait_for_step(run, 3)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)  # what --signal=USR1@90 sends
    end = time.time() + 120
    while time.time() < end:  # the trainer checkpoints, then requeues: pending until its BeginTime
        state, reason, _ = job_state(slurm, job)
        if state == "PENDING" and list(checkpoint.complete_checkpoints(run / "checkpoints")):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"job {job} was not requeued: {state} {reason}\n{logs(tmp_path)}")
    release_requeued(slurm, job)
    assert wait(slurm, job) == "COMPLETED", f"{job_state(slurm, job)[2]}\n{logs(tmp_path)}"
    out = logs(tmp_path)
    assert "preemption signal: saving a checkpoint at step" in out and f"requeued Slurm job {job}" in out
    assert "resumed from" in out and "SLURM_RESTART_COUNT=1" in (run / "slurm-job.env").read_text()
    got, want = checkpoint.load_consolidated(run), checkpoint.load_consolidated(straight)
    assert got["step"] == want["step"] == 40
    for net in ("G", "D", "G_ema"):
        for k, v in want[net].items():
            assert torch.equal(got[net][k], v), f"{net}.{k} differs after preemption + resume"


def test_sweep_array_gives_each_task_its_values(slurm, tmp_path):
    root = tmp_path / "sweep"
    job = submit(slurm, tmp_path, "sweep.sbatch", "configs/demo.yaml", sbatch=("--array=0-1",),
                 GRID="loss.temperature=0.5,0.75", RUN_ROOT=str(root), OVERRIDES=TINY + " train.steps=2")
    for task in (f"{job}_0", f"{job}_1"):
        assert wait(slurm, task) == "COMPLETED", logs(tmp_path)
    for name, t in (("temperature-0.5", 0.5), ("temperature-0.75", 0.75)):
        cfg = checkpoint.load_consolidated(root / name)["config"]
        assert cfg["loss"]["temperature"] == t
        assert f"SLURM_ARRAY_JOB_ID={job}" in (root / name / "slurm-job.env").read_text()


def test_bench_sbatch_writes_json(slurm, tmp_path):
    out = tmp_path / "bench.json"
    job = submit(slurm, tmp_path, "bench.sbatch", "configs/demo.yaml", OUT=str(out), STEPS="2", WARMUP="1",
                 OVERRIDES=TINY)
    assert wait(slurm, job) == "COMPLETED", logs(tmp_path)
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["nodes"] == 2 and result["samples_per_s_per_device"] > 0


def test_a_killed_rank_fails_the_job_instead_of_hanging_it(slurm, tmp_path):
    run = tmp_path / "killed"
    job = submit(slurm, tmp_path, "train.sbatch", "configs/demo.yaml", RUN_DIR=str(run),
                 OVERRIDES=TINY + " train.steps=100000 train.checkpoint_every=100000")
    wait_for_step(run, 2)
    pids = subprocess.run(["pgrep", "-f", f"run.dir={run}"], capture_output=True, text=True).stdout.split()
    ranks = [p for p in pids if "hpc-gan" in Path(f"/proc/{p}/cmdline").read_text()
             and "srun" not in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(ranks) == 2, pids
    t0 = time.time()
    os.kill(int(ranks[-1]), signal.SIGKILL)
    assert wait(slurm, job, timeout=120) in ("FAILED", "CANCELLED"), logs(tmp_path)
    assert time.time() - t0 < 60  # dist.timeout_s=30 bounds it even where srun would not kill the rest


def test_an_exception_on_one_rank_fails_the_job_in_seconds(slurm, tmp_path):
    """rank 1 raises at step 3 (tests/faults.py); srun --kill-on-bad-exit ends the job well before any timeout."""
    wrapper = tmp_path / "faulty-hpc-gan"
    wrapper.write_text(f"#!/bin/bash\nexec {sys.executable} {ROOT / 'tests' / 'faults.py'} raise 1 3 \"$@\"\n")
    wrapper.chmod(0o755)
    run = tmp_path / "run"
    job = submit(slurm, tmp_path, "train.sbatch", "configs/demo.yaml", RUN_DIR=str(run),
                 OVERRIDES=TINY.replace("dist.timeout_s=30", "") + " train.steps=1000", **{"HPC_GAN": str(wrapper)})
    assert wait(slurm, job, timeout=300) == "FAILED", logs(tmp_path)
    end, out = time.time(), logs(tmp_path)
    injected = float(re.search(r"injecting raise on rank 1 at step 3 \(t=([\d.]+)\)", out).group(1))
    assert end - injected < 60, end - injected  # dist.timeout_s left at its default: 600 s
    first = out.index("1: hpc-gan: rank 1 of 2 failed")  # --label: every line names its rank
    assert "RuntimeError: injected failure on rank 1 at step 3" in out[first:first + 4000]
    peer = out.find("0: hpc-gan: rank 0 of 2 failed")
    assert peer == -1 or peer > first


def test_job_key_is_array_aware():
    assert slurm_job_key({"SLURM_JOB_ID": "12"}) == "12"
    assert slurm_job_key({"SLURM_JOB_ID": "13", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "3"}) == "10_3"
    assert slurm_job_key({}) is None


def test_preemption_outside_slurm_checkpoints_and_resumes(tmp_path):
    """USR1 to a plain process: checkpoint at the step boundary, exit 0; --resume auto finishes identically."""
    args = [str(BIN / "hpc-gan"), "train", "--config", str(ROOT / "configs/demo.yaml"), *TINY.split(),
            "train.steps=60", "train.checkpoint_every=100"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(ROOT)
    straight = tmp_path / "straight"
    subprocess.run(args + [f"run.dir={straight}"], check=True, capture_output=True, env=env)
    run = tmp_path / "run"
    proc = subprocess.Popen(args + [f"run.dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    wait_for_step(run, 3)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "preempted outside Slurm" in out, out
    step = checkpoint.load_consolidated(run)["step"]
    assert 3 <= step < 60
    subprocess.run(args + [f"run.dir={run}", "--resume", "auto"], check=True, capture_output=True, env=env)
    got, want = checkpoint.load_consolidated(run), checkpoint.load_consolidated(straight)
    for k, v in want["G"].items():
        assert torch.equal(got["G"][k], v), k


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is missing")
def test_sweep_grid_helper(capsys):
    from hpc_gan.cli import main
    assert main(["sweep", "--grid", "loss.temperature=0.25,0.5 loss.m_p=0.9,0.98", "--count"]) == 0
    assert capsys.readouterr().out.strip() == "4"
    assert main(["sweep", "--grid", "loss.temperature=0.25,0.5 loss.m_p=0.9,0.98", "--index", "2"]) == 0
    assert capsys.readouterr().out.strip() == "loss.temperature=0.5 loss.m_p=0.9"
    assert main(["sweep", "--grid", "loss.temperature=0.25,0.5", "--index", "2"]) == 2
