"""One training step of a class-conditional GAN: n_dis D updates, then one G update, then the EMA of G.

- D step: real and fake through D in one forward (what ZeRO engines need), adversarial loss + lambda_d x the
  conditioning loss on the real half, optional consistency regularization and gradient penalty.
- G step: D's parameters frozen; adversarial loss + lambda_g x the conditioning loss of fakes with sampled labels,
  + BigGAN's orthogonal regularization.
- All randomness of a step (z, fake labels, augmentation) comes from generators seeded by (seed, step, phase), and the
  global batch is drawn whole and sliced per rank, so a step is the same whatever the world size and a resumed run
  replays exactly what an uninterrupted one does.
- No host synchronization in the step: losses are summed as device tensors and read at logging steps only.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from hpc_gan.augment import Draws, consistency_augment, diff_augment
from hpc_gan.config import Config, ConfigError, to_dict
from hpc_gan.data import build_dataset
from hpc_gan.data.dali import build_stream
from hpc_gan.dist import DistInfo
from hpc_gan.dist.batchnorm import average_running_stats, bn_process_group, convert_cross_replica_bn
from hpc_gan.dist.consistency import check_replicas
from hpc_gan.dist.engines import broadcast_state, build_net
from hpc_gan.dist.gather import gather_negatives
from hpc_gan.losses import cond_loss, d_adv_loss, g_adv_loss, gradient_penalty, orthogonal_reg
from hpc_gan.losses.regularizers import ortho_weights
from hpc_gan.models import build_models
from hpc_gan.models.sn_fused import attach_fused_sn, sn_sigmas
from hpc_gan.train.ema import EMA, sampling_standing_stats

HEAD_LOSSES = ("d2d_ce", "2c", "ac", "mh")  # conditioning methods with a loss of their own
REAL_AUG, FAKE_AUG, CR_AUG, GP_MIX = 1, 2, 3, 4  # random streams of a step phase besides z and labels


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of this rank: GPU ``local_rank`` where CUDA is used."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def check_precision(precision: str, device: torch.device) -> None:
    if precision != "fp32" and device.type != "cuda":
        raise ConfigError(f"train.precision={precision} needs a CUDA device; use train.precision=fp32 on the CPU")


def step_seed(seed: int, step: int, phase: int, stream: int = 0) -> int:
    """The seed of one random stream (z and labels: 0; augmentations: 1..4) of one phase (0: G update, 1..n_dis:
    D updates) of one step."""
    base = seed * 1_000_003 + step * 64 + phase
    return (base * 8 + stream if stream else base) % (2 ** 63)


def step_generator(seed: int, step: int, phase: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, phase))


class Trainer:
    """The step, on one rank of ``info.world`` (one process by default). ``self.G`` / ``self.D`` are the plain
    modules; ``self.g_net`` / ``self.d_net`` their strategy wrappers (DDP or DeepSpeed engine and optimizer)."""

    def __init__(self, cfg: Config, device: torch.device, info: Optional[DistInfo] = None) -> None:
        info = info or DistInfo()
        self.cfg, self.device, self.info = cfg, device, info
        self.rank, self.world = info.rank, info.world
        t, lc = cfg.train, cfg.loss
        if t.batch_size % self.world:
            raise ConfigError(f"train.batch_size={t.batch_size} does not split over {self.world} ranks; use a "
                              f"multiple of the world size")
        self.local_batch = t.batch_size // self.world
        self.micro = min(t.micro_batch, self.local_batch) if t.micro_batch else self.local_batch
        if self.local_batch % self.micro:
            raise ConfigError(f"train.batch_size={t.batch_size} is not train.micro_batch={self.micro} x accumulation"
                              f" x {self.world} ranks; pick micro_batch dividing {self.local_batch} (batch / ranks)")
        self.accum = self.local_batch // self.micro
        check_precision(t.precision, device)
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
        if cfg.dist.strategy != "ddp":  # DeepSpeed's bf16 engine holds bf16 weights itself: no autocast on top
            self.amp_dtype = None
        torch.manual_seed(t.seed)  # identical initial weights for a given seed, on every rank
        G, D = build_models(cfg)
        self.G, self.D = G.to(device), D.to(device)
        self.ema = EMA(self.G, t.ema_decay, t.ema_start)  # before the BN swap: G_ema samples on one rank alone
        if self.world > 1 and cfg.dist.sync_bn:
            convert_cross_replica_bn(self.G, bn_process_group(cfg.dist.bn_group_size, self.rank, self.world))
        # after the EMA copy: G_ema samples in eval mode, where every layer computes its own sigma
        self.fused_sn = [attach_fused_sn(net, cfg.model.sn_backend) for net in (self.G, self.D)]
        broadcast_state(self.G)
        broadcast_state(self.D)
        betas = (t.beta1, t.beta2)
        common = dict(betas=betas, eps=t.adam_eps, micro=self.micro, accum=self.accum, world=self.world,
                      precision=t.precision)
        self.g_net = build_net(self.G, cfg.dist.strategy, t.g_lr, **common)
        self.d_net = build_net(self.D, cfg.dist.strategy, t.d_lr, **common)
        self.negatives = gather_negatives if self.world > 1 and lc.global_negatives else None
        self.dataset = build_dataset(cfg.data, cfg.model.resolution, t.seed)
        self.real = build_stream(cfg, self.dataset, device, self.rank, self.world, self.micro)
        # this rank's positions in the global batch, micro-batch-major (data.loader.rank_positions): the stream's,
        # so real images, z, labels and augmentation draws are sliced alike
        self.positions = self.real.positions.to(device)
        self.policies = [p.strip() for p in lc.diffaug.split(",") if p.strip()]
        self.step = 0
        self.timer: Optional[Any] = None  # a train.timing.PhaseTimer while benchmarking
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, int] = {}

    # ---- helpers -------------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _latents(self, phase: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global z and fake labels of a phase of the current step."""
        gen = step_generator(self.cfg.train.seed, self.step, phase, self.device)
        b = self.cfg.train.batch_size
        z = torch.randn(b, self.cfg.model.z_dim, generator=gen, device=self.device)
        y = torch.randint(0, self.cfg.data.num_classes, (b,), generator=gen, device=self.device)
        return z[self.positions], y[self.positions]

    def _draws(self, phase: int, stream: int, m: int) -> Draws:
        """Augmentation randomness of micro-batch m, drawn per sample of the global batch (see augment.Draws)."""
        offset = int(self.real.positions[m * self.micro])  # where micro-batch m starts in the global batch (CPU)
        return Draws(step_seed(self.cfg.train.seed, self.step, phase, stream), offset, self.micro, self.cfg.train.batch_size, self.device)

    def _add(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().float()
        self._sums[name] = self._sums[name] + v if name in self._sums else v
        self._counts[name] = self._counts.get(name, 0) + 1

    def pop_metrics(self) -> Dict[str, float]:
        """Means of everything summed since the last call. Synchronizes: call at logging steps only."""
        keys = sorted(self._sums)
        if not keys:
            return {}
        means = torch.stack([self._sums[k] / self._counts[k] for k in keys])
        if self.world > 1:  # the mean over ranks; every rank calls this at the same steps
            dist.all_reduce(means)
            means /= self.world
        self._sums, self._counts = {}, {}
        return dict(zip(keys, means.tolist()))

    def _phase(self, name: str) -> contextlib.AbstractContextManager:
        return self.timer.phase(name) if self.timer is not None else contextlib.nullcontext()

    def _cond_loss(self, out: Dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return cond_loss(self.cfg.loss.cond, out, labels, self.cfg.loss, negatives=self.negatives)

    # ---- the step ------------------------------------------------------------------------------------------
    def d_step(self, k: int, diagnostics: bool = False) -> None:
        z, yf = self._latents(1 + k)
        with self._phase("data"):
            xr_all, yr_all = self.real.next()
        for m in range(self.accum):
            with self.d_net.micro(last=m == self.accum - 1):
                with self._phase("d_forward"):
                    loss = self._d_loss(k, m, z, yf, xr_all, yr_all, diagnostics)
                with self._phase("d_backward"):
                    self.d_net.backward(loss / self.accum)
        with self._phase("d_optimizer"):
            self.d_net.step()

    def _d_loss(self, k: int, m: int, z: torch.Tensor, yf: torch.Tensor, xr_all: torch.Tensor,
                yr_all: torch.Tensor, diagnostics: bool) -> torch.Tensor:
        """D's loss on micro-batch m of D step k (forward only)."""
        lc = self.cfg.loss
        sl = slice(m * self.micro, (m + 1) * self.micro)
        xr, yr = xr_all[sl], yr_all[sl]
        n = xr.shape[0]
        with self._autocast():
            with torch.no_grad():
                xf = self.G(z[sl], yf[sl])
            xf = xf.to(xr.dtype)
            if self.policies:  # real and fake augmented independently, as DiffAugment does
                xr_in = diff_augment(xr, self.policies, self._draws(1 + k, REAL_AUG, m))
                xf_in = diff_augment(xf, self.policies, self._draws(1 + k, FAKE_AUG, m))
            else:
                xr_in, xf_in = xr, xf
            x, y = torch.cat([xr_in, xf_in]), torch.cat([yr, yf[sl]])
            if lc.cr_lambda > 0:
                xc = consistency_augment(xr, self._draws(1 + k, CR_AUG, m))
                x, y = torch.cat([x, xc]), torch.cat([y, yr])
            out = self.d_net(x, y)
        adv = out["adv"].float()
        adv_r, adv_f = adv[:n], adv[n:2 * n]
        loss_adv = d_adv_loss(lc.adv, adv_r, adv_f)
        loss = loss_adv
        if lc.cond in HEAD_LOSSES:
            real = {key: v[:n] for key, v in out.items()}
            loss_c = self._cond_loss(real, yr)
            loss = loss + lc.cond_lambda_d * loss_c
            self._add("d_cond", loss_c)
            if diagnostics and m == 0 and k == 0:
                self._diagnostics(real["h"], yr)
        if lc.cr_lambda > 0:
            loss_cr = ((adv[2 * n:] - adv_r) ** 2).mean()
            loss = loss + lc.cr_lambda * loss_cr
            self._add("d_cr", loss_cr)
        if lc.adv == "wasserstein":
            alpha = self._draws(1 + k, GP_MIX, m).rand(1, 1, 1)
            gp = gradient_penalty(lambda xi: self.D(xi, yr)["adv"].float(), xr, xf, alpha)
            loss = loss + lc.gp_lambda * gp
            self._add("d_gp", gp)
        self._add("d_loss", loss)
        self._add("d_adv", loss_adv)
        self._add("d_real", adv_r.mean())
        self._add("d_fake", adv_f.mean())
        return loss

    def _diagnostics(self, h: torch.Tensor, labels: torch.Tensor) -> None:
        """ReACGAN Fig. 2: mean norm of D's features entering the conditioning head, and the norm of the
        conditioning loss's gradient w.r.t. the head's weights (classifier or linear head P and proxies); BigGAN's
        sigma_0 (top singular values of the SN layers). The head is re-run on detached features with detached
        copies of its weights, in eval mode (same sigma, no extra power iteration): the step's own graph, which a
        DeepSpeed engine watches, is not touched."""
        self._add("diag_feature_norm", h.detach().float().norm(dim=1).mean())
        for tag, net in (("G", self.G), ("D", self.D)):
            sig = torch.stack(list(sn_sigmas(net).values()))
            self._add(f"diag_sigma_{tag}_max", sig.max())
            self._add(f"diag_sigma_{tag}_mean", sig.mean())
        head = self.D.head
        params = {n: p.detach().requires_grad_() for n, p in head.named_parameters()}
        cond = [params[n] for n in params if not n.startswith("adv.")]
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
            self._add("diag_cond_grad_norm", torch.stack(sq).sum().sqrt())

    def g_step(self) -> None:
        z, yf = self._latents(0)
        self.D.requires_grad_(False)  # frozen, and called as the plain module: D is only a function of the fakes
        for m in range(self.accum):
            last = m == self.accum - 1
            with self.g_net.micro(last):
                with self._phase("g_forward"):
                    total = self._g_loss(m, z, yf, last)
                with self._phase("g_backward"):
                    self.g_net.backward(total)
        with self._phase("g_optimizer"):
            self.g_net.step()
        self.D.requires_grad_(True)

    def _g_loss(self, m: int, z: torch.Tensor, yf: torch.Tensor, last: bool) -> torch.Tensor:
        """G's loss on micro-batch m, divided by the accumulation count; the orthogonal regularization rides on the
        last micro-batch, so there is one synchronized backward."""
        lc = self.cfg.loss
        sl = slice(m * self.micro, (m + 1) * self.micro)
        with self._autocast():
            xf = self.g_net(z[sl], yf[sl])
            if self.policies:
                xf = diff_augment(xf, self.policies, self._draws(0, FAKE_AUG, m))
            out = self.D(xf, yf[sl])
        loss_adv = g_adv_loss(lc.adv, out["adv"].float())
        loss = loss_adv
        if lc.cond in HEAD_LOSSES:
            loss_c = self._cond_loss(out, yf[sl])
            loss = loss + lc.cond_lambda_g * loss_c
            self._add("g_cond", loss_c)
        self._add("g_loss", loss)
        self._add("g_adv", loss_adv)
        total = loss / self.accum
        if last and lc.ortho_beta > 0:
            reg = orthogonal_reg(ortho_weights(self.G), lc.ortho_beta)
            total = total + reg
            self._add("g_ortho", reg)
        return total

    def train_step(self, diagnostics: bool = False) -> None:
        self.G.train()
        self.D.train()
        for k in range(self.cfg.train.n_dis):
            self.d_step(k, diagnostics)
        self.g_step()
        self.step += 1
        with self._phase("ema"):
            self.ema.update(self.G, self.step)

    # ---- sampling --------------------------------------------------------------------------------------------
    def sampling_generator(self, n_passes: Optional[int] = None) -> nn.Module:
        """A copy of G_ema with standing statistics (train.standing_stats passes), ready for sampling."""
        G = copy.deepcopy(self.ema.model).eval()
        sampling_standing_stats(G, self.cfg, n_passes)
        return G

    # ---- state ---------------------------------------------------------------------------------------------
    def check_replicas(self) -> None:
        """Raise if any rank's G, D or G_ema differs from rank 0's (collective)."""
        check_replicas({"G": self.G, "D": self.D, "G_ema": self.ema.model})

    def state_dict(self) -> Dict[str, Any]:
        """The full, world-size independent state (collective under ZeRO: every rank must call it)."""
        if self.world > 1 and not self.cfg.dist.sync_bn:
            average_running_stats(self.G)  # per-rank BN statistics: agree on their mean before saving
        return {"step": self.step, "G": self.g_net.weights_state_dict(), "D": self.d_net.weights_state_dict(),
                "G_ema": self.ema.model.state_dict(), "g_opt": self.g_net.optimizer_state_dict(),
                "d_opt": self.d_net.optimizer_state_dict(), "data": self.real.state_dict(),
                "world_size": self.world, "strategy": self.cfg.dist.strategy, "config": to_dict(self.cfg)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from a state saved at any world size under any strategy."""
        try:
            self.g_net.load_weights(state["G"])
            self.d_net.load_weights(state["D"])
            self.ema.model.load_state_dict(state["G_ema"])
        except RuntimeError as e:
            raise ConfigError(f"checkpoint does not fit this config's model ({str(e).splitlines()[0]}); "
                              f"resume with the config the run was started with") from None
        for net, key, scaler in ((self.g_net, "g_opt", "g_scaler"), (self.d_net, "d_opt", "d_scaler")):
            opt = state[key] if "adam" in state[key] else {"adam": state[key]}  # checkpoints before the strategies
            if scaler in state:
                opt["scaler"] = state[scaler]
            net.load_optimizer_state_dict(opt)
        self.real.load_state_dict(state["data"])
        self.step = int(state["step"])


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

