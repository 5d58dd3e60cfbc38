"""One training step of a class-conditional GAN: n_dis D updates, then one G update, then the EMA of G.

- D step: real and fake through D in one forward (what ZeRO engines need), adversarial loss + lambda_d x the
  conditioning loss on the real part, optional consistency regularization and gradient penalty.
- G step: D's parameters frozen and D called as the plain module; adversarial loss + lambda_g x the conditioning
  loss of fakes with sampled labels, + BigGAN's orthogonal regularization.
- Every random draw comes from the step plan's named streams (hpc_gan.plan), drawn for the whole global batch and
  sliced to this rank's positions, so a step is the same whatever the world size and a resumed run replays exactly
  what an uninterrupted one does.
- No host synchronization in the step: losses are summed as device tensors and read at logging steps only.
"""
from __future__ import annotations

import contextlib
import copy
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from hpc_gan.augment import Draws, consistency_augment, diff_augment
from hpc_gan.config import Config, comma_list, to_dict
from hpc_gan.data import build_dataset, build_stream
from hpc_gan.dist import DistInfo
from hpc_gan.dist.launch import local_device_index
from hpc_gan.dist.batchnorm import average_running_stats, bn_process_group, convert_cross_replica_bn
from hpc_gan.dist.consistency import check_replicas
from hpc_gan.dist.engines import CommOptions, TorchNet, broadcast_state, build_net
from hpc_gan.dist.gather import gather_negatives
from hpc_gan.errors import UserError
from hpc_gan.losses import (add_orthogonal_grad_, cond_loss, d_adv_loss, g_adv_loss, gradient_penalty, has_cond_loss,
                            ortho_shards, ortho_weights, orthogonal_reg, seed_orthogonal_grad_)
from hpc_gan.mkl_vml import warm_vml_dispatch
from hpc_gan.models import build_models, set_memory_format
from hpc_gan.models.heads import NamedBatch
from hpc_gan.models.sn_fused import attach_fused_sn, sn_sigmas
from hpc_gan.plan import G_PHASE, StepPlan, d_phase
from hpc_gan.train.ema import EMA, sampling_standing_stats
from hpc_gan.train.metrics import StepMetrics
from hpc_gan.train.nonfinite import NonFiniteGuard
from kernels import BackendUnavailable, resolve_sn_backend, use_triton

Batch = Tuple[torch.Tensor, torch.Tensor]  # (images or z, labels) of one micro-batch


