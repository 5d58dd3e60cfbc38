"""What happens between training steps, as periodic actions (torchtitan's style): each component decides its own
interval, ``due(step, final)``, and does its work, ``run(step, final)``; the run loop calls them in order and times
each as its own phase. ``at_start`` runs once before the first step and ``at_end`` once after the last.

Every rank calls every action's ``due`` at every step, in the same order, so an action may take part in a
collective there (the checkpointer agrees on the preemption flag) or in ``run`` (evaluation is sharded)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from hpc_gan.config import Config
from hpc_gan.dist import DistInfo, launch
from hpc_gan.errors import UserError
from hpc_gan.eval.sampling import sample_sheet, sheet_classes
from hpc_gan.train import checkpoint
from hpc_gan.train.preempt import Preemption
from hpc_gan.train.timing import PhaseTimer
from hpc_gan.train.trainer import Trainer


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Sampler:
    """G_ema with standing statistics, built at most once per step for the actions that sample from it."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self._model: Optional[nn.Module] = None
        self._step = -1

    def get(self) -> nn.Module:
        if self._step != self.trainer.step:
            self._model, self._step = self.trainer.sampling_generator(), self.trainer.step
        return self._model

    def clear(self) -> None:
        self._model, self._step = None, -1


@dataclass
class RunContext:
    """What the actions of one run share."""
    cfg: Config
    trainer: Trainer
    info: DistInfo
    run_dir: Path
    writer: Any                                  # train.metrics.MetricsWriter (rank 0) or NullWriter
    log: Callable[[str], None]
    timer: PhaseTimer                            # the loop's wall-clock phases ("train", and one per action)
    sampler: Sampler
    summary: Dict[str, Any] = field(default_factory=dict)
    stopping: bool = False                       # preempted: only the checkpoint still runs at this step
    last_metrics: Dict[str, Any] = field(default_factory=dict)   # what the Logger popped, and at which step
    last_metrics_step: int = -1
    evals: Dict[str, float] = field(default_factory=dict)        # this step's evaluation results (cleared each step)
    pinned: List[Path] = field(default_factory=list)             # checkpoints retention must keep (pre-alarm)
    rollback_to: Optional[Path] = None                           # set by the watchdog: the loop reloads it

    def barrier(self) -> None:
        launch.barrier(self.info)


class Action:
    """One periodic part of a run. Every rank builds every action and asks ``due`` at every step, so all ranks
    agree on which steps are busy; ``main_only`` actions then run on rank 0 alone, and the loop assembles G_ema
    (collective) before actions that ``reads_ema`` run."""
    name = "action"
    main_only = False
    reads_ema = False

    def at_start(self, step: int) -> None:
        pass

    def due(self, step: int, final: bool) -> bool:
        raise NotImplementedError

    def run(self, step: int, final: bool) -> None:
        raise NotImplementedError

    def at_end(self) -> None:
        pass

    def at_rollback(self, step: int) -> None:
        """The run went back to ``step`` (the watchdog's rollback)."""


