"""Triton kernels behind ``kernels.d2d_ce(backend="triton")`` and ``kernels.normalized_similarity``.

The N x M similarity matrix of D2D-CE is never stored. Rows are L2-normalized inside the tiles (the dot products of
raw rows are scaled by per-row inverse norms, an O(N) vector), margins, temperature and the label / self masks are
applied per tile, and the log-sum-exp over negatives is streamed over column tiles (flash-attention style). The
backward recomputes each tile; gradients are accumulated in an fp32 (N, d) buffer per side, so the extra memory is
O((N + M) d) whatever the batch.

The torch reference in similarity.py is the spec; tests compare the two on fresh random inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import interpreting

NORM_EPS = 1e-12  # F.normalize's default, which the reference uses


def _blocks(device: torch.device) -> dict:
    # The interpreter pays per program and per loop trip, not per element: fewer, larger tiles are faster there.
    if device.type != "cuda" or interpreting():
        return dict(BI=32, BJ=32, BK=32, BD=32)
    return dict(BI=64, BJ=64, BK=64, BD=64)


def _precision() -> str:
    # fp32 inputs follow torch's own matmul setting, so "fp32" means the same thing in both backends
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def inv_norm_kernel(X, OUT, N, D, eps, BR: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ss = tl.zeros((BR,), tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        x = tl.load(X + rows[:, None] * D + ds[None, :], mask=(rows[:, None] < N) & (ds[None, :] < D), other=0.0)
        x = x.to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    tl.store(OUT + rows, 1.0 / tl.maximum(tl.sqrt(ss), eps), mask=rows < N)


@triton.jit
def _dot_tile(A, B, rows, cols, N, M, D, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
              PREC: tl.constexpr):
    """Raw dot products a_i . b_j of a (BI, BJ) tile, accumulated in fp32 over d."""
    acc = tl.zeros((BI, BJ), tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(A + rows[:, None] * D + ks[None, :], mask=(rows[:, None] < N) & (ks[None, :] < D), other=0.0)
        b = tl.load(B + cols[None, :] * D + ks[:, None], mask=(cols[None, :] < M) & (ks[:, None] < D), other=0.0)
        acc += tl.dot(a, b, input_precision=PREC)
    return acc


@triton.jit
def _tile_masks(rows, cols, la, lb, M, row_offset):
    """(others, negatives) of a tile: j != i's own column and in range; and of a different label as well."""
    is_self = cols[None, :] == rows[:, None] + row_offset
    others = (cols[None, :] < M) & (is_self == 0)
    return others, others & (la[:, None] != lb[None, :])