def resolve_device(name: str, info: Optional[DistInfo] = None) -> torch.device:
    """The device of this rank: its GPU where CUDA is used (launch.local_device_index), else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    info = info or DistInfo()
    return torch.device("cuda", local_device_index(info.local_rank, torch.cuda.device_count(), info.local_world))


def check_precision(precision: str, device: torch.device) -> None:
    if precision != "fp32" and device.type != "cuda":
        raise UserError(f"train.precision={precision} needs a CUDA device; use train.precision=fp32 on the CPU")


def compile_mode(cfg: Config, device: torch.device) -> Optional[str]:
    """torch.compile's mode for G's and D's forward, or None (eager). train.cuda_graphs is the reduce-overhead mode,
    whose CUDA graphs replay a whole compiled forward (and backward) as one launch."""
    t = cfg.train
    if t.cuda_graphs and device.type != "cuda":
        raise UserError("train.cuda_graphs=true needs a CUDA device; leave it false on the CPU")
    if t.compile_tuning and device.type != "cuda":  # the CPU's C++ kernels have no launch configs to tune
        raise UserError("train.compile_tuning=true tunes inductor's Triton kernels, which run on CUDA; leave it "
                        "false on the CPU")
    mode = "reduce-overhead" if t.cuda_graphs else None if t.compile == "off" else t.compile
    if mode and device.type == "cuda" and cfg.model.pool_impl == "nearest_grad":
        # H100, torch 2.11 (2026-11-27): dynamo broke D's graph at this autograd.Function and compiled its frame
        # once per pooled shape until the recompile limit stopped the run, after minutes of compiling
        raise UserError("model.pool_impl=nearest_grad does not compile on CUDA (its autograd.Function breaks D's "
                        "graph); use model.pool_impl=auto (reshape there) with train.compile or train.cuda_graphs")
    return mode


def compile_forwards(nets: Tuple[nn.Module, ...], mode: str, tuning: bool = False) -> None:
    """torch.compile each net's forward with static shapes. Training shapes are fixed, and with the whole-network
    SN all nets' forwards are one code object (FusedSpectralNorm._forward), whose cache dynamo shares: its automatic
    dynamic shapes took D's inputs for a change of G's and compiled every later graph with symbolic sizes (conv
    kernel sizes included), slower to build and to run, and crashing inductor at BigGAN-128 on the CPU. A variant
    past dynamo's recompile limit is an error, not a silent fall back to eager. ``tuning`` (train.compile_tuning):
    inductor benchmarks the neighbouring launch configs of each fused kernel slower than
    ``compile_tuning.TUNE_ABOVE_MS`` and keeps the fastest (coordinate descent; max-autotune's, without its GEMM and
    convolution templates, which would autotune every convolution shape): its heuristics gave the H200's CUDA-graph
    step at 256 a reduction kernel of 5.9 ms (2026-11-27). A process-wide inductor setting, as the recompile limit
    is."""
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if tuning:
        from hpc_gan.train import compile_tuning
        compile_tuning.enable()
    for net in nets:
        net.forward = torch.compile(net.forward, mode=mode, dynamic=False)


def check_kernel_backends(cfg: Config, device: torch.device) -> None:
    """Refuse, in one line, a fused-kernel backend that cannot run here (before anything is built)."""
    probe = torch.empty(0, device=device)
    for key, backend in (("model.sn_backend", cfg.model.sn_backend), ("loss.backend", cfg.loss.backend)):
        try:
            use_triton("auto" if backend == "foreach" else backend, probe, op=key)
        except BackendUnavailable as e:
            raise UserError(str(e)) from None
    sn = resolve_sn_backend(cfg.model.sn_backend, probe)
    if cfg.model.sn_static_weights and sn != "triton":
        raise UserError(f"model.sn_static_weights=true writes into the triton SN backend's buffers, and "
                        f"model.sn_backend={cfg.model.sn_backend} runs {sn} here; use it on CUDA (or with "
                        f"TRITON_INTERPRET=1), or leave it false")


class Trainer:
    """The step, on one rank of ``info.world`` (one process by default). ``self.g`` / ``self.d`` are the training
    handles of G and D (hpc_gan.dist.engines.Net); ``.module`` is the plain network."""

    def __init__(self, cfg: Config, device: torch.device, info: Optional[DistInfo] = None) -> None:
        warm_vml_dispatch()  # before the first threaded CPU math: a torch + MKL bug (hpc_gan.mkl_vml)
        info = info or DistInfo()
        self.cfg, self.device, self.info = cfg, device, info
        self.rank, self.world = info.rank, info.world
        self.plan = StepPlan.from_config(cfg, info.rank, info.world)
        t, lc = cfg.train, cfg.loss
        check_precision(t.precision, device)
        check_kernel_backends(cfg, device)
        self.compile_mode = compile_mode(cfg, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = t.cudnn_benchmark
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
        if cfg.dist.strategy != "ddp":  # DeepSpeed's bf16 engine holds bf16 weights itself: no autocast on top
            self.amp_dtype = None
        torch.manual_seed(self.plan.rng.weights_init())  # identical initial weights for a given seed, on every rank
        G, D = (net.to(device) for net in build_models(cfg))
        self.channels_last = set_memory_format(cfg.model.memory_format, device, G, D)
        self.ema = EMA(G, t.ema_decay, t.ema_start)  # before the BN swap: G_ema samples on one rank alone
        d = cfg.dist
        # G's BN statistics per rank (dist.sync_bn=false) or per group of ranks: replicas agree on them only once
        # averaged, which checks and saves do first
        self.local_bn_stats = self.world > 1 and (not d.sync_bn or 0 < d.bn_group_size < self.world)
        if self.world > 1 and d.sync_bn:  # communicators are created collectively, in this order, on every rank
            convert_cross_replica_bn(G, bn_process_group(d.bn_group_size, self.rank, self.world, d.dedicated_groups))
        self.negatives = None
        if self.world > 1 and lc.global_negatives and lc.cond == "d2d_ce":
            group = dist.new_group(list(range(self.world))) if d.dedicated_groups else None
            self.negatives = partial(gather_negatives, group=group, all_reduce=d.negatives_backward == "all_reduce")
        # after the EMA copy: G_ema samples in eval mode, where every layer computes its own sigma
        self.fused_sn = [attach_fused_sn(net, cfg.model.sn_backend, cfg.model.sn_static_weights) for net in (G, D)]
        if self.compile_mode:  # the forward only: hooks (the whole-network SN) stay eager; G_ema stays eager
            compile_forwards((G, D), self.compile_mode, tuning=t.compile_tuning)
        broadcast_state(G)
        broadcast_state(D)
        p = self.plan
        # static_graph: each DDP forward is followed by exactly one synchronizing backward, except where the
        # gradient penalty backpropagates through D a second time or accumulation runs backwards under no_sync
        # (torch's reducer asserts there: measured)
        comm = CommOptions.from_config(d, static_graph_valid=lc.adv != "wasserstein" and p.accum == 1)
        common = dict(betas=(t.beta1, t.beta2), eps=t.adam_eps, micro=p.micro, accum=p.accum, world=self.world,
                      precision=t.precision, optimizer_impl=t.optimizer_impl, comm=comm)
        self.g = build_net(G, d.strategy, t.g_lr, **common)
        self.d = build_net(D, d.strategy, t.d_lr, **common)
        self.ema.follow_masters(self.g.master_fragments())
        self.dataset = build_dataset(cfg.data, cfg.model.resolution, t.seed, self.world)
        self.real = build_stream(cfg, self.dataset, self.plan, device)
        self.positions = self.plan.positions.to(device)  # this rank's rows of every global draw
        self.policies = comma_list(lc.diffaug)
        self.has_cond_loss = has_cond_loss(lc.cond)
        # BigGAN's orthogonal regularization: where G's gradients are whole and unscaled (torch engine, not fp16),
        # its gradient without autograd: with DDP on several ranks each rank seeds its rows of it before G's
        # backward and the all-reduce assembles them (every rank computing all of it is a fixed cost per GPU that
        # more GPUs do not shrink), else added after the backward; in the loss (the reference) otherwise
        direct = isinstance(self.g, TorchNet) and t.precision != "fp16"
        auto = ("sharded" if self.world > 1 else "grad") if direct else "autograd"
        ortho = (auto if lc.ortho_impl == "auto" else lc.ortho_impl) if lc.ortho_beta > 0 else "off"
        self.ortho_in_grad, self.ortho_in_loss = ortho == "grad", ortho == "autograd"
        self.ortho_params = ortho_weights(self.g.module) if ortho != "off" else []  # once, not per G step
        self.ortho_blocks = ortho_shards([(w.shape[0], w[0].numel()) for w in self.ortho_params],
                                         self.world)[self.rank] if ortho == "sharded" else None
        # walked once here, not per step: Module.train() and requires_grad_() walk the module tree each call
        # (~0.2 and ~0.08 ms of host time per step on the development CPU at BigGAN-128; benchmarks.md)
        self.step_modules = [m for net in (self.g.module, self.d.module) for m in net.modules()]
        self.d_params = list(self.d.module.parameters())
        self.step = 0
        self.timer: Optional[Any] = None  # a train.timing.PhaseTimer while benchmarking
        self.metrics = StepMetrics()
        self.guard = NonFiniteGuard(t.nonfinite, t.nonfinite_max, device, self.world)

    # ---- helpers -------------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _latents(self, phase: int) -> Batch:
        """This rank's rows of the global z and fake labels of a phase of the current step."""
        gen = self.plan.rng.latents(self.step, phase, self.device)
        b = self.plan.batch
        z = torch.randn(b, self.cfg.model.z_dim, generator=gen, device=self.device)
        y = torch.randint(0, self.cfg.data.num_classes, (b,), generator=gen, device=self.device)
        return z[self.positions], y[self.positions]

    def _draws(self, stream: Callable[[int, int, torch.device], torch.Generator], phase: int, m: int) -> Draws:
        """Draws of one random stream (a RandomStreams method) for micro-batch m of a phase of the current step."""
        return Draws.micro_batch(stream(self.step, phase, self.device), self.plan, m)

    def _augment(self, x: torch.Tensor, stream: Callable, phase: int, m: int) -> torch.Tensor:
        return diff_augment(x, self.policies, self._draws(stream, phase, m)) if self.policies else x

    def pop_metrics(self) -> Dict[str, Optional[float]]:
        """Means of the step's metrics since the last call, and the number of steps with a non-finite update.
        Synchronizes (collective when distributed): call at logging steps only, on every rank."""
        return self.metrics.pop(self.world, nonfinite_steps=self.guard.pop_window())

    def _phase(self, name: str) -> contextlib.AbstractContextManager:
        return self.timer.phase(name) if self.timer is not None else contextlib.nullcontext()

    def _cond_loss(self, out: Dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return cond_loss(self.cfg.loss.cond, out, labels, self.cfg.loss, negatives=self.negatives)

    # ---- the step ------------------------------------------------------------------------------------------
    def d_step(self, k: int, diagnostics: bool = False) -> None:
        """D update k (0-based) of the current step."""
        phase, p = d_phase(k), self.plan
        self._begin_graph_step()
        z, yf = self._latents(phase)
        with self._phase("data"):
            xr, yr = self.real.next()
        losses = []
        for m in range(p.accum):
            sl = p.micro_slice(m)
            with self.d.micro(last=m == p.accum - 1):
                with self._phase("d_forward"):
                    loss = self._d_loss(phase, m, (xr[sl], yr[sl]), (z[sl], yf[sl]), diagnostics and m == 0)
                with self._phase("d_backward"):
                    self.d.micro_backward(loss / p.accum)
            losses.append(loss.detach())
        with self._phase("d_optimizer"):
            self.d.optimizer_step(self._update_flag(losses, self.d))

    def _begin_graph_step(self) -> None:
        """Under CUDA graphs (reduce-overhead), each D or G update is a new iteration: the previous update's graph
        outputs are dead, so the graphs may replay into them (torch otherwise guesses, and falls back to eager on
        pending backwards)."""
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def _d_loss(self, phase: int, m: int, real: Batch, latents: Batch, diagnostics: bool) -> torch.Tensor:
        """D's loss on micro-batch m of a D phase (forward only)."""
        lc, rng = self.cfg.loss, self.plan.rng
        xr, yr = real
        z, yf = latents
        with self._autocast():
            with torch.no_grad():
                xf = self.g.module(z, yf).to(xr.dtype)
            parts = {"real": (self._augment(xr, rng.real_augment, phase, m), yr),
                     "fake": (self._augment(xf, rng.fake_augment, phase, m), yf)}
            if lc.cr_lambda > 0:
                parts["consistency"] = (consistency_augment(xr, self._draws(rng.consistency, phase, m)), yr)
            batch = NamedBatch(**parts)
            out = batch.split(self.d(batch.images, batch.labels))
        adv_r, adv_f = out["real"]["adv"].float(), out["fake"]["adv"].float()
        loss_adv = d_adv_loss(lc.adv, adv_r, adv_f)
        loss = loss_adv
        values = {"d_adv": loss_adv, "d_real": adv_r.mean(), "d_fake": adv_f.mean()}
        if self.has_cond_loss:
            values["d_cond"] = loss_c = self._cond_loss(out["real"], yr)
            loss = loss + lc.cond_lambda_d * loss_c
        if diagnostics:  # every conditioning: sigma_0 and the feature norm do not need a conditioning loss
            self._diagnostics(out["real"]["h"], yr)
        if lc.cr_lambda > 0:
            values["d_cr"] = loss_cr = ((out["consistency"]["adv"].float() - adv_r) ** 2).mean()
            loss = loss + lc.cr_lambda * loss_cr
        if lc.adv == "wasserstein":
            alpha = self._draws(rng.gp_mix, phase, m).rand(1, 1, 1)
            values["d_gp"] = gp = gradient_penalty(lambda xi: self.d.module(xi, yr)["adv"].float(), xr, xf, alpha)
            loss = loss + lc.gp_lambda * gp
        self.metrics.add(d_loss=loss, **values)
        return loss

    def _diagnostics(self, h: torch.Tensor, labels: torch.Tensor) -> None:
        """ReACGAN Fig. 2: mean norm of D's features entering the conditioning head, and the norm of the
        conditioning loss's gradient w.r.t. the head's weights (classifier or linear head P and proxies); BigGAN's
        sigma_0 (top singular values of the SN layers). The head is re-run on detached features with detached
        copies of its weights, in eval mode (same sigma, no extra power iteration): the step's own graph, which a
        DeepSpeed engine watches, is not touched."""
        values = {"diag_feature_norm": h.detach().float().norm(dim=1).mean()}
        for tag, net in (("G", self.g.module), ("D", self.d.module)):
            sig = torch.stack(list(sn_sigmas(net).values()))
            values[f"diag_sigma_{tag}_max"], values[f"diag_sigma_{tag}_mean"] = sig.max(), sig.mean()
        if not self.has_cond_loss:  # projection: no conditioning loss, so no gradient of one
            self.metrics.add(**values)
            return
        head = self.d.module.head
        params = {n: p.detach().requires_grad_() for n, p in head.named_parameters()}
        cond = [params[n] for n in head.cond_parameter_names()]
        head.eval()
        try:
            with torch.enable_grad(), self._autocast():
                out = torch.func.functional_call(head, params, (h.detach(), labels))
            loss_c = self._cond_loss(out, labels)
        finally:
            head.train()
        grads = torch.autograd.grad(loss_c, cond, allow_unused=True)
        sq = [g.float().pow(2).sum() for g in grads if g is not None]
        if sq:
            values["diag_cond_grad_norm"] = torch.stack(sq).sum().sqrt()
        self.metrics.add(**values)

    def g_step(self) -> None:
        p = self.plan
        self._begin_graph_step()
        z, yf = self._latents(G_PHASE)
        self._freeze_d(True)  # frozen, and called as the plain module: D is only a function of the fakes
        if self.ortho_blocks is not None:  # seeded before the synchronized backward, which averages over ranks
            with self._phase("g_optimizer"):
                self.metrics.add(g_ortho=seed_orthogonal_grad_(self.ortho_params, self.cfg.loss.ortho_beta,
                                                               self.ortho_blocks, self.world))
        losses = []
        for m in range(p.accum):
            last = m == p.accum - 1
            sl = p.micro_slice(m)
            with self.g.micro(last):
                with self._phase("g_forward"):
                    total = self._g_loss(m, (z[sl], yf[sl]), last)
                with self._phase("g_backward"):
                    self.g.micro_backward(total)
            losses.append(total.detach())
        with self._phase("g_optimizer"):
            if self.ortho_in_grad:
                self.metrics.add(g_ortho=add_orthogonal_grad_(self.ortho_params, self.cfg.loss.ortho_beta))
            self.g.optimizer_step(self._update_flag(losses, self.g))
        self._freeze_d(False)

    def _freeze_d(self, frozen: bool) -> None:
        """D.requires_grad_(not frozen), over the parameter list taken at start-up."""
        for p in self.d_params:
            p.requires_grad_(not frozen)

    def _update_flag(self, losses: List[torch.Tensor], net: Any) -> Optional[torch.Tensor]:
        """The non-finite flag of one optimizer update (train.nonfinite); found_inf to skip it with, or None."""
        losses_bad = ~torch.isfinite(torch.stack(losses).sum())
        return self.guard.update_flag(losses_bad, net.nonfinite_grads())

    def _g_loss(self, m: int, latents: Batch, last: bool) -> torch.Tensor:
        """G's loss on micro-batch m, divided by the accumulation count; the orthogonal regularization rides on the
        last micro-batch, so there is one synchronized backward."""
        lc = self.cfg.loss
        z, yf = latents
        with self._autocast():
            xf = self._augment(self.g(z, yf), self.plan.rng.fake_augment, G_PHASE, m)
            out = self.d.module(xf, yf)
        loss_adv = g_adv_loss(lc.adv, out["adv"].float())
        loss = loss_adv
        values = {"g_adv": loss_adv}
        if self.has_cond_loss:
            values["g_cond"] = loss_c = self._cond_loss(out, yf)
            loss = loss + lc.cond_lambda_g * loss_c
        total = loss / self.plan.accum
        if last and self.ortho_in_loss:
            values["g_ortho"] = reg = orthogonal_reg(self.ortho_params, lc.ortho_beta)
            total = total + reg
        self.metrics.add(g_loss=loss, **values)
        return total

    def train_step(self, diagnostics: bool = False) -> None:
        if not all(m.training for m in self.step_modules):  # set back after sampling or evaluation, say
            self.g.module.train()
            self.d.module.train()
        for k in range(self.cfg.train.n_dis):
            self.d_step(k, diagnostics and k == 0)
        self.g_step()
        self.step += 1
        with self._phase("ema"):
            self.ema.update(self.step)
        self.guard.end_step(self.step)

    # ---- sampling --------------------------------------------------------------------------------------------
    def sync_ema(self) -> None:
        """Assemble a sharded G_ema on every rank (collective; see EMA.synchronize): before anything reads it."""
        self.ema.synchronize()

    def ema_model(self) -> nn.Module:
        if self.ema.stale:
            raise RuntimeError("G_ema read while sharded updates are pending: call Trainer.sync_ema() on every "
                               "rank first")
        return self.ema.model

    def sampling_generator(self, n_passes: Optional[int] = None) -> nn.Module:
        """A copy of G_ema with standing statistics (train.standing_stats passes), ready for sampling."""
        G = copy.deepcopy(self.ema_model()).eval()
        sampling_standing_stats(G, self.cfg, n_passes)
        return G

    # ---- state ---------------------------------------------------------------------------------------------
    def agree_on_bn_stats(self) -> None:
        """Every rank's G and G_ema running BN statistics replaced by their mean over ranks where they are kept per
        rank or per BN group (collective); the EMA assembled first where it is sharded."""
        self.sync_ema()
        if self.local_bn_stats:
            average_running_stats(self.g.module)
            average_running_stats(self.ema_model())

    def check_replicas(self) -> None:
        """Raise if any rank's G, D or G_ema differs from rank 0's (collective)."""
        self.agree_on_bn_stats()
        check_replicas({"G": self.g.module, "D": self.d.module, "G_ema": self.ema_model()})

    def state_dict(self) -> Dict[str, Any]:
        """The full, world-size independent state (collective under ZeRO: every rank must call it)."""
        self.agree_on_bn_stats()
        return {"step": self.step, "G": self.g.weights_state_dict(), "D": self.d.weights_state_dict(),
                "G_ema": self.ema_model().state_dict(), "g_opt": self.g.optimizer_state_dict(),
                "d_opt": self.d.optimizer_state_dict(), "data": self.real.state_dict(),
                "world_size": self.world, "strategy": self.cfg.dist.strategy, "config": to_dict(self.cfg)}

    def scale_lr(self, factor: float) -> None:
        """Both learning rates times ``factor`` (the watchdog's rollback)."""
        self.g.scale_lr(factor)
        self.d.scale_lr(factor)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from a state saved at any world size under any strategy."""
        try:
            self.g.load_weights(state["G"])
            self.d.load_weights(state["D"])
            self.ema.model.load_state_dict(state["G_ema"])
        except RuntimeError as e:
            raise UserError(f"checkpoint does not fit this config's model ({str(e).splitlines()[0]}); "
                            f"resume with the config the run was started with") from None
        self.g.load_optimizer_state_dict(state["g_opt"])
        self.d.load_optimizer_state_dict(state["d_opt"])
        self.real.load_state_dict(state["data"])
        self.step = int(state["step"])


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
