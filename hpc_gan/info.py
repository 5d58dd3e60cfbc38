"""Model size and cost of a config: parameter counts and FLOPs of one training step per sample."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from hpc_gan.config import Config
from hpc_gan.losses import cond_loss, d_adv_loss, g_adv_loss, has_cond_loss
from hpc_gan.models import build_models
from hpc_gan.models.resample_conv import resolve


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_info(cfg: Config, batch: int = 2, executed_on: Optional[str] = None) -> Dict[str, Any]:
    """Parameters of G and D and the FLOPs of one training iteration per sample at the config's n_dis: per D step
    G forward (no grad) + D forward/backward on real and fake; per G step G forward/backward and D forward/backward
    to its input only (D is frozen). Counted with torch.utils.flop_counter on a batch of ``batch`` (convolutions and
    matmuls; 2 FLOPs per multiply-add), for the model as written (what MFU counts). ``executed_on`` (a device type:
    "cuda", "cpu"): also the FLOPs that the config's own formulations execute there, its "auto" choices resolved
    for that device (``executed_gflops_per_sample_iteration``; fewer with the fused resampling convolutions, more
    with SDPA's padded heads), for the utilization of the device's arithmetic."""
    # The model's FLOPs, not the kernels': attention through SDPA pads queries and keys with zeros (to the values'
    # width, c/8 -> c/2: 1.5% more FLOPs at BigGAN-128), and g_rgb_conv_impl=pad_out G's 3 output channels to 8,
    # which an MFU must not count; the fused resampling convolutions compute the same functions in 4/9 of their
    # products, which an MFU must not take away (the model is what it computes, however it is computed). The
    # explicit map, conv2d and the separate resampling are the model as written, with the same parameters.
    model = dataclasses.replace(cfg.model, attn_impl="explicit", d_rgb_conv_impl="conv2d", g_rgb_conv_impl="conv2d",
                                g_upconv_impl="separate", d_downconv_impl="separate")
    counts = _iteration_flops(dataclasses.replace(cfg, model=model), batch)
    per_sample = (cfg.train.n_dis * counts["d_step"] + counts["g_step"]) / batch
    info = {
        "arch": cfg.model.arch, "resolution": cfg.model.resolution, "g_ch": cfg.model.g_ch, "d_ch": cfg.model.d_ch,
        "num_classes": cfg.data.num_classes, "cond": cfg.loss.cond, "n_dis": cfg.train.n_dis,
        "g_params": counts["g_params"],
        "d_params": counts["d_params"],
        "g_forward_gflops_per_sample": counts["g_forward"] / batch / 1e9,
        "d_forward_gflops_per_sample": counts["d_forward"] / batch / 1e9,
        "d_step_gflops_per_sample": counts["d_step"] / batch / 1e9,
        "g_step_gflops_per_sample": counts["g_step"] / batch / 1e9,
        "g_bn_layers": counts["g_bn_layers"],
        "gflops_per_sample_iteration": per_sample / 1e9,
        "gflops_per_iteration": per_sample * cfg.train.batch_size / 1e9,
    }
    if executed_on is not None:  # counted on the meta device, where "auto" would pick another device's choice
        m = cfg.model
        runs = dataclasses.replace(m, g_upconv_impl=resolve(m.g_upconv_impl, "up", executed_on),
                                   d_downconv_impl=resolve(m.d_downconv_impl, "down", executed_on))
        run = _iteration_flops(dataclasses.replace(cfg, model=runs), batch, forwards=False)
        info["executed_gflops_per_sample_iteration"] = (cfg.train.n_dis * run["d_step"] + run["g_step"]) / batch / 1e9
    return info


def _iteration_flops(cfg: Config, batch: int, forwards: bool = True) -> Dict[str, int]:
    """FLOPs of one D step, one G step and (``forwards``) each network's forward on ``batch`` samples, with the networks
    ``cfg.model`` builds (on the meta device: shapes only, so BigGAN-256 costs no compute here), and their
    parameter and G's BN layer counts."""
    with torch.device("meta"):  # built there too: initializing BigGAN-128's weights took ~10 s of the CPU
        G, D = build_models(cfg)
    g_params = sum(p.numel() for p in G.parameters())
    d_params = sum(p.numel() for p in D.parameters())
    nc, zd, res = cfg.data.num_classes, cfg.model.z_dim, cfg.model.resolution
    z = torch.randn(batch, zd, device="meta")
    y = torch.arange(batch, device="meta") % nc
    real = torch.randn(batch, 3, res, res, device="meta")
    lc = cfg.loss

    def d_step() -> None:
        with torch.no_grad():
            fake = G(z, y)
        out = D(torch.cat([real, fake]), torch.cat([y, y]))
        loss = d_adv_loss(lc.adv, out["adv"][:batch], out["adv"][batch:])
        if has_cond_loss(lc.cond):
            loss = loss + cond_loss(lc.cond, {k: v[:batch] for k, v in out.items()}, y, lc)
        loss.backward()

    def g_step() -> None:
        D.requires_grad_(False)  # as in training: no weight gradients for D in the G step
        out = D(G(z, y), y)
        loss = g_adv_loss(lc.adv, out["adv"])
        if has_cond_loss(lc.cond):
            loss = loss + cond_loss(lc.cond, out, y, lc)
        loss.backward()
        D.requires_grad_(True)

    counts = {"g_params": g_params, "d_params": d_params,
              "g_bn_layers": sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in G.modules()),
              "d_step": _count(d_step), "g_step": _count(g_step)}
    if forwards:
        with torch.no_grad():
            counts["g_forward"] = _count(lambda: G(z, y))
            counts["d_forward"] = _count(lambda: D(real, y))
    return counts


def sn_shapes(cfg: Config) -> list:
    """(out, in*kh*kw) of every spectral-normalized weight of G and D: what one fused SN launch covers."""
    from hpc_gan.models.layers import spectral_norm_layers
    G, D = build_models(cfg)
    return [tuple(m.sn_matrix().shape) for net in (G, D) for m in spectral_norm_layers(net)]
