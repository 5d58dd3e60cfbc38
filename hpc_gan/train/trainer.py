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
import torch.nn as nn

from hpc_gan.augment import Draws, consistency_augment, diff_augment
from hpc_gan.config import Config, ConfigError, to_dict
from hpc_gan.data import RealStream, build_dataset
from hpc_gan.losses import cond_loss, d_adv_loss, g_adv_loss, gradient_penalty, orthogonal_reg
from hpc_gan.losses.regularizers import ortho_weights
from hpc_gan.models import build_models
from hpc_gan.models.sn_fused import attach_fused_sn, sn_sigmas
from hpc_gan.train.ema import EMA, standing_stats_from_noise

HEAD_LOSSES = ("d2d_ce", "2c", "ac", "mh")  # conditioning methods with a loss of their own
REAL_AUG, FAKE_AUG, CR_AUG, GP_MIX = 1, 2, 3, 4  # random streams of a step phase besides z and labels


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
    return torch.device(name)


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
    def __init__(self, cfg: Config, device: torch.device, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        t, lc = cfg.train, cfg.loss
        if t.batch_size % world:
            raise ConfigError(f"train.batch_size={t.batch_size} does not split over {world} ranks; use a multiple")
        self.local_batch = t.batch_size // world
        self.micro = t.micro_batch or self.local_batch
        if self.local_batch % self.micro:
            raise ConfigError(f"train.micro_batch={self.micro} does not divide the per-rank batch {self.local_batch}"
                              f" (train.batch_size / world size); pick a divisor")
        self.accum = self.local_batch // self.micro
        check_precision(t.precision, device)
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]

        torch.manual_seed(t.seed)  # identical initial weights for a given seed, on every rank
        G, D = build_models(cfg)
        self.G, self.D = G.to(device), D.to(device)
        self.ema = EMA(self.G, t.ema_decay, t.ema_start)
        # after the EMA copy: G_ema samples in eval mode, where every layer computes its own sigma
        self.fused_sn = [attach_fused_sn(net, cfg.model.sn_backend) for net in (self.G, self.D)]
        betas = (t.beta1, t.beta2)
        self.g_opt = torch.optim.Adam(self.G.parameters(), lr=t.g_lr, betas=betas, eps=t.adam_eps)
        self.d_opt = torch.optim.Adam(self.D.parameters(), lr=t.d_lr, betas=betas, eps=t.adam_eps)
        fp16 = t.precision == "fp16"
        self.g_scaler = torch.amp.GradScaler("cuda", enabled=fp16)  # one loss scaler per network
        self.d_scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.dataset = build_dataset(cfg.data, cfg.model.resolution, t.seed)
        self.real = RealStream(self.dataset, t.batch_size, t.seed, cfg.data.hflip, device, rank, world,
                               cfg.data.num_workers)
        self.policies = [p.strip() for p in lc.diffaug.split(",") if p.strip()]
        self.step = 0
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
        sl = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        return z[sl], y[sl]

    def _draws(self, phase: int, stream: int, m: int) -> Draws:
        """Augmentation randomness of micro-batch m, drawn per sample of the global batch (see augment.Draws)."""
        offset = self.rank * self.local_batch + m * self.micro
        return Draws(step_seed(self.cfg.train.seed, self.step, phase, stream), offset, self.micro, self.cfg.train.batch_size, self.device)

    def _add(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().float()
        self._sums[name] = self._sums[name] + v if name in self._sums else v
        self._counts[name] = self._counts.get(name, 0) + 1

    def pop_metrics(self) -> Dict[str, float]:
        """Means of everything summed since the last call. Synchronizes: call at logging steps only."""
        out = {k: (v / self._counts[k]).item() for k, v in self._sums.items()}
        self._sums, self._counts = {}, {}
        return out

    def _backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
        scaler.scale(loss).backward() if scaler.is_enabled() else loss.backward()

    def _opt_step(self, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        if scaler.is_enabled():
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    # ---- the step ------------------------------------------------------------------------------------------
    def d_step(self, k: int, diagnostics: bool = False) -> None:
        cfg, lc = self.cfg, self.cfg.loss
        z, yf = self._latents(1 + k)
        xr_all, yr_all = self.real.next()
        for m in range(self.accum):
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
                out = self.D(x, y)
            adv = out["adv"].float()
            adv_r, adv_f = adv[:n], adv[n:2 * n]
            loss_adv = d_adv_loss(lc.adv, adv_r, adv_f)
            loss = loss_adv
            if lc.cond in HEAD_LOSSES:
                real = {key: v[:n] for key, v in out.items()}
                loss_c = cond_loss(lc.cond, real, yr, lc)
                loss = loss + lc.cond_lambda_d * loss_c
                self._add("d_cond", loss_c)
                if diagnostics and m == 0 and k == 0:
                    self._diagnostics(real["h"], loss_c)
            if lc.cr_lambda > 0:
                loss_cr = ((adv[2 * n:] - adv_r) ** 2).mean()
                loss = loss + lc.cr_lambda * loss_cr
                self._add("d_cr", loss_cr)
            if lc.adv == "wasserstein":
                alpha = self._draws(1 + k, GP_MIX, m).rand(1, 1, 1)
                gp = gradient_penalty(lambda xi: self.D(xi, yr)["adv"].float(), xr, xf, alpha)
                loss = loss + lc.gp_lambda * gp
                self._add("d_gp", gp)
            self._backward(loss / self.accum, self.d_scaler)
            self._add("d_loss", loss)
            self._add("d_adv", loss_adv)
            self._add("d_real", adv_r.mean())
            self._add("d_fake", adv_f.mean())
        self._opt_step(self.d_opt, self.d_scaler)

    def _diagnostics(self, h: torch.Tensor, loss_c: torch.Tensor) -> None:
        """ReACGAN Fig. 2: mean norm of D's features entering the conditioning head, and the norm of the
        conditioning loss's gradient w.r.t. the head's weights (classifier or linear head P and proxies)."""
        self._add("diag_feature_norm", h.detach().float().norm(dim=1).mean())
        for tag, net in (("G", self.G), ("D", self.D)):  # BigGAN's sigma_0 analysis: top singular values
            sig = torch.stack(list(sn_sigmas(net).values()))
            self._add(f"diag_sigma_{tag}_max", sig.max())
            self._add(f"diag_sigma_{tag}_mean", sig.mean())
        params = self.D.head.cond_parameters()
        grads = torch.autograd.grad(loss_c, params, retain_graph=True, allow_unused=True)
        sq = [g.float().pow(2).sum() for g in grads if g is not None]
        if sq:
            self._add("diag_cond_grad_norm", torch.stack(sq).sum().sqrt())

    def g_step(self) -> None:
        cfg, lc = self.cfg, self.cfg.loss
        z, yf = self._latents(0)
        self.D.requires_grad_(False)  # frozen: D is only a function of the fakes here
        for m in range(self.accum):
            sl = slice(m * self.micro, (m + 1) * self.micro)
            with self._autocast():
                xf = self.G(z[sl], yf[sl])
                if self.policies:
                    xf = diff_augment(xf, self.policies, self._draws(0, FAKE_AUG, m))
                out = self.D(xf, yf[sl])
            loss_adv = g_adv_loss(lc.adv, out["adv"].float())
            loss = loss_adv
            if lc.cond in HEAD_LOSSES:
                loss_c = cond_loss(lc.cond, out, yf[sl], lc)
                loss = loss + lc.cond_lambda_g * loss_c
                self._add("g_cond", loss_c)
            self._backward(loss / self.accum, self.g_scaler)
            self._add("g_loss", loss)
            self._add("g_adv", loss_adv)
        if lc.ortho_beta > 0:
            reg = orthogonal_reg(ortho_weights(self.G), lc.ortho_beta)
            self._backward(reg, self.g_scaler)
            self._add("g_ortho", reg)
        self._opt_step(self.g_opt, self.g_scaler)
        self.D.requires_grad_(True)

    def train_step(self, diagnostics: bool = False) -> None:
        self.G.train()
        self.D.train()
        for k in range(self.cfg.train.n_dis):
            self.d_step(k, diagnostics)
        self.g_step()
        self.step += 1
        self.ema.update(self.G, self.step)

    # ---- sampling --------------------------------------------------------------------------------------------
    def sampling_generator(self, n_passes: Optional[int] = None) -> nn.Module:
        """A copy of G_ema with standing statistics (train.standing_stats passes), ready for sampling."""
        G = copy.deepcopy(self.ema.model).eval()
        n_passes = self.cfg.train.standing_stats if n_passes is None else n_passes
        standing_stats_from_noise(G, n_passes, self.cfg.data.num_classes, self.cfg.model.z_dim,
                                  self.cfg.train.seed + 99991)
        return G

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        state = {"step": self.step, "G": self.G.state_dict(), "D": self.D.state_dict(),
                 "G_ema": self.ema.model.state_dict(), "g_opt": self.g_opt.state_dict(),
                 "d_opt": self.d_opt.state_dict(), "data": self.real.state_dict(),
                 "world_size": self.world, "config": to_dict(self.cfg),
                 "rng": {"torch": torch.get_rng_state()}}
        if self.g_scaler.is_enabled():
            state["g_scaler"], state["d_scaler"] = self.g_scaler.state_dict(), self.d_scaler.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("G", "D", "G_ema"):
            module = self.ema.model if key == "G_ema" else getattr(self, key)
            try:
                module.load_state_dict(state[key])
            except RuntimeError as e:
                raise ConfigError(f"checkpoint {key} does not fit this config's model ({str(e).splitlines()[0]}); "
                                  f"resume with the config the run was started with") from None
        self.g_opt.load_state_dict(state["g_opt"])
        self.d_opt.load_state_dict(state["d_opt"])
        if "g_scaler" in state and self.g_scaler.is_enabled():
            self.g_scaler.load_state_dict(state["g_scaler"])
            self.d_scaler.load_state_dict(state["d_scaler"])
        self.real.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step = int(state["step"])


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

