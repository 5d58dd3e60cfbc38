"""Spectral norm of a whole network in one fused power iteration per forward (kernels.sn_power_iteration).

Per-layer SN costs ~8 small launches per layer; BigGAN-128 has ~65 SN layers in G+D. FusedSpectralNorm runs the
iteration for all of a network's SN layers in two Triton launches before each training-mode forward and hands each
layer its sigma (with autograd through W, as torch's spectral_norm). In eval mode the layers do their own
(iteration-free) sigma, as before. The per-layer path stays the reference; ``model.sn_backend`` switches.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from hpc_gan.models.layers import no_autocast, spectral_norm_layers
from kernels import sn_power_iteration, use_triton


class FusedSpectralNorm:
    def __init__(self, model: nn.Module, backend: str = "triton") -> None:
        self.layers = spectral_norm_layers(model)
        if not self.layers:
            raise ValueError("FusedSpectralNorm: the model has no spectral-normalized layers")
        settings = {(m.sn_iters, m.sn_eps) for m in self.layers}
        if len(settings) != 1:
            raise ValueError(f"FusedSpectralNorm: layers disagree on (iterations, eps): {sorted(settings)}")
        (self.n_iters, self.eps), = settings
        self.backend = backend
        self.handle = model.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if not module.training:
            return
        weights = [m.sn_matrix() for m in self.layers]
        with no_autocast(weights[0].device.type):
            sigmas, us, vs = sn_power_iteration(weights, [m.sn_u for m in self.layers], self.n_iters, self.eps,
                                                backend=self.backend)
        with torch.no_grad():
            torch._foreach_copy_([m.sn_u for m in self.layers], us)
            torch._foreach_copy_([m.sn_v for m in self.layers], vs)
            torch._foreach_copy_([m.sn_sigma for m in self.layers], list(sigmas.detach().unbind(0)))
        for m, s in zip(self.layers, sigmas.unbind(0)):
            m.fused_sigma = s

    def remove(self) -> None:
        self.handle.remove()
        for m in self.layers:
            m.fused_sigma = None


def attach_fused_sn(model: nn.Module, backend: str) -> Optional[FusedSpectralNorm]:
    """Fuse the network's SN when ``backend`` resolves to Triton for its parameters ("auto": on CUDA); None when
    the per-layer torch path stays in use."""
    probe = next(model.parameters())
    if not use_triton(backend, probe, op="model.sn_backend"):
        return None
    return FusedSpectralNorm(model, backend="triton")


def sn_sigmas(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Each SN layer's last sigma (its weight's top singular value estimate), by module name: BigGAN's sigma_0."""
    layers = set(spectral_norm_layers(model))
    return {name: m.sn_sigma for name, m in model.named_modules() if m in layers}
