"""Triton kernel behind ``kernels.normalized_similarity``: the (N, M) cosine-similarity matrix, with the row norms
accumulated in the same pass over d as the dot products (no normalized copies of the inputs)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import interpreting
from kernels.launch import cdiv
from kernels.similarity_triton import NORM_EPS, dot_tile, gpu_tiles, precision


def cosine_tiles(dtype: torch.dtype) -> dict:
    """The D2D-CE tiles, but (64, 32, 32) in fp32: its norm sums spill otherwise on sm_80 (Triton 3.6 and 3.9)."""
    tiles = gpu_tiles(dtype)
    return {**tiles, "BK": 32, "BJ": 32} if dtype == torch.float32 else tiles


@triton.jit
def cosine_kernel(A, B, S, N, M, D, eps, PREC: tl.constexpr,
                   BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BI + tl.arange(0, BI)
    cols = tl.program_id(1) * BJ + tl.arange(0, BJ)
    acc, ssa, ssb = dot_tile(A, B, rows, cols, N, M, D, BI, BJ, BK, PREC)
    s = acc / (tl.maximum(tl.sqrt(ssa), eps)[:, None] * tl.maximum(tl.sqrt(ssb), eps)[None, :])
    tl.store(S + rows[:, None] * M + cols[None, :], s.to(S.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < M))


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    s = torch.empty(n, m, device=a.device, dtype=torch.promote_types(a.dtype, b.dtype))
    # the interpreter pays per program and per loop trip, not per element: 32-wide tiles
    bl = cosine_tiles(a.dtype) if a.device.type == "cuda" and not interpreting() else dict(BI=32, BJ=32, BK=32,
                                                                                              num_warps=4)
    grid = (cdiv(n, bl["BI"]), cdiv(m, bl["BJ"]))
    cosine_kernel[grid](a, b, s, n, m, d, NORM_EPS, PREC=precision(a.dtype), BI=bl["BI"], BJ=bl["BJ"], BK=bl["BK"],
                        num_warps=bl["num_warps"])
    return s
