"""ReACGAN's Data-to-Data Cross-Entropy (D2D-CE), Eq. 6 of Kang et al. (NeurIPS 2021).

This file holds the readable torch reference, which is the spec, and the dispatch to the fused Triton kernels
(similarity_triton.py: the whole loss, forward and backward, in 8-9 launches) behind
``backend="triton"`` / ``"auto"``; tests compare the two.

    L = -1/N sum_i log( exp([s_i - m_p]_- / t) / (exp([s_i - m_p]_- / t) + sum_{j in N(i)} exp([s_ij - m_n]_+ / t)) )

s_i = <f_i, v_{y_i}> is the cosine similarity of sample i's embedding to its class proxy, s_ij = <f_i, f_j> the
similarity of two samples, and N(i) the samples of the batch whose label differs from y_i (false negatives masked).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from kernels.dispatch import BACKENDS, D2D_MODES, use_triton


def _check_inputs(embed: torch.Tensor, proxy: torch.Tensor, labels: torch.Tensor, temperature: float,
                  mode: str, backend: str) -> None:
    if mode not in D2D_MODES:
        raise ValueError(f"d2d_ce: mode={mode!r} is not one of {D2D_MODES}")
    if backend not in BACKENDS:
        raise ValueError(f"d2d_ce: backend={backend!r} is not one of {BACKENDS}")
    if embed.dim() != 2 or proxy.shape != embed.shape:
        raise ValueError(f"d2d_ce: embed and proxy must both be (N, d); got {tuple(embed.shape)} and "
                         f"{tuple(proxy.shape)}")
    if labels.shape != (embed.shape[0],):
        raise ValueError(f"d2d_ce: labels must be ({embed.shape[0]},); got {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"d2d_ce: temperature must be > 0; got {temperature}")


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Compute in fp32 at least (bf16/fp16 inputs are upcast; fp64 stays fp64 for gradcheck)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def d2d_ce(embed: torch.Tensor, proxy: torch.Tensor, labels: torch.Tensor, temperature: float, m_p: float,
           m_n: Optional[float] = None, mode: str = "paper", backend: str = "torch",
           negatives: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, row_offset: int = 0,
           split_cols: int = 0, triton_mode: str = "auto") -> torch.Tensor:
    """Mean D2D-CE over the rows of ``embed``.

    embed, proxy: raw (N, d) sample embeddings and the proxies of their labels (normalized here).
    labels: (N,) int64. m_n defaults to 1 - m_p, as in the paper's search.
    mode: "paper" is Eq. 6; "studiogan" reproduces PyTorch-StudioGAN, which scales the negative terms of row i by
        exp(-max_{j != i} (s_ij - m_n) / t) with the max treated as a constant (it changes the loss, not only its
        numerics: the positive term is not scaled).
    negatives: optional (embed_all, labels_all), the columns (e.g. the global batch gathered over ranks); row i of
        ``embed`` is column ``row_offset + i`` there and is excluded as its own negative. Gradients flow into embed_all.
    backend: "torch" (this reference), "triton" (the fused kernel), "auto" (Triton on CUDA, torch otherwise).
    triton_mode, split_cols: the Triton path's mode ("auto", "matrix": cuBLAS products held in memory, "fused": no
        N x M matrix in the forward, "stream": none in the backward either) and the fused forward's column split
        (0: sized to the GPU), for benchmarks and tests; see similarity_triton.py.
    """
    _check_inputs(embed, proxy, labels, temperature, mode, backend)
    if use_triton(backend, embed, proxy, *([] if negatives is None else [negatives[0]]), op="d2d_ce"):
        return _d2d_ce_triton(embed, proxy, labels, temperature, m_p, m_n, mode, negatives, row_offset, split_cols,
                              triton_mode)
    m_n = 1.0 - m_p if m_n is None else m_n
    f = F.normalize(_acc(embed), dim=1)
    v = F.normalize(_acc(proxy), dim=1)
    if negatives is None:
        cols, col_labels = f, labels
    else:
        cols, col_labels = F.normalize(_acc(negatives[0]), dim=1), negatives[1]
    n, m = f.shape[0], cols.shape[0]
    # a comparison, not is_self[i, i + offset] = True: that index_put copies a host scalar to the GPU each call
    # (a pageable copy, which also makes the loss uncapturable in a CUDA graph: seen on an H100)
    is_self = torch.arange(m, device=f.device)[None, :] == torch.arange(n, device=f.device)[:, None] + row_offset
    is_neg = (labels[:, None] != col_labels[None, :]) & ~is_self

    pos = _positive_logits(f, v, temperature, m_p)                               # [s_i - m_p]_- / t
    sim = (f @ cols.t() - m_n) / temperature                                     # (s_ij - m_n) / t
    neg = torch.clamp(sim, min=0.0).masked_fill(~is_neg, float("-inf"))          # [.]_+ / t on negatives only
    if mode == "studiogan":
        # Shift by the row max over j != i (not only negatives), detached: exactly StudioGAN's stabilizer.
        others = sim.detach().masked_fill(is_self, float("-inf"))
        shift = others.max(dim=1, keepdim=True).values
        neg = neg - torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    denom = torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1)
    return (denom - pos).mean()


def _positive_logits(f: torch.Tensor, v: torch.Tensor, temperature: float, m_p: float) -> torch.Tensor:
    """[s_i - m_p]_- / t of normalized embeddings f and proxies v: a row-wise dot product, O(N d)."""
    return torch.clamp((f * v).sum(1) - m_p, max=0.0) / temperature


def _d2d_ce_triton(embed: torch.Tensor, proxy: torch.Tensor, labels: torch.Tensor, temperature: float, m_p: float,
                   m_n: Optional[float], mode: str, negatives: Optional[Tuple[torch.Tensor, torch.Tensor]],
                   row_offset: int, split_cols: int, triton_mode: str) -> torch.Tensor:
    from kernels.similarity_triton import D2DCE
    m_n = 1.0 - m_p if m_n is None else m_n
    cols, col_labels = (None, None) if negatives is None else negatives
    return D2DCE.apply(embed, proxy, labels, cols, col_labels, int(row_offset), float(m_p), float(m_n),
                       float(temperature), mode == "studiogan", int(split_cols), triton_mode)


def normalized_similarity(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Cosine-similarity matrix (N, M) of the rows of a (N, d) and b (M, d): normalize + matmul, fused in the
    Triton backend (the norms are accumulated in the same pass over d as the dot products). Differentiable."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"normalized_similarity: need (N, d) and (M, d); got {tuple(a.shape)} and {tuple(b.shape)}")
    if use_triton(backend, a, b, op="normalized_similarity"):
        return _CosineMatrix.apply(a, b)
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()


class _CosineMatrix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        from kernels.cosine_triton import cosine_matrix
        ctx.save_for_backward(a, b)
        return cosine_matrix(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The backward is two matmuls either way; the reference's autograd is the clearest correct one.
        a, b = ctx.saved_tensors
        with torch.enable_grad():
            a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
            s = F.normalize(a_, dim=1) @ F.normalize(b_, dim=1).t()
            return torch.autograd.grad(s, (a_, b_), grad)
