"""Triton kernels behind ``kernels.d2d_ce(backend="triton")`` and ``kernels.normalized_similarity``.

Forward: the N x M similarity matrix of D2D-CE is never stored. Rows are L2-normalized inside the tiles (the dot
products of raw rows are scaled by per-row inverse norms, an O(N) vector), margins, temperature and the label / self
masks are applied per tile, and the log-sum-exp over negatives is streamed over column tiles. Training has few
rows per GPU (8-64 local rows against 2048 gathered columns), so the columns are also split across the grid
(flash-decoding): program (i, s) keeps a running (max, sum, StudioGAN shift) for row block i over column split s,
and a combine kernel merges the splits; the grid fills the GPU whatever N. Tile sizes are autotuned per (N, M, d).

Backward, two modes: "matrix" (N * M small enough to hold: the default up to 2^26 entries) writes the (N, M)
matrix P = dLoss/dsim in one fully parallel launch, with partial row / column sums of P * sim, and leaves the
products P B^ and P^T A^ to torch.mm (cuBLAS); "stream" (any size) recomputes tiles and accumulates in an fp32
(N, d) buffer per side: extra memory O((N + M) d).

Precision: fp32 inputs multiply as "tf32x3" (three TF32 products: fp32 accuracy on tensor cores; "tf32" where torch
itself allows TF32), never as FMA loops; bf16 inputs multiply in bf16 and accumulate in fp32. No float atomics:
results are bitwise reproducible.

The torch reference in similarity.py is the spec; tests compare the two on fresh random inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import interpreting

NORM_EPS = 1e-12  # F.normalize's default, which the reference uses


MATRIX_BACKWARD_MAX = 2 ** 26  # N * M up to this: the backward writes dLoss/dsim (256 MB in fp32) and uses cuBLAS
SPLIT_COLS = 128               # column splits are multiples of this (the largest autotuned BJ)
TARGET_PROGRAMS = 264          # forward programs to aim for: 2 per SM of an H100 (132 SMs)


def gpu_tiles(dtype: torch.dtype) -> dict:
    """Tile sizes and warps of the kernels that are not autotuned, per input dtype. fp32 multiplies as tf32x3 (three
    products per dot): smaller k tiles and 8 warps keep it free of register spills (kernels.compile_check)."""
    if dtype == torch.float32:
        return dict(BI=64, BJ=64, BK=32, BD=32, num_warps=8)
    return dict(BI=64, BJ=64, BK=64, BD=64, num_warps=4)


def stream_tiles(dtype: torch.dtype) -> dict:
    """Tiles of the streaming backward (used past MATRIX_BACKWARD_MAX): it holds a score tile and a gradient tile at
    once, so it takes smaller tiles than ``gpu_tiles`` to stay free of register spills under Triton 3.6 and 3.9."""
    if dtype == torch.float32:
        return dict(BI=32, BJ=32, BK=32, BD=32, num_warps=8)
    return dict(BI=32, BJ=32, BK=64, BD=64, num_warps=4)


def _blocks(device: torch.device, dtype: torch.dtype, stream: bool = False) -> dict:
    # The interpreter pays per program and per loop trip, not per element: fewer, larger tiles are faster there.
    if device.type != "cuda" or interpreting():
        return dict(BI=32, BJ=32, BK=32, BD=32, num_warps=4)
    return stream_tiles(dtype) if stream else gpu_tiles(dtype)


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for inputs of ``dtype`` (see the module docstring)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return "ieee"  # bf16 / fp16 operands: the precision argument does not apply


# The forward's autotuning candidates per input dtype, (BI, BJ, BK, warps, stages): each compiles for sm_90 without
# register spills (kernels.compile_check checks every one).
SPLIT_TILES = {
    torch.bfloat16: ((16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 32, 8, 3),
                     (128, 64, 32, 8, 2), (32, 128, 64, 4, 4)),
    torch.float32: ((16, 32, 64, 4, 3), (64, 64, 32, 8, 3), (64, 128, 16, 8, 3), (128, 64, 16, 8, 3)),
}


def split_configs(dtype: torch.dtype) -> list:
    """The forward's autotuning candidates for inputs of ``dtype`` (fp16 takes bf16's)."""
    if interpreting():  # one config: the interpreter would run every candidate
        return [triton.Config(dict(BI=32, BJ=32, BK=32), num_warps=4, num_stages=1)]
    tiles = SPLIT_TILES[torch.float32 if dtype == torch.float32 else torch.bfloat16]
    return [triton.Config(dict(BI=bi, BJ=bj, BK=bk), num_warps=w, num_stages=st) for bi, bj, bk, w, st in tiles]


def _keep_configs_of_the_dtype(configs: list, named_args: dict, **kwargs) -> list:
    wanted = {(tuple(c.kwargs.items()), c.num_warps, c.num_stages) for c in split_configs(named_args["A"].dtype)}
    return [c for c in configs if (tuple(c.kwargs.items()), c.num_warps, c.num_stages) in wanted]


def column_splits(n: int, m: int, device: torch.device) -> int:
    """Column split width: enough splits that (row blocks x splits) fills the GPU, whole SPLIT_COLS apart."""
    if device.type != "cuda" or interpreting():
        return max(SPLIT_COLS, triton.cdiv(m, 4 * SPLIT_COLS) * SPLIT_COLS)  # a few splits: exercised, cheap
    splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, triton.cdiv(n, 32)), triton.cdiv(m, SPLIT_COLS)))
    return triton.cdiv(triton.cdiv(m, splits), SPLIT_COLS) * SPLIT_COLS


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
def _tile_masks(rows, cols, la, lb, bound, row_offset):
    """(others, negatives) of a tile: j != i's own column and below ``bound``; and of a different label as well."""
    is_self = cols[None, :] == rows[:, None] + row_offset
    others = (cols[None, :] < bound) & (is_self == 0)
    return others, others & (la[:, None] != lb[None, :])


