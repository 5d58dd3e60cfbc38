"""One power-iteration step of spectral normalization for every weight matrix of a network at once.

    v = normalize(W^T u),  u = normalize(W v)   (n_iters times, no gradient)
    sigma = u^T W v                            (differentiated through W only, u and v constants)

These are the semantics of torch.nn.utils.parametrizations.spectral_norm (and Miyato et al.'s Algorithm 1), applied
to a list of matrices: conv weights viewed as (out, in*kh*kw). Three implementations, ``backend``:

- ``torch``: the reference, a loop over the layers (~15 ops each, and as many in the backward).
- ``foreach``: the whole list in few ops (``spectral_normalize``: one autograd function for all layers; two
  matrix-vector products per layer, every normalization and the division W / sigma as foreach ops over the list;
  backward dW = G / sigma - <G, W> / sigma^2 u v^T, again mostly foreach): for CPUs, and where Triton is missing.
- ``triton`` (spectral_norm_triton.py): the whole list in two launches per iteration, deterministically (no float
  atomics); ``spectral_normalize`` adds one launch for every W / sigma (in the dtype the layers compute in), and
  two launches for their backward, which read the layers' gradients where they are (a table of pointers).

u, v and sigma are fp32 whatever the weights' dtype.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton

SN_BACKENDS = ("auto", "torch", "foreach", "triton")  # auto: triton on CUDA tensors, foreach elsewhere


def _check(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor], n_iters: int, matrices: bool = True) -> None:
    """Raise on inputs the power iteration cannot take; ``matrices``: the weights must be 2-D (else each is taken
    as an (out, everything else) matrix)."""
    if len(weights) != len(us) or not weights:
        raise ValueError(f"sn_power_iteration: need one u per weight and at least one; got {len(weights)} weights "
                         f"and {len(us)} us")
    if n_iters < 1:
        raise ValueError(f"sn_power_iteration: n_iters must be >= 1; got {n_iters}")
    for i, (w, u) in enumerate(zip(weights, us)):
        if matrices and w.dim() != 2:
            raise ValueError(f"sn_power_iteration: weight {i} must be 2-D (out, in); got {tuple(w.shape)} (view "
                             f"conv weights as w.reshape(out, -1))")
        if w.dim() < 1 or u.shape != (w.shape[0],):
            raise ValueError(f"spectral norm: weight {i} of shape {tuple(w.shape)} needs u of shape "
                             f"({w.shape[0] if w.dim() else '?'},); got {tuple(u.shape)}")


def resolve_sn_backend(backend: str, *tensors: torch.Tensor) -> str:
    """"torch", "foreach" or "triton" for these tensors ("auto": triton on CUDA where installed, else foreach)."""
    if backend not in SN_BACKENDS:
        raise ValueError(f"spectral norm: backend={backend!r} is not one of {SN_BACKENDS}")
    if backend in ("torch", "foreach"):
        return backend
    return "triton" if use_triton(backend, *tensors, op="sn backend") else "foreach"


def sn_power_iteration(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor], n_iters: int = 1,
                       eps: float = 1e-12, backend: str = "auto"
                       ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """(sigmas, us, vs) after ``n_iters`` power-iteration steps from ``us``, for every matrix of ``weights``.

    sigmas is an fp32 tensor (L,) differentiable w.r.t. the weights (d sigma / d W = u v^T); us and vs are new fp32
    tensors (the inputs are not modified), so the caller decides where they are stored. backend: "torch" (a loop,
    the reference), "triton" (two launches per iteration for all matrices), "foreach" (few ops for all matrices),
    "auto" (Triton on CUDA, foreach elsewhere).
    """
    _check(weights, us, n_iters)
    which = resolve_sn_backend(backend, *weights)
    if which == "triton":
        from kernels.spectral_norm_triton import fused_power_iteration
        return fused_power_iteration(list(weights), list(us), n_iters, eps)
    if which == "foreach":
        out, n = _ForeachSN.apply(n_iters, eps, False, len(weights), *weights, *us), len(weights)
        return out[0], list(out[1:1 + n]), list(out[1 + n:1 + 2 * n])
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


def spectral_normalize(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor], n_iters: int = 1,
                       eps: float = 1e-12, backend: str = "auto", out_dtype: Optional[torch.dtype] = None,
                       out: Optional[torch.Tensor] = None
                       ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
    """(W_i / sigma_i for every weight, us, vs, sigmas detached): what a spectrally normalized network needs per
    training forward, for all its layers at once. The normalized weights have each weight's shape, ``out_dtype``
    (default: the weights'; e.g. bf16 for layers under autocast, where the triton backend writes them in it rather
    than leaving a cast per layer to autocast), and are differentiable w.r.t. the weights, with torch's
    spectral_norm semantics (u, v constants). ``out`` (triton backend only): the flat buffer to write them into,
    the same every call, so that they keep their addresses (kernels.spectral_norm_triton.fused_normalize)."""
    _check(weights, us, n_iters, matrices=False)
    which = resolve_sn_backend(backend, *weights)
    out_dtype = out_dtype or weights[0].dtype
    if out is not None and which != "triton":
        raise ValueError(f"spectral_normalize: out= needs the triton backend, not {which!r}")
    if which == "triton":  # W / sigma, its cast and its backward in the kernels, on the weights as they are
        from kernels.spectral_norm_triton import fused_normalize
        return fused_normalize(list(weights), list(us), n_iters, eps, out_dtype, out=out)
    if which == "foreach":
        out, n = _ForeachSN.apply(n_iters, eps, True, len(weights), *weights, *us), len(weights)
        normalized, u, v, sigmas = list(out[1 + 2 * n:]), list(out[1:1 + n]), list(out[1 + n:1 + 2 * n]), out[0]
    else:
        mats = [w.reshape(w.shape[0], -1) for w in weights]
        sigmas, u, v = sn_power_iteration(mats, us, n_iters, eps, which)
        normalized, sigmas = [w / s for w, s in zip(weights, sigmas.unbind(0))], sigmas.detach()
    return [_as(w, out_dtype) for w in normalized], u, v, sigmas


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in ``dtype``, without dispatching a no-op cast (per layer and forward, they added up to ~200 ops a step)."""
    return x if x.dtype == dtype else x.to(dtype)


