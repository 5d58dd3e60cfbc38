"""A training run: run directory, resume, the step loop, and what happens between steps (logging, sample sheets,
checkpoints), each phase timed. Everything printed is also written to metrics.jsonl."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist

from hpc_gan.config import Config, ConfigError, dump
from hpc_gan.dist import DistInfo, launch
from hpc_gan.eval.evaluate import RunEvaluator
from hpc_gan.eval.sampling import sample_sheet, sheet_classes
from hpc_gan.train import checkpoint
from hpc_gan.train.preempt import Preemption
from hpc_gan.train.trainer import Trainer, check_precision, param_count, resolve_device

SHEET_SEED_OFFSET = 12345


class MetricsWriter:
    """metrics.jsonl (one JSON object per line, every logged number) and TensorBoard events where installed."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: Optional[int] = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from: those steps are about to be redone.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, step: int, values: Dict[str, Any]) -> None:
        record = {"step": step, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class DemoClassifier:
    """Trains a small classifier on the run's data set and scores the class accuracy of G_ema's samples."""

    def __init__(self, trainer: Trainer, log: Callable[[str], None]) -> None:
        from hpc_gan.eval.classifier import train_classifier
        ds = trainer.dataset
        if not hasattr(ds, "images"):
            raise ConfigError("train.demo_classifier needs an in-memory data set (data.name=synthetic or npz)")
        self.trainer = trainer
        self.model, acc, secs = train_classifier(ds.images, ds.labels, trainer.cfg.data.num_classes,
                                                 seed=trainer.cfg.train.seed)
        log(f"demo classifier: {acc:.3f} accuracy on held-out real images (trained in {secs:.0f} s)")

    def score(self, G: torch.nn.Module, per_class: int = 50) -> float:
        from hpc_gan.eval.classifier import sample_accuracy
        cfg, dev = self.trainer.cfg, self.trainer.device
        g = torch.Generator(device=dev).manual_seed(cfg.train.seed + 777)

        def sample(y: torch.Tensor) -> torch.Tensor:
            z = torch.randn(len(y), cfg.model.z_dim, generator=g, device=dev)
            return G(z, y.to(dev))

        return sample_accuracy(self.model, sample, cfg.data.num_classes, per_class)


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.run.dir)
    for sub in ("checkpoints", "samples"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump(cfg))
    return run_dir


def find_resume(run_dir: Path, resume: Optional[str]) -> Optional[Path]:
    if not resume:
        if checkpoint.latest(run_dir / "checkpoints") is not None:
            raise ConfigError(f"run dir {run_dir} already has checkpoints; pass --resume auto to continue it, or "
                              f"set run.dir=... for a new run (nothing was overwritten)")
        return None
    if resume == "auto":
        return checkpoint.latest(run_dir / "checkpoints")
    try:
        return checkpoint.resolve(resume)
    except FileNotFoundError as e:
        raise ConfigError(f"--resume {resume}: {e}") from None


def _barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


