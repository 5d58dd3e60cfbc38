"""A training run: run directory, resume, then the step loop: a training step and the periodic actions
(train/actions.py: log, checkpoint, sample sheets, demo classifier, evaluation), each timed as a phase. Everything
printed is also written to metrics.jsonl.

Failure behaviour (docs/failures.md): after the first step the process-group timeout drops to
``dist.step_timeout_s`` (the long ``dist.timeout_s`` returns around between-step actions, where rank 0 may write
while the others wait); a step that takes ``dist.hang_dump_factor`` x the median dumps every rank's stacks; a
non-finite step stops the run or is skipped (``train.nonfinite``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

from hpc_gan.config import Config, dump
from hpc_gan.dist import DistInfo, launch
from hpc_gan.errors import UserError
from hpc_gan.train import checkpoint
from hpc_gan.train.actions import Logger, RunContext, Sampler, build_actions, fmt_time
from hpc_gan.train.hang import HangDump
from hpc_gan.train.metrics import MetricsWriter, NullWriter
from hpc_gan.train.preempt import Preemption, requeue
from hpc_gan.train.timing import PhaseTimer
from hpc_gan.train.trainer import Trainer, check_precision, param_count, resolve_device


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.run.dir)
    for sub in ("checkpoints", "samples"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump(cfg))
    return run_dir


def find_resume(run_dir: Path, resume: Optional[str], verify_hash: bool = True,
                log: Callable[[str], None] = print) -> Optional[Path]:
    """The checkpoint to continue from: with "auto" the newest intact one of the run (damaged newer ones moved
    aside, each with one line), with a path that one, without --resume none (refused where checkpoints exist)."""
    if not resume:
        if checkpoint.any_checkpoints(run_dir / "checkpoints"):
            raise UserError(f"run dir {run_dir} already has checkpoints; pass --resume auto to continue it, or "
                            f"set run.dir=... for a new run (nothing was overwritten)")
        return None
    if resume == "auto":
        return checkpoint.newest_intact(run_dir / "checkpoints", verify_hash, log)
    return checkpoint.resolve(resume)


def train(cfg: Config, resume: Optional[str] = None, log: Callable[[str], None] = print,
          info: Optional[DistInfo] = None) -> Dict[str, Any]:
    """Run (or continue) a training run on this process's rank; returns a summary dict. Without ``info`` the
    launcher is detected (torchrun, srun, mpirun or none) and the process group created and destroyed here."""
    if info is not None:
        summary = _train(cfg, resume, log if info.is_main else (lambda msg: None), info)
    else:
        with launch.session(cfg.dist.timeout_s, cfg.dist.backend, "cpu" if cfg.run.device == "cpu" else "auto") as info:
            summary = _train(cfg, resume, log if info.is_main else (lambda msg: None), info)
    if summary.get("preempted") and info.is_main:
        requeue(log)
    return summary


def _start(cfg: Config, resume: Optional[str], log: Callable[[str], None], info: DistInfo) -> Trainer:
    """The run dir and a trainer at the step to continue from."""
    device = resolve_device(cfg.run.device, info)
    check_precision(cfg.train.precision, device)  # before the run dir is touched
    # rank 0 decides, everyone follows: ranks reading a shared file system on their own may disagree (NFS caches)
    ckpt = launch.agree(lambda: find_resume(Path(cfg.run.dir), resume, cfg.train.verify_checkpoints, log), info)
    if info.is_main:
        prepare_run_dir(cfg)
    launch.barrier(info)
    trainer = Trainer(cfg, device, info)
    t, p = cfg.train, trainer.plan
    log(f"hpc-gan: {cfg.model.arch} {cfg.model.resolution}px, G {param_count(trainer.g.module) / 1e6:.2f}M / "
        f"D {param_count(trainer.d.module) / 1e6:.2f}M params, {cfg.loss.adv} + {cfg.loss.cond}, batch "
        f"{t.batch_size} ({p.accum} x {p.micro} x {info.world} ranks), {device}, run dir {cfg.run.dir}")
    if info.world > 1:
        log(f"distributed: {info.world} ranks via {info.launcher} ({info.backend}, {info.master_addr}:"
            f"{info.master_port}), strategy {cfg.dist.strategy}, sync BN {cfg.dist.sync_bn}, global negatives "
            f"{cfg.loss.global_negatives}")
    if ckpt is not None:
        # rank 0 verified the hash above; every rank checks the size of what it reads
        trainer.load_state_dict(checkpoint.load_consolidated(ckpt, map_location=device, verify_hash=False, log=log))
        log(f"resumed from {ckpt} at step {trainer.step}")
    return trainer


def _train(cfg: Config, resume: Optional[str], log: Callable[[str], None], info: DistInfo) -> Dict[str, Any]:
    trainer = _start(cfg, resume, log, info)
    run_dir, start, d = Path(cfg.run.dir), trainer.step, cfg.dist
    writer = MetricsWriter(run_dir, cfg.run.tensorboard, resume_step=start if start else None) \
        if info.is_main else NullWriter()
    ctx = RunContext(cfg, trainer, info, run_dir, writer, log, PhaseTimer(), Sampler(trainer),
                     summary={"run_dir": str(run_dir), "start_step": start})
    preemption = Preemption(cfg.run.preempt_signals, info)
    # a dump explains a hang before the collective times out, not a slow step on a shared machine: at least a
    # quarter of the timeout that ends the job (a busy 2-core demo dumped every few steps at the old 1 s floor)
    hang = HangDump(d.hang_dump_factor, min_seconds=max(1.0, (d.step_timeout_s or d.timeout_s) / 4))
    timeouts = launch.StepTimeouts(info, d.timeout_s, d.step_timeout_s)
    try:
        actions = build_actions(ctx, preemption)
        mine = [a for a in actions if info.is_main or not a.main_only]  # what runs on this rank
        logger = next(a for a in actions if isinstance(a, Logger))
        for action in mine:
            action.at_start(trainer.step)
        while trainer.step < cfg.train.steps and not ctx.summary.get("preempted"):
            with hang.watch(), ctx.timer.phase("train"):
                trainer.train_step(diagnostics=logger.diagnostics_due(trainer.step + 1))
            if trainer.step == start + 1 and trainer.compile_mode:
                ctx.summary["first_step_seconds"] = round(ctx.timer.totals_ms()["train"] / 1e3, 2)
                log(f"first step {ctx.summary['first_step_seconds']:.1f} s (torch.compile, mode "
                    f"{trainer.compile_mode}: later steps with new input shapes or grad modes compile too)")
            step, final = trainer.step, trainer.step == cfg.train.steps
            due = [a for a in actions if a.due(step, final)]  # every rank, every step, in order: the same list
            _check_nonfinite(trainer, run_dir, now=bool(due))
            with timeouts.between_steps(busy=bool(due)):
                if any(a.reads_ema for a in due):
                    trainer.sync_ema()  # collective: before a rank-0-only action reads G_ema
                for action in due:
                    if action in mine:
                        with ctx.timer.phase(action.name):
                            action.run(step, final)
            ctx.sampler.clear()
            ctx.evals.clear()
            if ctx.rollback_to is not None:
                _rollback(ctx, mine)
        trainer.sync_ema()
        for action in mine:
            action.at_end()
    except BaseException:
        preemption.close(wait=False)
        raise
    finally:
        writer.close()
    preemption.close()
    return _finish(ctx)


def _rollback(ctx: RunContext, actions: list) -> None:
    """Continue from the watchdog's pre-alarm checkpoint with both learning rates scaled (every rank)."""
    path, ctx.rollback_to = ctx.rollback_to, None
    trainer, scale = ctx.trainer, ctx.cfg.train.rollback_lr_scale
    trainer.load_state_dict(checkpoint.load_consolidated(path))
    trainer.scale_lr(scale)
    for action in actions:
        action.at_rollback(trainer.step)
    ctx.log(f"watchdog: rolled back to {path} (step {trainer.step}); learning rates x{scale:g}")


