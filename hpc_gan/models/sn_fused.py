"""Spectral norm of a whole network in one call per training forward (kernels.spectral_normalize).

Per-layer SN costs ~15 small ops per layer and as many in the backward; BigGAN-128 has 65 SN layers in G+D, run in
four training-mode forwards per iteration. FusedSpectralNorm normalizes all of a network's SN weights at once before
each training-mode forward, with ``model.sn_backend``: "foreach" (two matrix-vector products per layer, the rest
foreach ops over the list, one backward for all) or "triton" (two launches per iteration), and hands each layer its
W / sigma. In eval mode the layers do their own (iteration-free) sigma, as before. The per-layer path ("torch")
stays the reference.

The normalized weights travel into the network's forward as a keyword argument (``sn_weights``), which the forward
hands to the layers. Set as module attributes by the hook instead, they reached a torch.compile'd forward through a
module, and dynamo marks tensors found on modules as static inputs: fixed addresses, which CUDA graphs (train.
cuda_graphs) then re-recorded every step, since the weights are new tensors each time (and torch 2.11's cudagraph
trees failed an internal assertion while logging that re-record, on an H100). As arguments they are ordinary inputs,
copied into the graph's buffers at each replay: one copy per layer and forward, since the copy of a list that mixes
dtypes (the weights, the labels) goes tensor by tensor (393 copies an iteration at 32 per GPU on an H200).

``static`` (``model.sn_static_weights``, the triton backend): W / sigma are written into one buffer per dtype that
stays where it is, and handed on marked as static inputs, which CUDA graphs read where they are: no copies. Each
training forward then overwrites the last one's W / sigma, so its backward must have run (the training step's order;
a backward that would read overwritten weights fails on the buffer's bumped version instead of computing wrong
gradients).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from hpc_gan.models.layers import spectral_norm_layers
from kernels import resolve_sn_backend, spectral_normalize
from kernels.dispatch import autocast_off


class FusedSpectralNorm:
    def __init__(self, model: nn.Module, backend: str = "triton", static: bool = False) -> None:
        self.layers = spectral_norm_layers(model)
        if not self.layers:
            raise ValueError("FusedSpectralNorm: the model has no spectral-normalized layers")
        settings = {(m.sn_iters, m.sn_eps) for m in self.layers}
        if len(settings) != 1:
            raise ValueError(f"FusedSpectralNorm: layers disagree on (iterations, eps): {sorted(settings)}")
        (self.n_iters, self.eps), = settings
        if static and backend != "triton":
            raise ValueError(f"FusedSpectralNorm: static=True writes into the triton backend's buffers; got "
                             f"backend={backend!r}")
        self.backend, self.static = backend, static
        self.outs: Dict[tuple, torch.Tensor] = {}  # static: each group's flat W / sigma buffer
        self.us = [m.sn_u for m in self.layers]
        self.vs = [m.sn_v for m in self.layers]
        # under autocast, conv and linear layers get W / sigma in autocast's dtype (the triton backend writes it so:
        # no cast per layer and forward); embeddings keep the weights' dtype, as autocast would
        self.autocast_idx = [i for i, m in enumerate(self.layers) if m.autocasts]
        self.plain_idx = [i for i, m in enumerate(self.layers) if not m.autocasts]
        self.model, self.inner_forward = model, model.forward
        model.forward = self._forward  # what a later torch.compile of model.forward compiles
        self.handle = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[Tuple[tuple, dict]]:
        if not module.training:
            return None
        device = self.layers[0].weight.device.type
        amp = torch.get_autocast_dtype(device) if device in ("cpu", "cuda") and torch.is_autocast_enabled(device) \
            else None
        groups = [(amp, self.autocast_idx), (None, self.plain_idx)] if amp else [(None, range(len(self.layers)))]
        normalized: list = [None] * len(self.layers)
        us: list = [None] * len(self.layers)
        vs: list = [None] * len(self.layers)
        with autocast_off(device):
            for dtype, idx in groups:
                if not idx:
                    continue
                ws = [self.layers[i].weight for i in idx]
                buf = self._static_out(dtype, idx, ws) if self.static else None
                out = spectral_normalize(ws, [self.us[i] for i in idx], self.n_iters, self.eps, self.backend,
                                         out_dtype=dtype, out=buf)
                for k, i in enumerate(idx):
                    normalized[i], us[i], vs[i] = out[0][k], out[1][k], out[2][k]
                    if self.static:
                        torch._dynamo.mark_static_address(normalized[i])  # unguarded: an attribute, no guard
        with torch.no_grad():
            torch._foreach_copy_(self.us, us)
            torch._foreach_copy_(self.vs, vs)
        return args, {**kwargs, "sn_weights": tuple(normalized)}

    def _static_out(self, dtype: Optional[torch.dtype], idx: Sequence[int], ws: list) -> torch.Tensor:
        """The flat W / sigma buffer of the layers ``idx`` computed in ``dtype`` (None: the weights' own), made
        once."""
        key = (dtype, tuple(idx))
        buf = self.outs.get(key)
        if buf is None:
            from kernels.spectral_norm_triton import flat_size
            buf = self.outs[key] = torch.empty(flat_size(ws), device=ws[0].device, dtype=dtype or ws[0].dtype)
        return buf

    def _forward(self, *args, sn_weights: Optional[Tuple[torch.Tensor, ...]] = None, **kwargs):
        if sn_weights is not None:
            for m, w in zip(self.layers, sn_weights):
                m.fused_weight = w
        return self.inner_forward(*args, **kwargs)

    def remove(self) -> None:
        self.handle.remove()
        self.model.forward = self.inner_forward
        for m in self.layers:
            m.fused_weight = None


def attach_fused_sn(model: nn.Module, backend: str, static: bool = False) -> Optional[FusedSpectralNorm]:
    """Normalize the network's SN weights all at once unless ``backend`` is "torch" (the per-layer reference,
    returns None). "auto": Triton on CUDA where installed, foreach elsewhere. ``static``: see the module docstring
    (the triton backend only)."""
    if backend == "torch":
        return None
    return FusedSpectralNorm(model, backend=resolve_sn_backend(backend, next(model.parameters())), static=static)


def sn_sigmas(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Each SN layer's current sigma (its weight's top singular value estimate u^T W v), by module name: BigGAN's
    sigma_0. Computed on call (a few ops per layer): call at diagnostics steps."""
    layers = set(spectral_norm_layers(model))
    return {name: m.sn_sigma() for name, m in model.named_modules() if m in layers}