class Logger(Action):
    """Means of the step's losses since the last log, throughput and ETA, to metrics.jsonl and one printed line.
    Decides where the diagnostics run: the step before each log."""
    name = "log"

    def __init__(self, ctx: RunContext) -> None:
        self.ctx, self.every = ctx, ctx.cfg.train.log_every
        self.last_wall, self.last_step, self.last_train_ms = time.perf_counter(), ctx.trainer.step, 0.0

    def diagnostics_due(self, next_step: int) -> bool:
        t = self.ctx.cfg.train
        return t.diagnostics and next_step % (t.diag_every or self.every) == 0

    def at_rollback(self, step: int) -> None:
        self.ctx.trainer.pop_metrics()  # the abandoned steps' means (collective, like every pop)
        self.last_wall, self.last_step = time.perf_counter(), step
        self.last_train_ms = self.ctx.timer.totals_ms().get("train", 0.0)

    def due(self, step: int, final: bool) -> bool:
        return step % self.every == 0 or final

    def run(self, step: int, final: bool) -> None:
        ctx, t = self.ctx, self.ctx.cfg.train
        values = ctx.trainer.pop_metrics()
        ctx.last_metrics, ctx.last_metrics_step = dict(values), step
        # img/s counts training-step time only; the ETA uses wall time, sheets and checkpoints included
        now, train_ms = time.perf_counter(), ctx.timer.totals_ms().get("train", 0.0)
        n, train_s = step - self.last_step, (train_ms - self.last_train_ms) / 1e3
        rate = n / max(now - self.last_wall, 1e-9)
        values.update(samples_per_s=n * t.batch_size / max(train_s, 1e-9), sec_per_step=train_s / n)
        self.last_wall, self.last_step, self.last_train_ms = now, step, train_ms
        ctx.writer.write(step, values)
        losses = " ".join(f"{k} {values[k]:.3f}" for k in ("d_loss", "g_loss", "d_cond", "g_cond")
                          if values.get(k) is not None)
        skipped = f" | {values['nonfinite_steps']:.0f} steps skipped" if values.get("nonfinite_steps") else ""
        ctx.log(f"step {step}/{t.steps} | {losses} | {values['samples_per_s']:.1f} img/s | "
                f"eta {fmt_time((t.steps - step) / max(rate, 1e-9))}{skipped}")


class SampleSheets(Action):
    """G_ema sheets (one row per class, the run's fixed z) in RUN/samples/ (rank 0)."""
    name = "sample"
    main_only = reads_ema = True

    def __init__(self, ctx: RunContext) -> None:
        self.ctx, self.every = ctx, ctx.cfg.train.sample_every

    def due(self, step: int, final: bool) -> bool:
        return (step % self.every == 0 or final) and not self.ctx.stopping

    def run(self, step: int, final: bool) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg
        G = ctx.sampler.get()
        sample_sheet(G, ctx.run_dir / "samples" / f"step-{step:08d}.png", sheet_classes(cfg.data.num_classes), 8,
                     cfg.model.z_dim, ctx.trainer.plan.rng.sheet(ctx.trainer.device), cfg.train.truncation)


class DemoClassifier(Action):
    """Trains a small classifier on the run's (in-memory) data set, then reports the fraction of G_ema's samples
    that it assigns to the class they were drawn for, and their within-class diversity: at step 0, at every sheet
    and at the end (rank 0)."""
    name = "classifier"
    main_only = reads_ema = True

    def __init__(self, ctx: RunContext) -> None:
        from hpc_gan.data import InMemoryDataset
        if not isinstance(ctx.trainer.dataset, InMemoryDataset):
            raise UserError("train.demo_classifier needs an in-memory data set (data.name=synthetic or npz)")
        self.ctx, self.every = ctx, ctx.cfg.train.sample_every
        self.model: Optional[nn.Module] = None

    def score(self, step: int) -> float:
        from hpc_gan.eval.classifier import sample_scores
        ctx, cfg = self.ctx, self.ctx.cfg
        G, dev = ctx.sampler.get(), ctx.trainer.device
        g = ctx.trainer.plan.rng.demo_samples(dev)

        def sample(y: torch.Tensor) -> torch.Tensor:
            return G(torch.randn(len(y), cfg.model.z_dim, generator=g, device=dev), y.to(dev))

        acc, div = sample_scores(self.model, sample, cfg.data.num_classes, per_class=50)
        scores = {"sample_class_accuracy": acc, "sample_class_diversity": div}
        ctx.evals.update(scores)
        ctx.writer.write(step, scores)
        ctx.log(f"step {step}: class accuracy of samples {acc:.3f} (chance {1 / cfg.data.num_classes:.3f}), "
                f"within-class diversity {div:.3f}")
        ctx.summary.update(scores)
        return acc

    def at_start(self, step: int) -> None:
        from hpc_gan.eval.classifier import train_classifier
        ctx, ds, rng = self.ctx, self.ctx.trainer.dataset, self.ctx.trainer.plan.rng
        self.model, acc, secs = train_classifier(ds.images, ds.labels, ctx.cfg.data.num_classes,
                                                 rng.demo_classifier(), rng.demo_classifier_init())
        ctx.log(f"demo classifier: {acc:.3f} accuracy on held-out real images (trained in {secs:.0f} s)")
        if step == 0:
            self.score(0)

    def due(self, step: int, final: bool) -> bool:
        return (step % self.every == 0 or final) and not self.ctx.stopping

    def run(self, step: int, final: bool) -> None:
        self.score(step)

    def at_end(self) -> None:
        if self.ctx.trainer.step == self.ctx.summary["start_step"]:  # nothing was trained: score what is there
            self.score(self.ctx.trainer.step)