def _check_nonfinite(trainer: Trainer, run_dir: Path, now: bool) -> None:
    """Stop where train.nonfinite says so (the guard reads its device flags one step late, or now)."""
    problem = trainer.guard.check(now)
    if problem:
        newest = checkpoint.latest(run_dir / "checkpoints")
        raise UserError(f"{problem}; nothing of it was saved, the newest checkpoint is {newest or 'none yet'}: "
                        f"lower the learning rates, check the data, or set train.nonfinite=skip, and resume with "
                        f"--resume auto")


def _finish(ctx: RunContext) -> Dict[str, Any]:
    cfg, summary, step = ctx.cfg, ctx.summary, ctx.trainer.step
    steps_done = step - summary["start_step"]
    if not steps_done:
        ctx.log(f"run already at step {step} of train.steps={cfg.train.steps}; nothing to train (raise "
                f"train.steps to continue)")
    seconds = {k: v / 1e3 for k, v in ctx.timer.totals_ms().items()}
    summary.update(step=step, steps_run=steps_done, phase_seconds={k: round(v, 2) for k, v in seconds.items()})
    if steps_done:
        summary["sec_per_step"] = seconds["train"] / steps_done
    ctx.writer.write(step, {"summary": summary})
    ctx.log("phases: " + ", ".join(f"{k} {fmt_time(v)}" for k, v in seconds.items())
            + (f"; {summary['sec_per_step']:.3f} s/step" if steps_done else ""))
    if "sample_class_accuracy" in summary:
        ctx.log(f"final class accuracy of EMA samples: {summary['sample_class_accuracy']:.3f} "
                f"(chance {1 / cfg.data.num_classes:.3f}); sheets in {ctx.run_dir / 'samples'}")
    return summary