# per list of weight shapes: (their data pointers, the views, their transposes), for the current layout only: views
# keep their storage alive, so a moved parameter's old storage is released at the next call
_VIEWS: Dict[tuple, Tuple[tuple, List[torch.Tensor], List[torch.Tensor]]] = {}


def _matrix_views(weights: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Detached (out, in) views of the weights and their transposes, kept while the parameters stay where they are
    (optimizers update them in place), so a step spends no op on reshapes. fp32 only; other dtypes are cast."""
    if any(w.dtype != torch.float32 for w in weights):
        mats = [w.detach().reshape(w.shape[0], -1).float() for w in weights]
        return mats, [m.t() for m in mats]
    key = tuple(tuple(w.shape) for w in weights)
    ptrs = tuple(w.data_ptr() for w in weights)
    hit = _VIEWS.get(key)
    if hit is None or hit[0] != ptrs:
        if hit is None and len(_VIEWS) > 16:  # many networks in one process (tests): start over
            _VIEWS.clear()
        mats = [w.detach().reshape(w.shape[0], -1) for w in weights]
        hit = _VIEWS[key] = (ptrs, mats, [m.t() for m in mats])
    return hit[1], hit[2]


def _normalized(xs: List[torch.Tensor], eps: float) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(x / max(|x|, eps), |x|) for every vector of the list, in three foreach ops."""
    norms = torch._foreach_norm(xs)
    return torch._foreach_div(xs, torch._foreach_clamp_min(norms, eps)), norms


class _ForeachSN(torch.autograd.Function):
    """The power iteration for a list of n weights in foreach ops. Outputs, flat: sigmas (n,), u_1..u_n, v_1..v_n,
    and with ``normalize`` W_1 / sigma_1 .. W_n / sigma_n. Gradients reach the weights through sigmas
    (d sigma / d W = u v^T) or through the normalized weights; u and v are constants, as in torch's spectral_norm."""

    @staticmethod
    def forward(ctx, n_iters: int, eps: float, normalize: bool, n: int, *tensors: torch.Tensor):
        weights, us = tensors[:n], [_as(u, torch.float32) for u in tensors[n:]]
        mats, mats_t = _matrix_views(weights)
        for _ in range(n_iters):
            vs, _ = _normalized([torch.mv(mt, u) for mt, u in zip(mats_t, us)], eps)
            us, norms = _normalized([torch.mv(m, v) for m, v in zip(mats, vs)], eps)
        norm = torch.stack(norms)
        sigmas = norm * norm / norm.clamp_min(eps)  # u^T W v, with u = Wv / max(|Wv|, eps)
        ctx.n, ctx.normalize, ctx.shapes = n, normalize, [w.shape for w in weights]
        ctx.mark_non_differentiable(*us, *vs)
        ctx.set_materialize_grads(False)  # u, v get no gradient: no zeros for them in the backward
        if not normalize:
            ctx.save_for_backward(*us, *vs, *weights)
            return (sigmas, *us, *vs)
        w_sn = torch._foreach_div(list(weights), [_as(s, w.dtype) for s, w in zip(sigmas.unbind(0), weights)])
        ctx.mark_non_differentiable(sigmas)
        ctx.save_for_backward(*us, *vs, *weights, sigmas)
        return (sigmas, *us, *vs, *w_sn)

    @staticmethod
    def backward(ctx, g_sigma: torch.Tensor, *grads_out: torch.Tensor):
        n = ctx.n
        saved = ctx.saved_tensors
        us, vs, weights = saved[:n], saved[n:2 * n], saved[2 * n:3 * n]
        outers = [torch.outer(u, v).view(shape) for u, v, shape in zip(us, vs, ctx.shapes)]
        if not ctx.normalize:  # d sigma_i / d W_i = u_i v_i^T
            grads = torch._foreach_mul(outers, list(g_sigma.unbind(0)))
        else:  # d (W / sigma): G / sigma - <G, W> / sigma^2 u v^T
            sigmas = saved[3 * n]
            g = [torch.zeros_like(w) if gi is None else gi for gi, w in zip(grads_out[2 * n:], weights)]
            coef = (_dots(g, list(weights)) / (sigmas * sigmas)).neg_()
            grads = torch._foreach_add(torch._foreach_div(g, list(sigmas.unbind(0))),
                                       torch._foreach_mul(outers, list(coef.unbind(0))))
        return (None, None, None, None, *[_as(gr, w.dtype) for gr, w in zip(grads, weights)], *([None] * n))


def _dots(a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
    """<a_i, b_i> for every pair, in fp32: one foreach product, then one (pairwise) sum per pair. (A polarization
    identity on norms would take a fixed number of ops, but its rounding, ~1e-7 of |a||b|, made 2 ranks differ from
    1 by 3e-5 in a weight after one step: exact sums it is.)"""
    if a[0].dtype != torch.float32:
        a, b = [x.float() for x in a], [x.float() for x in b]
    return torch.stack([p.sum() for p in torch._foreach_mul(a, b)])