class _NoMetrics:
    """What ranks other than 0 write: nothing."""

    def write(self, step: int, values: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def train(cfg: Config, resume: Optional[str] = None, log: Callable[[str], None] = print,
          info: Optional[DistInfo] = None) -> Dict[str, Any]:
    """Run (or continue) a training run on this process's rank; returns a summary dict. Without ``info`` the
    launcher is detected (torchrun, srun, mpirun or none) and the process group created and destroyed here."""
    own = info is None
    if own:
        device_type = "cpu" if cfg.run.device == "cpu" else "auto"
        info = launch.init(cfg.dist.timeout_s, cfg.dist.backend, device_type)
    try:
        return _train(cfg, resume, log if info.is_main else (lambda msg: None), info)
    finally:
        if own:
            launch.shutdown(info)


def _train(cfg: Config, resume: Optional[str], log: Callable[[str], None], info: DistInfo) -> Dict[str, Any]:
    t = cfg.train
    device = resolve_device(cfg.run.device, info.local_rank)
    check_precision(t.precision, device)  # before the run dir is touched
    ckpt = find_resume(Path(cfg.run.dir), resume)
    run_dir = Path(cfg.run.dir)
    if info.is_main:
        prepare_run_dir(cfg)
    _barrier(info)
    trainer = Trainer(cfg, device, info)
    log(f"hpc-gan: {cfg.model.arch} {cfg.model.resolution}px, G {param_count(trainer.G) / 1e6:.2f}M / "
        f"D {param_count(trainer.D) / 1e6:.2f}M params, {cfg.loss.adv} + {cfg.loss.cond}, batch {t.batch_size} "
        f"({trainer.accum} x {trainer.micro} x {info.world} ranks), {device}, run dir {run_dir}")
    if info.world > 1:
        log(f"distributed: {info.world} ranks via {info.launcher} ({info.backend}, {info.master_addr}:"
            f"{info.master_port}), strategy {cfg.dist.strategy}, sync BN {cfg.dist.sync_bn}, global negatives "
            f"{cfg.loss.global_negatives}")
    if ckpt is not None:
        trainer.load_state_dict(checkpoint.load_consolidated(ckpt, map_location=device))
        log(f"resumed from {ckpt} at step {trainer.step}")
    metrics = MetricsWriter(run_dir, cfg.run.tensorboard, resume_step=trainer.step if ckpt else None) \
        if info.is_main else _NoMetrics()
    timers = {"train": 0.0, "log": 0.0, "sample": 0.0, "eval": 0.0, "checkpoint": 0.0}
    evaluator = RunEvaluator(cfg, trainer.dataset, device, log) if cfg.eval.every else None
    preempt = Preemption(cfg.run.preempt_signals, info)
    classifier = DemoClassifier(trainer, log) if t.demo_classifier and info.is_main else None
    summary: Dict[str, Any] = {"run_dir": str(run_dir), "start_step": trainer.step}
    if classifier is not None and trainer.step == 0:
        acc = classifier.score(trainer.sampling_generator())
        metrics.write(0, {"sample_class_accuracy": acc})
        log(f"step 0: class accuracy of samples {acc:.3f} (chance {1 / cfg.data.num_classes:.3f})")

    # img/s counts training-step time only; the ETA uses wall time, sheets and checkpoints included
    last_t, last_step, last_train = time.perf_counter(), trainer.step, 0.0
    try:
        while trainer.step < t.steps:
            t0 = time.perf_counter()
            diag = t.diagnostics and (trainer.step + 1) % t.log_every == 0
            trainer.train_step(diagnostics=diag)
            step = trainer.step
            t1 = time.perf_counter()
            timers["train"] += t1 - t0
            final = step == t.steps
            if step % t.log_every == 0 or final:
                values = trainer.pop_metrics()
                now = time.perf_counter()
                n, train_s = step - last_step, timers["train"] - last_train
                rate = n / max(now - last_t, 1e-9)
                values.update(samples_per_s=n * t.batch_size / max(train_s, 1e-9), sec_per_step=train_s / n)
                last_t, last_step, last_train = now, step, timers["train"]
                metrics.write(step, values)
                losses = " ".join(f"{k} {values[k]:.3f}" for k in ("d_loss", "g_loss", "d_cond", "g_cond")
                                  if k in values)
                log(f"step {step}/{t.steps} | {losses} | {values['samples_per_s']:.1f} img/s | "
                    f"eta {_fmt_time((t.steps - step) / max(rate, 1e-9))}")
                bad = [k for k, v in values.items() if not math.isfinite(v)]
                if bad:
                    raise FloatingPointError(f"non-finite {', '.join(bad)} at step {step}; the newest checkpoint "
                                             f"is intact: lower the learning rates or check the data")
            t2 = time.perf_counter()
            timers["log"] += t2 - t1
            if info.is_main and (step % t.sample_every == 0 or final):
                G = trainer.sampling_generator()
                sample_sheet(G, run_dir / "samples" / f"step-{step:08d}.png", sheet_classes(cfg.data.num_classes),
                             8, cfg.model.z_dim, t.seed + SHEET_SEED_OFFSET, t.truncation, device)
                if classifier is not None:
                    acc = classifier.score(G)
                    metrics.write(step, {"sample_class_accuracy": acc})
                    log(f"step {step}: class accuracy of samples {acc:.3f} (chance {1 / cfg.data.num_classes:.3f})")
                    summary["sample_class_accuracy"] = acc
            t3 = time.perf_counter()
            timers["sample"] += t3 - t2
            if evaluator is not None and (step % cfg.eval.every == 0 or final):
                result = evaluator(trainer.sampling_generator())  # every rank: sampling is sharded
                metrics.write(step, result)
                log(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
                summary.update(result)
            t4 = time.perf_counter()
            timers["eval"] += t4 - t3
            t3 = t4
            preempted = not final and preempt.requested()  # every rank asks at every step boundary: they agree
            if preempted:
                log(f"preemption signal: saving a checkpoint at step {step}")
            if step % t.checkpoint_every == 0 or final or preempted:
                trainer.check_replicas()  # collective, like state_dict under ZeRO: every rank takes part
                state = trainer.state_dict()
                if info.is_main:
                    checkpoint.save(run_dir / "checkpoints", step, state)
                    checkpoint.prune(run_dir / "checkpoints", t.keep_checkpoints)
                _barrier(info)
            elif cfg.dist.check_every and step % cfg.dist.check_every == 0:
                trainer.check_replicas()
            timers["checkpoint"] += time.perf_counter() - t3
            if preempted:
                preempt.requeue(log)
                summary["preempted"] = True
                break
    finally:
        metrics.close()
        preempt.close()
    steps_done = trainer.step - summary["start_step"]
    if not steps_done:
        log(f"run already at step {trainer.step} of train.steps={t.steps}; nothing to train (raise train.steps to "
            f"continue)")
        if classifier is not None:
            summary["sample_class_accuracy"] = classifier.score(trainer.sampling_generator())
    summary.update(step=trainer.step, steps_run=steps_done, phase_seconds={k: round(v, 2) for k, v in timers.items()})
    if steps_done:
        summary["sec_per_step"] = timers["train"] / steps_done
    metrics.write(trainer.step, {"summary": summary})
    log("phases: " + ", ".join(f"{k} {_fmt_time(v)}" for k, v in timers.items())
        + (f"; {summary['sec_per_step']:.3f} s/step" if steps_done else ""))
    if "sample_class_accuracy" in summary:
        log(f"final class accuracy of EMA samples: {summary['sample_class_accuracy']:.3f} "
            f"(chance {1 / cfg.data.num_classes:.3f}); sheets in {run_dir / 'samples'}")
    return summary