class Evaluation(Action):
    """FID / IS / precision-recall of G_ema every ``eval.every`` steps (every rank: sampling is sharded)."""
    name = "eval"
    reads_ema = True

    def __init__(self, ctx: RunContext) -> None:
        from hpc_gan.eval.evaluate import RunEvaluator
        self.ctx, self.every = ctx, ctx.cfg.eval.every
        self.evaluator = RunEvaluator(ctx.cfg, ctx.trainer.dataset, ctx.trainer.device, ctx.log)

    def due(self, step: int, final: bool) -> bool:
        return (step % self.every == 0 or final) and not self.ctx.stopping

    def run(self, step: int, final: bool) -> None:
        result = self.evaluator(self.ctx.sampler.get())
        self.ctx.evals.update(result)
        self.ctx.writer.write(step, result)
        self.ctx.log(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
        self.ctx.summary.update(result)


class Checkpointer(Action):
    """Checkpoints every ``train.checkpoint_every`` steps, at the last step and when preempted (then nothing else
    runs at that step and the loop stops; the Slurm job is requeued at exit); retention keeps the newest
    ``train.keep_checkpoints``. Replicas are checked before every save and every ``dist.check_every`` steps. It runs
    before sheets and evaluation, so a preemption signal never waits behind them."""
    name = "checkpoint"

    def __init__(self, ctx: RunContext, preemption: Preemption) -> None:
        self.ctx, self.preemption = ctx, preemption
        self.every, self.check_every = ctx.cfg.train.checkpoint_every, ctx.cfg.dist.check_every
        self.preempted = self.saving = False

    def due(self, step: int, final: bool) -> bool:
        self.preempted = not final and self.preemption.requested()  # every rank asks at every step
        self.ctx.stopping = self.preempted
        self.saving = step % self.every == 0 or final or self.preempted
        return self.saving or bool(self.check_every and step % self.check_every == 0)

    def run(self, step: int, final: bool) -> None:
        ctx = self.ctx
        if self.preempted:
            ctx.log(f"preemption signal: saving a checkpoint at step {step}")
        ctx.trainer.check_replicas()  # collective, like state_dict under ZeRO: every rank takes part
        if not self.saving:
            return
        state = ctx.trainer.state_dict()
        if ctx.info.is_main:
            root = ctx.run_dir / "checkpoints"
            checkpoint.save(root, step, state)
            checkpoint.prune(root, ctx.cfg.train.keep_checkpoints, pinned=tuple(ctx.pinned))
        ctx.barrier()
        if self.preempted:
            ctx.summary["preempted"] = True  # the loop stops; train() requeues once the process group is down


class WatchdogAction(Action):
    """The collapse watchdog (hpc_gan.train.watchdog) after each logging step and evaluation: rank 0 decides from
    the step's metrics and evaluations, every rank acts alike (launch.agree). Each alarm goes to RUN/alarms.jsonl and
    the metrics, and pins the newest checkpoint from before it against retention; then ``train.on_alarm``: warn,
    stop (AlarmStop, exit 3), or rollback (the loop reloads that checkpoint with the learning rates scaled)."""
    name = "watchdog"

    def __init__(self, ctx: RunContext, observed: List[Action]) -> None:
        """``observed``: the actions whose results it reads (the logger, demo classifier, evaluation); it is due
        when one of them was."""
        from hpc_gan.train.watchdog import Watchdog, read_alarms
        self.ctx, t = ctx, ctx.cfg.train
        self.observed = observed
        self.dog = Watchdog(t)
        past = read_alarms(ctx.run_dir)  # a restarted run keeps its pins and its rollback count
        ctx.pinned.extend(Path(r["checkpoint"]) for r in past if r.get("checkpoint"))
        self.rollbacks = sum(r.get("action") == "rollback" for r in past)

    def due(self, step: int, final: bool) -> bool:
        return not self.ctx.stopping and any(a.due(step, final) for a in self.observed)

    def _checkpoint_before(self, step: int) -> Optional[Path]:
        before = [c for c in checkpoint.complete_checkpoints(self.ctx.run_dir / "checkpoints")
                  if checkpoint.step_of(c) < step]
        return before[-1] if before else None

    def _decide(self, step: int) -> Dict[str, Any]:
        from hpc_gan.errors import AlarmStop
        from hpc_gan.train.watchdog import alarm_record, append_alarm
        ctx, t = self.ctx, self.ctx.cfg.train
        values = ctx.last_metrics if ctx.last_metrics_step == step else {}
        alarms = self.dog.observe(step, values, dict(ctx.evals))
        if not alarms:
            return {}
        back = self._checkpoint_before(step)
        action = t.on_alarm
        if action == "rollback" and (back is None or self.rollbacks >= t.max_rollbacks):
            action = "stop"
        for a in alarms:
            a.checkpoint = str(back) if back else None
            append_alarm(ctx.run_dir, alarm_record(a, action))
            ctx.writer.write(step, {f"alarm_{a.kind}": a.value})
        if action == "stop":
            why = (f"rollbacks used up (train.max_rollbacks={t.max_rollbacks})" if t.on_alarm == "rollback" and back
                   else "nothing to roll back to" if t.on_alarm == "rollback" else "train.on_alarm=stop")
            go_back = (f"go back to {back}: hpc-gan train --config {ctx.run_dir / 'config.yaml'} --resume {back} "
                       f"with lower learning rates" if back else "no checkpoint precedes it")
            raise AlarmStop(f"{alarms[0].line().split(';')[0]} ({len(alarms)} alarm(s), RUN/alarms.jsonl); stopped: "
                            f"{why}; {go_back}")
        return {"lines": [a.line() for a in alarms], "action": action, "checkpoint": str(back) if back else None}

    def run(self, step: int, final: bool) -> None:
        ctx = self.ctx
        decision = launch.agree(lambda: self._decide(step), ctx.info)
        for line in decision.get("lines", []):
            ctx.log(line)
        if decision.get("checkpoint"):
            ctx.pinned.append(Path(decision["checkpoint"]))
        if decision.get("action") == "rollback" and not final:
            self.rollbacks += 1
            ctx.rollback_to = Path(decision["checkpoint"])

    def at_rollback(self, step: int) -> None:
        self.dog.reset()


def build_actions(ctx: RunContext, preemption: Preemption) -> List[Action]:
    """The run's actions, in the order they run after each step."""
    cfg = ctx.cfg
    actions: List[Action] = [Logger(ctx), Checkpointer(ctx, preemption), SampleSheets(ctx)]
    if cfg.train.demo_classifier:
        actions.append(DemoClassifier(ctx))
    if cfg.eval.every:
        actions.append(Evaluation(ctx))
    if cfg.train.watchdog:  # last: it sees this step's metrics, checkpoint and evaluations
        observed = [a for a in actions if isinstance(a, (Logger, DemoClassifier, Evaluation))]
        actions.append(WatchdogAction(ctx, observed))
    return actions