@triton.jit
def neg_lse_fwd_kernel(A, B, RA, RB, LA, LB, LSE, OUT, N, M, D, row_offset, m_n, inv_t,
                        STUDIOGAN: tl.constexpr, PREC: tl.constexpr,
                        BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BI + tl.arange(0, BI)
    rmask = rows < N
    ra = tl.load(RA + rows, mask=rmask, other=0.0)
    la = tl.load(LA + rows, mask=rmask, other=-1)
    run_max = tl.full((BI,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BI,), tl.float32)
    shift = tl.full((BI,), float("-inf"), tl.float32)
    for j0 in range(0, M, BJ):
        cols = j0 + tl.arange(0, BJ)
        cmask = cols < M
        rb = tl.load(RB + cols, mask=cmask, other=0.0)
        lb = tl.load(LB + cols, mask=cmask, other=-2)
        sim = _dot_tile(A, B, rows, cols, N, M, D, BI, BJ, BK, PREC) * ra[:, None] * rb[None, :]
        x = (sim - m_n) * inv_t
        others, neg = _tile_masks(rows, cols, la, lb, M, row_offset)
        xn = tl.where(neg, tl.maximum(x, 0.0), float("-inf"))
        new_max = tl.maximum(run_max, tl.max(xn, axis=1))
        base = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with no negatives yet: keep sums at 0
        run_sum = run_sum * tl.exp(run_max - base) + tl.sum(tl.exp(xn - base[:, None]), axis=1)
        run_max = new_max
        if STUDIOGAN:
            shift = tl.maximum(shift, tl.max(tl.where(others, x, float("-inf")), axis=1))
    lse = tl.where(run_sum > 0.0, run_max + tl.log(tl.maximum(run_sum, 1e-30)), float("-inf"))  # -inf: no negatives
    tl.store(LSE + rows, lse, mask=rmask)
    if STUDIOGAN:
        lse = lse - tl.where(shift == float("-inf"), 0.0, shift)
    tl.store(OUT + rows, lse, mask=rmask)


@triton.jit
def _grad_tile(sim, la, lb, lse, g, rows, cols, M, row_offset, m_n, inv_t):
    """dLoss/dsim of a tile, for loss = sum_i g_i * lse_i over negatives of clamp((sim - m_n)/t, min=0)."""
    x = (sim - m_n) * inv_t
    others, neg = _tile_masks(rows, cols, la, lb, M, row_offset)
    live = neg & (x >= 0.0)  # torch's clamp passes the gradient at the boundary too
    p = tl.where(live, tl.exp(x - lse[:, None]), 0.0)
    return g[:, None] * p * inv_t


@triton.jit
def _accumulate(ACC, idx, imask, g, X, xidx, xmask, D, BD: tl.constexpr, PREC: tl.constexpr):
    """ACC[idx, :] += g @ X[xidx, :] over d in BD chunks; ACC's rows ``idx`` belong to this program alone."""
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        x = tl.load(X + xidx[:, None] * D + ds[None, :], mask=xmask[:, None] & (ds[None, :] < D), other=0.0)
        acc_ptr = ACC + idx[:, None] * D + ds[None, :]
        amask = imask[:, None] & (ds[None, :] < D)
        tl.store(acc_ptr, tl.load(acc_ptr, mask=amask, other=0.0) + tl.dot(g, x, input_precision=PREC), mask=amask)


@triton.jit
def _normalization_grad(ACC, X, OUT, idx, imask, r, c, D, BD: tl.constexpr):
    """Chain rule through x -> x r (r = 1 / |x|): OUT_i = r_i (acc_i - c_i r_i x_i), c_i = sum_j G_ij sim_ij."""
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        amask = imask[:, None] & (ds[None, :] < D)
        acc = tl.load(ACC + idx[:, None] * D + ds[None, :], mask=amask, other=0.0)
        x = tl.load(X + idx[:, None] * D + ds[None, :], mask=amask, other=0.0).to(tl.float32)
        out = r[:, None] * (acc - (c * r)[:, None] * x)
        tl.store(OUT + idx[:, None] * D + ds[None, :], out.to(OUT.dtype.element_ty), mask=amask)


@triton.jit
def _bwd_tile(A, B, RA, RB, LA, LB, LSE, G, rows, cols, N, M, D, row_offset, m_n, inv_t,
              BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Recompute one (rows, cols) tile: (dLoss/dsim, sim, ra, rb), zero outside the matrix."""
    rmask, cmask = rows < N, cols < M
    ra = tl.load(RA + rows, mask=rmask, other=0.0)
    rb = tl.load(RB + cols, mask=cmask, other=0.0)
    la = tl.load(LA + rows, mask=rmask, other=-1)
    lb = tl.load(LB + cols, mask=cmask, other=-2)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    g = tl.load(G + rows, mask=rmask, other=0.0)  # 0 on padding rows: their gradient vanishes
    sim = _dot_tile(A, B, rows, cols, N, M, D, BI, BJ, BK, PREC) * ra[:, None] * rb[None, :]
    return _grad_tile(sim, la, lb, lse, g, rows, cols, M, row_offset, m_n, inv_t), sim, ra, rb


@triton.jit
def neg_lse_bwd_rows_kernel(A, B, RA, RB, LA, LB, LSE, G, ACC, DA, N, M, D, row_offset, m_n, inv_t,
                             PREC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
                             BD: tl.constexpr):
    """dA for a block of rows: sum_j G_ij rb_j b_j accumulated in fp32 ACC, then the normalization's chain rule."""
    rows = tl.program_id(0) * BI + tl.arange(0, BI)
    rmask = rows < N
    ra = tl.load(RA + rows, mask=rmask, other=0.0)
    c = tl.zeros((BI,), tl.float32)
    for j0 in range(0, M, BJ):
        cols = j0 + tl.arange(0, BJ)
        gs, sim, ra, rb = _bwd_tile(A, B, RA, RB, LA, LB, LSE, G, rows, cols, N, M, D, row_offset, m_n, inv_t,
                                    BI, BJ, BK, PREC)
        c += tl.sum(gs * sim, axis=1)
        _accumulate(ACC, rows, rmask, (gs * rb[None, :]).to(B.dtype.element_ty), B, cols, cols < M, D, BD, PREC)
    _normalization_grad(ACC, A, DA, rows, rmask, ra, c, D, BD)


@triton.jit
def neg_lse_bwd_cols_kernel(A, B, RA, RB, LA, LB, LSE, G, ACC, DB, N, M, D, row_offset, m_n, inv_t,
                             PREC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
                             BD: tl.constexpr):
    """dB for a block of columns (the gathered negatives): the transpose of the rows kernel."""
    cols = tl.program_id(0) * BJ + tl.arange(0, BJ)
    cmask = cols < M
    rb = tl.load(RB + cols, mask=cmask, other=0.0)
    c = tl.zeros((BJ,), tl.float32)
    for i0 in range(0, N, BI):
        rows = i0 + tl.arange(0, BI)
        gs, sim, ra, rb = _bwd_tile(A, B, RA, RB, LA, LB, LSE, G, rows, cols, N, M, D, row_offset, m_n, inv_t,
                                    BI, BJ, BK, PREC)
        c += tl.sum(gs * sim, axis=0)
        _accumulate(ACC, cols, cmask, tl.trans(gs * ra[:, None]).to(A.dtype.element_ty), A, rows, rows < N, D,
                    BD, PREC)
    _normalization_grad(ACC, B, DB, cols, cmask, rb, c, D, BD)


@triton.jit
def cosine_kernel(A, B, S, N, M, D, eps, PREC: tl.constexpr,
                   BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BI + tl.arange(0, BI)
    cols = tl.program_id(1) * BJ + tl.arange(0, BJ)
    acc = tl.zeros((BI, BJ), tl.float32)
    ssa = tl.zeros((BI,), tl.float32)
    ssb = tl.zeros((BJ,), tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(A + rows[:, None] * D + ks[None, :], mask=(rows[:, None] < N) & (ks[None, :] < D), other=0.0)
        b = tl.load(B + cols[None, :] * D + ks[:, None], mask=(cols[None, :] < M) & (ks[:, None] < D), other=0.0)
        acc += tl.dot(a, b, input_precision=PREC)
        af, bf = a.to(tl.float32), b.to(tl.float32)
        ssa += tl.sum(af * af, axis=1)
        ssb += tl.sum(bf * bf, axis=0)
    s = acc / (tl.maximum(tl.sqrt(ssa), eps)[:, None] * tl.maximum(tl.sqrt(ssb), eps)[None, :])
    tl.store(S + rows[:, None] * M + cols[None, :], s.to(S.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < M))


def inv_norms(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    bl = _blocks(x.device)
    inv_norm_kernel[(triton.cdiv(x.shape[0], bl["BI"]),)](x, out, x.shape[0], x.shape[1], NORM_EPS,
                                                            BR=bl["BI"], BD=bl["BD"])
    return out


class NegLogSumExp(torch.autograd.Function):
    """Per row i of ``a``: log sum_{j in negatives(i)} exp(clamp((cos(a_i, b_j) - m_n) / t, min=0)), minus, in
    StudioGAN mode, the detached row max over j != i of (cos - m_n) / t. -inf for rows without negatives."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, la: torch.Tensor, lb: torch.Tensor, row_offset: int,
                m_n: float, t: float, studiogan: bool) -> torch.Tensor:
        a, b, la, lb = a.contiguous(), b.contiguous(), la.contiguous(), lb.contiguous()
        n, m, d = a.shape[0], b.shape[0], a.shape[1]
        ra = inv_norms(a)
        rb = ra if b is a else inv_norms(b)
        lse = torch.empty(n, device=a.device, dtype=torch.float32)
        out = torch.empty_like(lse)
        bl = _blocks(a.device)
        neg_lse_fwd_kernel[(triton.cdiv(n, bl["BI"]),)](
            a, b, ra, rb, la, lb, lse, out, n, m, d, row_offset, m_n, 1.0 / t, STUDIOGAN=studiogan,
            PREC=_precision(), BI=bl["BI"], BJ=bl["BJ"], BK=bl["BK"])
        ctx.save_for_backward(a, b, la, lb, ra, rb, lse)
        ctx.consts = (row_offset, m_n, 1.0 / t)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, b, la, lb, ra, rb, lse = ctx.saved_tensors
        row_offset, m_n, inv_t = ctx.consts
        g = g.contiguous().float()
        n, m, d = a.shape[0], b.shape[0], a.shape[1]
        bl = _blocks(a.device)
        args = (la, lb, lse, g)
        da = db = None
        if ctx.needs_input_grad[0]:
            acc = torch.zeros(n, d, device=a.device, dtype=torch.float32)
            da = acc if a.dtype == torch.float32 else torch.empty_like(a)  # finalized in place where it can
            neg_lse_bwd_rows_kernel[(triton.cdiv(n, bl["BI"]),)](
                a, b, ra, rb, *args, acc, da, n, m, d, row_offset, m_n, inv_t, PREC=_precision(), **bl)
        if ctx.needs_input_grad[1]:
            acc = torch.zeros(m, d, device=b.device, dtype=torch.float32)
            db = acc if b.dtype == torch.float32 else torch.empty_like(b)
            neg_lse_bwd_cols_kernel[(triton.cdiv(m, bl["BJ"]),)](
                a, b, ra, rb, *args, acc, db, n, m, d, row_offset, m_n, inv_t, PREC=_precision(), **bl)
        return da, db, None, None, None, None, None, None


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    s = torch.empty(n, m, device=a.device, dtype=torch.promote_types(a.dtype, b.dtype))
    bl = _blocks(a.device)
    grid = (triton.cdiv(n, bl["BI"]), triton.cdiv(m, bl["BJ"]))
    cosine_kernel[grid](a, b, s, n, m, d, NORM_EPS, PREC=_precision(), BI=bl["BI"], BJ=bl["BJ"], BK=bl["BK"])
    return s
