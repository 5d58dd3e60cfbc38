"""One power-iteration step of spectral normalization for every weight matrix of a network at once.

    v = normalize(W^T u),  u = normalize(W v)   (n_iters times, no gradient)
    sigma = u^T W v                            (differentiated through W only, u and v constants)

These are the semantics of torch.nn.utils.parametrizations.spectral_norm (and Miyato et al.'s Algorithm 1), applied
to a list of matrices: conv weights viewed as (out, in*kh*kw). The torch reference below is a loop over the layers
(~8 small launches each); the Triton backend (spectral_norm_triton.py) runs the whole list in two launches per
iteration, deterministically (no float atomics), with u, v and sigma in fp32 whatever the weights' dtype.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton


def _check(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor], n_iters: int) -> None:
    if len(weights) != len(us) or not weights:
        raise ValueError(f"sn_power_iteration: need one u per weight and at least one; got {len(weights)} weights "
                         f"and {len(us)} us")
    if n_iters < 1:
        raise ValueError(f"sn_power_iteration: n_iters must be >= 1; got {n_iters}")
    for i, (w, u) in enumerate(zip(weights, us)):
        if w.dim() != 2 or u.shape != (w.shape[0],):
            raise ValueError(f"sn_power_iteration: weight {i} must be 2-D (out, in) with u of shape (out,); got "
                             f"{tuple(w.shape)} and {tuple(u.shape)} (view conv weights as w.reshape(out, -1))")


def sn_power_iteration(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor], n_iters: int = 1,
                       eps: float = 1e-12, backend: str = "auto"
                       ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """(sigmas, us, vs) after ``n_iters`` power-iteration steps from ``us``, for every matrix of ``weights``.

    sigmas is an fp32 tensor (L,) differentiable w.r.t. the weights (d sigma / d W = u v^T); us and vs are new fp32
    tensors (the inputs are not modified), so the caller decides where they are stored. backend: "torch" (a loop,
    the reference), "triton" (two launches per iteration for all matrices), "auto" (Triton on CUDA).
    """
    _check(weights, us, n_iters)
    if use_triton(backend, *weights, op="sn_power_iteration"):
        from kernels.spectral_norm_triton import fused_power_iteration
        return fused_power_iteration(list(weights), list(us), n_iters, eps)
    sigmas, us_out, vs_out = [], [], []
    for w, u in zip(weights, us):
        w32 = w.float()
        with torch.no_grad():
            u = u.float()
            for _ in range(n_iters):
                v = F.normalize(w32.t() @ u, dim=0, eps=eps)
                u = F.normalize(w32 @ v, dim=0, eps=eps)
        sigmas.append(torch.dot(u, w32 @ v))
        us_out.append(u)
        vs_out.append(v)
    return torch.stack(sigmas), us_out, vs_out