@triton.autotune(configs=split_configs(torch.bfloat16) + (split_configs(torch.float32) if not interpreting() else []),
                 key=["N", "M", "D", "CS"], prune_configs_by={"early_config_prune": _keep_configs_of_the_dtype})
@triton.jit
def neg_lse_split_kernel(A, B, RA, RB, LA, LB, PMAX, PSUM, PSHIFT, N, M, D, CS, row_offset, m_n, inv_t,
                         STUDIOGAN: tl.constexpr, PREC: tl.constexpr,
                         BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    """Program (i, s): rows block i against columns [s CS, (s + 1) CS): running max, sum of exp and StudioGAN's
    shift of the negatives' clamped logits, written to row s of the (splits, N) partial buffers."""
    rows = tl.program_id(0) * BI + tl.arange(0, BI)
    split = tl.program_id(1)
    rmask = rows < N
    ra = tl.load(RA + rows, mask=rmask, other=0.0)
    la = tl.load(LA + rows, mask=rmask, other=-1)
    c_lo = split * CS
    c_hi = tl.minimum(c_lo + CS, M)
    run_max = tl.full((BI,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BI,), tl.float32)
    shift = tl.full((BI,), float("-inf"), tl.float32)
    for j0 in range(c_lo, c_hi, BJ):
        cols = j0 + tl.arange(0, BJ)
        cmask = cols < c_hi
        rb = tl.load(RB + cols, mask=cmask, other=0.0)
        lb = tl.load(LB + cols, mask=cmask, other=-2)
        sim = _dot_tile(A, B, rows, cols, N, M, D, BI, BJ, BK, PREC) * ra[:, None] * rb[None, :]
        x = (sim - m_n) * inv_t
        others, neg = _tile_masks(rows, cols, la, lb, c_hi, row_offset)
        xn = tl.where(neg, tl.maximum(x, 0.0), float("-inf"))
        new_max = tl.maximum(run_max, tl.max(xn, axis=1))
        base = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with no negatives yet: keep sums at 0
        run_sum = run_sum * tl.exp(run_max - base) + tl.sum(tl.exp(xn - base[:, None]), axis=1)
        run_max = new_max
        if STUDIOGAN:
            shift = tl.maximum(shift, tl.max(tl.where(others, x, float("-inf")), axis=1))
    out = split * N + rows
    tl.store(PMAX + out, run_max, mask=rmask)
    tl.store(PSUM + out, run_sum, mask=rmask)
    tl.store(PSHIFT + out, shift, mask=rmask)


@triton.jit
def neg_lse_combine_kernel(PMAX, PSUM, PSHIFT, LSE, OUT, N, S, STUDIOGAN: tl.constexpr, BR: tl.constexpr,
                           BS: tl.constexpr):
    """Merge the splits of a block of rows: log-sum-exp (-inf: no negatives) and, for StudioGAN, minus the shift."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    splits = tl.arange(0, BS)
    mask = (splits[:, None] < S) & (rows[None, :] < N)
    offs = splits[:, None] * N + rows[None, :]
    pmax = tl.load(PMAX + offs, mask=mask, other=float("-inf"))
    psum = tl.load(PSUM + offs, mask=mask, other=0.0)
    m = tl.max(pmax, axis=0)
    base = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(psum * tl.exp(pmax - base[None, :]), axis=0)
    lse = tl.where(total > 0.0, m + tl.log(tl.maximum(total, 1e-30)), float("-inf"))
    tl.store(LSE + rows, lse, mask=rows < N)
    if STUDIOGAN:
        shift = tl.max(tl.load(PSHIFT + offs, mask=mask, other=float("-inf")), axis=0)
        lse = lse - tl.where(shift == float("-inf"), 0.0, shift)
    tl.store(OUT + rows, lse, mask=rows < N)


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
        # ACC was stored by this program's threads in one layout and is re-read in another: Triton orders global
        # memory between a program's threads only across a barrier (triton-lang/triton#10924)
        tl.debug_barrier()
        amask = imask[:, None] & (ds[None, :] < D)
        tl.store(acc_ptr, tl.load(acc_ptr, mask=amask, other=0.0) + tl.dot(g, x, input_precision=PREC), mask=amask)


@triton.jit
def _normalization_grad(ACC, X, OUT, idx, imask, r, c, D, BD: tl.constexpr):
    """Chain rule through x -> x r (r = 1 / |x|): OUT_i = r_i (acc_i - c_i r_i x_i), c_i = sum_j G_ij sim_ij."""
    tl.debug_barrier()  # ACC's last stores, by other threads of this program, before these loads
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
def neg_lse_grad_matrix_kernel(A, B, RA, RB, LA, LB, LSE, G, P, CROW, CCOL, N, M, D, row_offset, m_n, inv_t,
                               PREC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    """Program (i, j): the (BI, BJ) tile of P = dLoss/dsim, and this tile's row sums (into row j of CROW) and
    column sums (into row i of CCOL) of P * sim, for the normalization's chain rule."""
    rows = tl.program_id(0) * BI + tl.arange(0, BI)
    cols = tl.program_id(1) * BJ + tl.arange(0, BJ)
    gs, sim, ra, rb = _bwd_tile(A, B, RA, RB, LA, LB, LSE, G, rows, cols, N, M, D, row_offset, m_n, inv_t,
                                BI, BJ, BK, PREC)
    rmask, cmask = rows < N, cols < M
    tl.store(P + rows[:, None] * M + cols[None, :], gs, mask=rmask[:, None] & cmask[None, :])
    tl.store(CROW + tl.program_id(1) * N + rows, tl.sum(gs * sim, axis=1), mask=rmask)
    tl.store(CCOL + tl.program_id(0) * M + cols, tl.sum(gs * sim, axis=0), mask=cmask)


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
    bl = _blocks(x.device, x.dtype)
    inv_norm_kernel[(triton.cdiv(x.shape[0], bl["BI"]),)](x, out, x.shape[0], x.shape[1], NORM_EPS,
                                                            BR=bl["BI"], BD=bl["BD"])
    return out


class NegLogSumExp(torch.autograd.Function):
    """Per row i of ``a``: log sum_{j in negatives(i)} exp(clamp((cos(a_i, b_j) - m_n) / t, min=0)), minus, in
    StudioGAN mode, the detached row max over j != i of (cos - m_n) / t. -inf for rows without negatives.

    ``split_cols``: the column split width of the forward (0: chosen for the GPU; a large value: one split, the
    1-D grid); ``backward``: "auto" | "matrix" | "stream" (see the module docstring)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, la: torch.Tensor, lb: torch.Tensor, row_offset: int,
                m_n: float, t: float, studiogan: bool, split_cols: int = 0, backward: str = "auto") -> torch.Tensor:
        a, b, la, lb = a.contiguous(), b.contiguous(), la.contiguous(), lb.contiguous()
        n, m, d = a.shape[0], b.shape[0], a.shape[1]
        if max(n, m) * d >= 2 ** 31:  # the kernels index with 32-bit offsets
            raise ValueError(f"d2d_ce(backend='triton'): {max(n, m)} x {d} elements exceed 32-bit offsets; split "
                             f"the batch or use backend='torch'")
        if backward not in ("auto", "matrix", "stream"):
            raise ValueError(f"d2d_ce: backward={backward!r} is not auto, matrix or stream")
        ra = inv_norms(a)
        rb = ra if b is a else inv_norms(b)
        cs = split_cols or column_splits(n, m, a.device)
        splits = triton.cdiv(m, cs)
        partial = torch.empty(3, splits, n, device=a.device, dtype=torch.float32)
        prec = precision(a.dtype)
        neg_lse_split_kernel[lambda meta: (triton.cdiv(n, meta["BI"]), splits)](
            a, b, ra, rb, la, lb, partial[0], partial[1], partial[2], n, m, d, cs, row_offset, m_n, 1.0 / t,
            STUDIOGAN=studiogan, PREC=prec)
        lse = torch.empty(n, device=a.device, dtype=torch.float32)
        out = torch.empty_like(lse)
        br = 64
        neg_lse_combine_kernel[(triton.cdiv(n, br),)](partial[0], partial[1], partial[2], lse, out, n, splits,
                                                      STUDIOGAN=studiogan, BR=br,
                                                      BS=max(triton.next_power_of_2(splits), 2))
        ctx.save_for_backward(a, b, la, lb, ra, rb, lse)
        ctx.consts = (row_offset, m_n, 1.0 / t, prec)
        ctx.matrix = backward == "matrix" or (backward == "auto" and n * m <= MATRIX_BACKWARD_MAX)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, b, la, lb, ra, rb, lse = ctx.saved_tensors
        row_offset, m_n, inv_t, prec = ctx.consts
        g = g.contiguous().float()
        n, m, d = a.shape[0], b.shape[0], a.shape[1]
        bl = _blocks(a.device, a.dtype, stream=not ctx.matrix)
        warps = bl.pop("num_warps")
        args = (la, lb, lse, g)
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        da = db = None
        if ctx.matrix:
            grid = (triton.cdiv(n, bl["BI"]), triton.cdiv(m, bl["BJ"]))
            p = torch.empty(n, m, device=a.device, dtype=torch.float32)
            crow = torch.empty(grid[1], n, device=a.device, dtype=torch.float32)
            ccol = torch.empty(grid[0], m, device=a.device, dtype=torch.float32)
            neg_lse_grad_matrix_kernel[grid](a, b, ra, rb, *args, p, crow, ccol, n, m, d, row_offset, m_n, inv_t,
                                             PREC=prec, BI=bl["BI"], BJ=bl["BJ"], BK=bl["BK"], num_warps=warps)
            mm_dtype = torch.float32 if a.dtype == torch.float32 else a.dtype  # bf16 products, fp32 accumulation
            a_hat, b_hat = a.float() * ra[:, None], b.float() * rb[:, None]
            pm = p.to(mm_dtype)
            if need_a:  # dA = ra (P B^ - c_row A^)
                da = (ra[:, None] * (torch.mm(pm, b_hat.to(mm_dtype)).float() - crow.sum(0)[:, None] * a_hat))
                da = da.to(a.dtype)
            if need_b:
                db = (rb[:, None] * (torch.mm(pm.t(), a_hat.to(mm_dtype)).float() - ccol.sum(0)[:, None] * b_hat))
                db = db.to(b.dtype)
            return da, db, None, None, None, None, None, None, None, None
        if need_a:
            acc = torch.zeros(n, d, device=a.device, dtype=torch.float32)
            da = acc if a.dtype == torch.float32 else torch.empty_like(a)  # finalized in place where it can
            neg_lse_bwd_rows_kernel[(triton.cdiv(n, bl["BI"]),)](
                a, b, ra, rb, *args, acc, da, n, m, d, row_offset, m_n, inv_t, PREC=prec, num_warps=warps, **bl)
        if need_b:
            acc = torch.zeros(m, d, device=b.device, dtype=torch.float32)
            db = acc if b.dtype == torch.float32 else torch.empty_like(b)
            neg_lse_bwd_cols_kernel[(triton.cdiv(m, bl["BJ"]),)](
                a, b, ra, rb, *args, acc, db, n, m, d, row_offset, m_n, inv_t, PREC=prec, num_warps=warps, **bl)
        return da, db, None, None, None, None, None, None, None, None


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    s = torch.empty(n, m, device=a.device, dtype=torch.promote_types(a.dtype, b.dtype))
    bl = _blocks(a.device, a.dtype)
    grid = (triton.cdiv(n, bl["BI"]), triton.cdiv(m, bl["BJ"]))
    cosine_kernel[grid](a, b, s, n, m, d, NORM_EPS, PREC=precision(a.dtype), BI=bl["BI"], BJ=bl["BJ"], BK=bl["BK"],
                        num_warps=bl["num_warps"])
    return s
