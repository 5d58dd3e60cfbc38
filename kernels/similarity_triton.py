"""Triton kernels behind ``kernels.d2d_ce(backend="triton")``: the whole loss, forward and backward, in a few launches.

Three modes (``triton_mode`` of kernels.d2d_ce; "auto" takes "matrix" while N x M fits MATRIX_MAX, "stream" past
it):

- "matrix" (3 launches forward and the mean; 4-5 backward): cuBLAS computes the raw products S = A B^T (N x M, fp32:
  bf16 inputs accumulate and stay in fp32). One kernel takes the columns' inverse norms; one pass over the rows
  walks their row of S: L2-normalizes it with the norms, applies margins, temperature and the label / self masks,
  streams the log-sum-exp over the negatives, adds the positive term (its own pass over the rows and their proxies)
  and writes each row's loss and the per-row weights the backward needs; torch takes the mean. Memory O(N M).
- "fused" (2 launches forward): the N x M matrix is never stored. The split kernel computes the dot products tile by
  tile and normalizes them with the row and column norms it accumulates itself; with few rows per GPU (8-64 local
  rows against 2048 gathered columns) the columns are split across the grid too (flash-decoding): program (i, s)
  keeps a running (max, sum, StudioGAN shift) for row block i over column split s, and a combine kernel merges the
  splits and adds the positive term. On an H200 its dot products ran at a fifth of cuBLAS's rate (0.033 ms for
  256 x 2048 x 2048 bf16, where cuBLAS took 0.007 ms for the same-size product), and in fp32 three TF32 products
  per tile lost to one fp32 cuBLAS product: "matrix" hands the product to cuBLAS.
- "stream": the fused forward, and a backward that recomputes tiles and accumulates its products in fp32 (N, d)
  and (M, d) buffers: extra memory O((N + M) d), any size.

The backward of "matrix" and "fused" writes the (N, M) matrix Q = ra_i (dLoss/dsim_ij) rb_j in one fully parallel
launch (from S, or recomputing the products), with partial row / column sums of (dLoss/dsim) * sim, and leaves the
products Q B and Q^T A to torch.mm (cuBLAS). Every mode ends with one finishing kernel per side that applies the
normalizations' chain rule and the positive term's gradient (and, when the columns are the rows themselves, adds
both sides in one pass).

Precision: the kernels' own fp32 products multiply as "tf32x3" (three TF32 products: fp32 accuracy on tensor cores;
"tf32" where torch itself allows TF32), never as FMA loops; bf16 inputs multiply in bf16 and accumulate in fp32;
cuBLAS follows torch's TF32 switch as the reference does. No float atomics: results are bitwise reproducible.

The torch reference in similarity.py is the spec; tests compare the two on fresh random inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import autocast_off, interpreting
from kernels.launch import cdiv, launch, next_power_of_2

NORM_EPS = 1e-12  # F.normalize's default, which the reference uses


MODES = ("auto", "matrix", "fused", "stream")
MATRIX_MAX = 2 ** 26  # N * M up to this: "auto" holds S and Q (256 MB each at most in fp32) and uses cuBLAS
SPLIT_COLS = 128               # column splits are multiples of this (the largest autotuned BJ) ...
SPLIT_GRAIN = 32               # ... or of the smallest, for few rows (see column_splits)
FEW_ROWS = 64                  # up to this many rows the forward's grid has one or two row blocks
TARGET_PROGRAMS = 264          # forward programs to aim for: 2 per SM of an H100 (132 SMs)


def gpu_tiles(dtype: torch.dtype, n: int = 1 << 30) -> dict:
    """Tile sizes and warps of the kernels that are not autotuned, per input dtype and number of rows. fp32
    multiplies as tf32x3 (three products per dot): smaller k tiles and 8 warps keep it free of register spills
    (kernels.compile_check). Up to 32 rows (the operating point: 8-32 per GPU) the row tile shrinks to 16 or 32 and
    the column tile to 32: a 64-row tile at 8 rows computes 8 times the products it keeps, and the H200 ran the
    fp32 gradient-matrix kernel at 8 x 2048 x 2048 in 0.107 ms on 32 programs (bf16: 0.012 ms)."""
    bi = 16 if n <= 16 else 32 if n <= 32 else 64
    if dtype == torch.float32:
        return dict(BI=bi, BJ=64 if bi == 64 else 32, BK=16, BD=32, num_warps=8 if bi == 64 else 4)
    return dict(BI=bi, BJ=64 if bi == 64 else 32, BK=64, BD=64, num_warps=4)


def stream_tiles(dtype: torch.dtype) -> dict:
    """Tiles of the streaming backward ("stream", which "auto" takes past MATRIX_MAX): it holds a score tile and a
    gradient tile at once, so it takes smaller tiles than ``gpu_tiles`` to stay free of register spills under
    Triton 3.6 and 3.9."""
    if dtype == torch.float32:
        return dict(BI=32, BJ=32, BK=32, BD=32, num_warps=8)
    return dict(BI=32, BJ=32, BK=64, BD=64, num_warps=4)


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for inputs of ``dtype`` (see the module docstring)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return "ieee"  # bf16 / fp16 operands: the precision argument does not apply


# The forward's autotuning candidates per input dtype, (BI, BJ, BK, warps, stages): each compiles for sm_90 without
# register spills (kernels.compile_check checks every one).
SPLIT_TILES = {
    torch.bfloat16: ((16, 32, 64, 4, 3), (16, 64, 64, 4, 3), (32, 64, 64, 8, 3), (64, 64, 64, 4, 3),
                     (64, 128, 32, 8, 3), (128, 64, 32, 8, 2)),
    torch.float32: ((16, 32, 32, 4, 3), (64, 64, 32, 8, 3), (64, 128, 16, 8, 3), (128, 64, 16, 8, 3)),
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
    """Column split width: enough splits that (row blocks x splits) fills the GPU, whole SPLIT_COLS apart, or
    SPLIT_GRAIN apart for up to FEW_ROWS rows: there the grid has one or two row blocks, and 128-column splits of
    2048 columns left 16 programs for 132 SMs (H100 and H200, 8 x 2048 x d). A split narrower than the autotuned
    column tile is still right (the tile's columns past the split are masked); the autotuner, keyed on the
    split, weighs the waste."""
    if device.type != "cuda" or interpreting():
        return max(SPLIT_COLS, cdiv(m, 4 * SPLIT_COLS) * SPLIT_COLS)  # a few splits: exercised, cheap
    grain = SPLIT_GRAIN if n <= FEW_ROWS else SPLIT_COLS
    splits = max(1, min(cdiv(TARGET_PROGRAMS, cdiv(n, 32)), cdiv(m, grain)))
    return cdiv(cdiv(m, splits), grain) * grain


def row_tiles(device: torch.device) -> dict:
    """Tiles of the finishing kernel, whose grid is (row blocks, feature blocks): (BR rows, BD features)."""
    if device.type != "cuda" or interpreting():
        return dict(BR=32, BD=64)
    return dict(BR=16, BD=128)


def combine_tiles(device: torch.device) -> dict:
    """Tiles of the combine kernel, which walks all d features of its rows (the positive term): few rows per
    program and wide feature chunks, so that 8-64 rows still spread over several programs with few trips each (with
    the finishing kernel's 16 x 128, 8 rows were one program walking 16 chunks: 0.008 ms on the H200)."""
    if device.type != "cuda" or interpreting():
        return dict(BR=32, BD=64)
    return dict(BR=4, BD=512)


def scan_tiles(device: torch.device) -> dict:
    """Tiles of the "matrix" forward's two scans, the columns' norms and the rows' pass over S: BR rows per program
    (few, so that 8-64 rows still make several programs) walking BJ columns of S and BD features at a time."""
    if device.type != "cuda" or interpreting():
        return dict(BR=8, BJ=64, BD=32)
    return dict(BR=4, BJ=512, BD=512)


def from_s_tiles(n: int, device: torch.device) -> dict:
    """Tiles of the gradient-matrix kernel when it reads S: elementwise over (N, M), so small row tiles (16 or 32
    rows) and 64 columns keep the grid wide at 8-32 rows; BK is unused there."""
    if device.type != "cuda" or interpreting():
        return dict(BI=32, BJ=32, BK=32, num_warps=4)
    return dict(BI=16 if n <= 16 else 32, BJ=64, BK=16, num_warps=4)


MM_TO_FP32 = "dtype" in torch.ops.aten.mm.overloads()  # torch >= 2.8: bf16 x bf16 -> fp32 (CUDA)


def raw_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """S = a b^T in fp32 by cuBLAS: bf16 / fp16 products accumulate in fp32 and are kept in fp32 (``out_dtype``;
    before torch 2.8, fp32 copies of the inputs), fp32 follows torch's TF32 switch, as the reference's matmul does.
    Autocast is off: under it, fp32 inputs would be multiplied in bf16, and the kernels' precision would depend on
    the caller's context."""
    with autocast_off(a.device.type):
        if a.dtype == torch.float32:
            return torch.mm(a, b.t())
        if not MM_TO_FP32:
            return torch.mm(a.float(), b.float().t())
        return torch.mm(a, b.t(), out_dtype=torch.float32)


@triton.jit
def _inv_norm(ss, eps):
    """1 / max(|x|, eps) from the sum of squares: F.normalize's divisor, which the reference uses."""
    return 1.0 / tl.maximum(tl.sqrt(ss), eps)


@triton.jit
def dot_tile(A, B, rows, cols, N, M, D, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Raw dot products a_i . b_j of a (BI, BJ) tile accumulated in fp32 over d, and the rows' and the columns'
    sums of squares from the same loads (dead code where the caller does not use them: the compiled kernels are
    the same size without them)."""
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
    return acc, ssa, ssb


@triton.jit
def _tile_masks(rows, cols, la, lb, bound, row_offset):
    """(others, negatives) of a tile: j != i's own column and below ``bound``; and of a different label as well."""
    is_self = cols[None, :] == rows[:, None] + row_offset
    others = (cols[None, :] < bound) & (is_self == 0)
    return others, others & (la[:, None] != lb[None, :])


@triton.jit
def _lse_step(x, others, neg, run_max, run_sum, shift, STUDIOGAN: tl.constexpr):
    """One tile of the rows' running (max, sum of exp) of the negatives' clamped logits x, and of StudioGAN's shift
    (the max of x over the other columns)."""
    xn = tl.where(neg, tl.maximum(x, 0.0), float("-inf"))
    new_max = tl.maximum(run_max, tl.max(xn, axis=1))
    base = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with no negatives yet: keep sums at 0
    run_sum = run_sum * tl.exp(run_max - base) + tl.sum(tl.exp(xn - base[:, None]), axis=1)
    if STUDIOGAN:
        shift = tl.maximum(shift, tl.max(tl.where(others, x, float("-inf")), axis=1))
    return new_max, run_sum, shift


@triton.jit
def _row_dots(A, V, rows, rmask, D, BD: tl.constexpr):
    """(a_i . v_i, |a_i|^2, |v_i|^2) of the rows and their proxies, over d in BD chunks."""
    dot = tl.zeros(rows.shape, tl.float32)
    ssa = tl.zeros(rows.shape, tl.float32)
    ssv = tl.zeros(rows.shape, tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        dmask = rmask[:, None] & (ds[None, :] < D)
        a = tl.load(A + rows[:, None] * D + ds[None, :], mask=dmask, other=0.0).to(tl.float32)
        v = tl.load(V + rows[:, None] * D + ds[None, :], mask=dmask, other=0.0).to(tl.float32)
        dot += tl.sum(a * v, axis=1)
        ssa += tl.sum(a * a, axis=1)
        ssv += tl.sum(v * v, axis=1)
    return dot, ssa, ssv


@triton.jit
def _write_rows(ROWS, rows, rmask, N, m, total, shift, s, rv, m_p, inv_t, STUDIOGAN: tl.constexpr):
    """From the negatives' (max, sum of exp) and StudioGAN's shift, and the positive similarity s, write to the
    (6, N) ROWS buffer: loss_i = logaddexp(pos_i, neg_i) - pos_i with pos_i = [s_i - m_p]_- / t and neg_i the
    negatives' log-sum-exp (-inf: none; StudioGAN: minus the shift), and for the backward rv_i (the proxy's inverse
    norm), s_i, the unshifted lse_i, w_i = dloss_i/dneg_i and dloss_i/ds_i (both per unit upstream gradient)."""
    lse = tl.where(total > 0.0, m + tl.log(tl.maximum(total, 1e-30)), float("-inf"))
    neg = lse
    if STUDIOGAN:
        neg = lse - tl.where(shift == float("-inf"), 0.0, shift)
    pos = tl.minimum(s - m_p, 0.0) * inv_t
    hi = tl.maximum(pos, neg)  # pos is finite
    tot = hi + tl.log(tl.exp(pos - hi) + tl.exp(neg - hi))
    w = tl.exp(neg - tot)  # d(tot - pos)/dneg = softmax weight of the negatives; 0 for rows without any
    # d(tot - pos)/dpos = (1 - w) - 1 = -w; through the clamp (which passes at its boundary, as torch's does)
    wpos = tl.where(s - m_p <= 0.0, -w * inv_t, 0.0)
    tl.store(ROWS + rows, tot - pos, mask=rmask)
    tl.store(ROWS + N + rows, rv, mask=rmask)
    tl.store(ROWS + 2 * N + rows, s, mask=rmask)
    tl.store(ROWS + 3 * N + rows, lse, mask=rmask)
    tl.store(ROWS + 4 * N + rows, w, mask=rmask)
    tl.store(ROWS + 5 * N + rows, wpos, mask=rmask)


@triton.jit
def _sum_squares(X, rows, rmask, D, BD: tl.constexpr):
    """|x_i|^2 of the rows of a (N, D) matrix, in fp32, over d in BD chunks."""
    ss = tl.zeros(rows.shape, tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        x = tl.load(X + rows[:, None] * D + ds[None, :], mask=rmask[:, None] & (ds[None, :] < D), other=0.0)
        x = x.to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    return ss


@triton.jit
def inv_norms_kernel(X, R, N, D, eps, BR: tl.constexpr, BD: tl.constexpr):
    """R = 1 / max(|x_i|, eps) for a block of BR rows of X ("matrix" mode: the columns' norms, before the scan)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < N
    tl.store(R + rows, _inv_norm(_sum_squares(X, rows, rmask, D, BD), eps), mask=rmask)


@triton.jit
def d2d_rows_kernel(S, A, V, RA, RB, LA, LB, ROWS, N, M, D, row_offset, m_p, m_n, inv_t, eps,
                    STUDIOGAN: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr):
    """"matrix" mode, a block of BR rows: their norms and positive term from A and V (RA for the backward), then
    their rows of the raw products S, normalized with RA and the columns' RB, into the negatives' log-sum-exp;
    writes ROWS as the combine kernel does."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < N
    dot, ssa, ssv = _row_dots(A, V, rows, rmask, D, BD)
    ra, rv = _inv_norm(ssa, eps), _inv_norm(ssv, eps)
    tl.store(RA + rows, ra, mask=rmask)
    la = tl.load(LA + rows, mask=rmask, other=-1)
    run_max = tl.full((BR,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BR,), tl.float32)
    shift = tl.full((BR,), float("-inf"), tl.float32)
    for j0 in range(0, M, BJ):
        cols = j0 + tl.arange(0, BJ)
        cmask = cols < M
        lb = tl.load(LB + cols, mask=cmask, other=-2)
        rb = tl.load(RB + cols, mask=cmask, other=0.0)
        raw = tl.load(S + rows[:, None] * M + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        x = (raw * ra[:, None] * rb[None, :] - m_n) * inv_t
        others, neg = _tile_masks(rows, cols, la, lb, M, row_offset)
        run_max, run_sum, shift = _lse_step(x, others, neg, run_max, run_sum, shift, STUDIOGAN)
    _write_rows(ROWS, rows, rmask, N, run_max, run_sum, shift, dot * ra * rv, rv, m_p, inv_t, STUDIOGAN)


@triton.autotune(configs=split_configs(torch.bfloat16) + (split_configs(torch.float32) if not interpreting() else []),
                 key=["N", "M", "D", "CS"], prune_configs_by={"early_config_prune": _keep_configs_of_the_dtype})
@triton.jit
def neg_lse_split_kernel(A, B, RA, RB, LA, LB, PMAX, PSUM, PSHIFT, N, M, D, CS, row_offset, m_n, inv_t, eps,
                         STUDIOGAN: tl.constexpr, PREC: tl.constexpr,
                         BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    """"fused" mode, program (i, s): rows block i against columns [s CS, (s + 1) CS): running max, sum of exp and
    StudioGAN's shift of the negatives' clamped logits, written to row s of the (splits, N) partial buffers. The
    inverse norms it normalizes with go to RA (split 0's programs) and RB (row block 0's programs) for the
    backward."""
    rows = tl.program_id(0) * BI + tl.arange(0, BI)
    split = tl.program_id(1)
    rmask = rows < N
    ra = _inv_norm(_sum_squares(A, rows, rmask, D, BK), eps)
    if split == 0:
        tl.store(RA + rows, ra, mask=rmask)
    la = tl.load(LA + rows, mask=rmask, other=-1)
    c_lo = split * CS
    c_hi = tl.minimum(c_lo + CS, M)
    run_max = tl.full((BI,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BI,), tl.float32)
    shift = tl.full((BI,), float("-inf"), tl.float32)
    for j0 in range(c_lo, c_hi, BJ):
        cols = j0 + tl.arange(0, BJ)
        cmask = cols < c_hi
        lb = tl.load(LB + cols, mask=cmask, other=-2)
        dots, _, ssb = dot_tile(A, B, rows, cols, N, M, D, BI, BJ, BK, PREC)
        rb = _inv_norm(ssb, eps)
        if tl.program_id(0) == 0:
            tl.store(RB + cols, rb, mask=cmask)
        x = (dots * ra[:, None] * rb[None, :] - m_n) * inv_t
        others, neg = _tile_masks(rows, cols, la, lb, c_hi, row_offset)
        run_max, run_sum, shift = _lse_step(x, others, neg, run_max, run_sum, shift, STUDIOGAN)
    out = split * N + rows
    tl.store(PMAX + out, run_max, mask=rmask)
    tl.store(PSUM + out, run_sum, mask=rmask)
    tl.store(PSHIFT + out, shift, mask=rmask)


@triton.jit
def d2d_combine_kernel(PMAX, PSUM, PSHIFT, A, V, RA, ROWS, N, S, D, m_p, inv_t, eps,
                       STUDIOGAN: tl.constexpr, BR: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    """"fused" mode, a block of rows: merge the splits' partial (max, sum, shift), compute the positive term from
    the rows and their proxies, and write ROWS (see _write_rows)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < N
    splits = tl.arange(0, BS)
    mask = (splits[:, None] < S) & rmask[None, :]
    offs = splits[:, None] * N + rows[None, :]
    pmax = tl.load(PMAX + offs, mask=mask, other=float("-inf"))
    psum = tl.load(PSUM + offs, mask=mask, other=0.0)
    m = tl.max(pmax, axis=0)
    base = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(psum * tl.exp(pmax - base[None, :]), axis=0)
    shift = tl.max(tl.load(PSHIFT + offs, mask=mask, other=float("-inf")), axis=0)
    dot, _, ssv = _row_dots(A, V, rows, rmask, D, BD)
    rv = _inv_norm(ssv, eps)
    s = dot * tl.load(RA + rows, mask=rmask, other=0.0) * rv
    _write_rows(ROWS, rows, rmask, N, m, total, shift, s, rv, m_p, inv_t, STUDIOGAN)


@triton.jit
def _bwd_tile(A, B, S, RA, RB, LA, LB, ROWS, G, rows, cols, N, M, D, row_offset, m_n, inv_t, inv_n,
              BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, FROM_S: tl.constexpr):
    """One (rows, cols) tile, its products read from S (FROM_S) or recomputed: (P = dLoss/dsim, sim, ra, rb), zero
    outside the matrix. The upstream gradient is read from G on the device (no host sync); P_ij = g/N w_i
    softmax_ij / t on live negatives."""
    rmask, cmask = rows < N, cols < M
    ra = tl.load(RA + rows, mask=rmask, other=0.0)
    rb = tl.load(RB + cols, mask=cmask, other=0.0)
    la = tl.load(LA + rows, mask=rmask, other=-1)
    lb = tl.load(LB + cols, mask=cmask, other=-2)
    lse = tl.load(ROWS + 3 * N + rows, mask=rmask, other=0.0)
    w = tl.load(ROWS + 4 * N + rows, mask=rmask, other=0.0) * (tl.load(G) * inv_n)  # 0 on padding rows
    if FROM_S:
        dots = tl.load(S + rows[:, None] * M + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    else:
        dots, _, _ = dot_tile(A, B, rows, cols, N, M, D, BI, BJ, BK, PREC)
    sim = dots * ra[:, None] * rb[None, :]
    x = (sim - m_n) * inv_t
    others, neg = _tile_masks(rows, cols, la, lb, M, row_offset)
    live = neg & (x >= 0.0)  # torch's clamp passes the gradient at the boundary too
    p = tl.where(live, tl.exp(x - lse[:, None]), 0.0)
    return w[:, None] * p * inv_t, sim, ra, rb


@triton.jit
def d2d_grad_matrix_kernel(A, B, S, RA, RB, LA, LB, ROWS, G, Q, CROW, CCOL, N, M, D, row_offset, m_n, inv_t,
                           inv_n, PREC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
                           FROM_S: tl.constexpr):
    """Program (i, j): the (BI, BJ) tile of Q = ra_i P_ij rb_j (so that Q B = ra (P B^), Q^T A = rb (P^T A^)), and
    the tile's row sums (into row j of CROW) and column sums (into row i of CCOL) of P * sim."""
    rows = tl.program_id(0) * BI + tl.arange(0, BI)
    cols = tl.program_id(1) * BJ + tl.arange(0, BJ)
    p, sim, ra, rb = _bwd_tile(A, B, S, RA, RB, LA, LB, ROWS, G, rows, cols, N, M, D, row_offset, m_n, inv_t,
                               inv_n, BI, BJ, BK, PREC, FROM_S)
    rmask, cmask = rows < N, cols < M
    q = p * ra[:, None] * rb[None, :]
    tl.store(Q + rows[:, None] * M + cols[None, :], q.to(Q.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
    tl.store(CROW + tl.program_id(1) * N + rows, tl.sum(p * sim, axis=1), mask=rmask)
    tl.store(CCOL + tl.program_id(0) * M + cols, tl.sum(p * sim, axis=0), mask=cmask)


@triton.jit
def _accumulate(ACC, idx, imask, q, X, xidx, xmask, D, keep, BD: tl.constexpr, PREC: tl.constexpr):
    """ACC[idx, :] = (ACC[idx, :] if keep else 0) + q @ X[xidx, :], over d in BD chunks; ACC's rows ``idx``
    belong to this program alone."""
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        x = tl.load(X + xidx[:, None] * D + ds[None, :], mask=xmask[:, None] & (ds[None, :] < D), other=0.0)
        acc_ptr = ACC + idx[:, None] * D + ds[None, :]
        # ACC was stored by this program's threads in one layout and is re-read in another: Triton orders global
        # memory between a program's threads only across a barrier (triton-lang/triton#10924)
        tl.debug_barrier()
        amask = imask[:, None] & (ds[None, :] < D)
        upd = tl.dot(q, x, input_precision=PREC)
        if keep:
            upd += tl.load(acc_ptr, mask=amask, other=0.0)
        tl.store(acc_ptr, upd, mask=amask)


@triton.jit
def d2d_stream_rows_kernel(A, B, RA, RB, LA, LB, ROWS, G, ACC, CROW, N, M, D, row_offset, m_n, inv_t, inv_n,
                           PREC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
                           BD: tl.constexpr):
    """Streaming backward, a block of rows: ACC = Q B accumulated in fp32 over column tiles, CROW = row sums of
    P * sim (what the matrix mode gets from its Q and torch.mm)."""
    rows = tl.program_id(0) * BI + tl.arange(0, BI)
    rmask = rows < N
    c = tl.zeros((BI,), tl.float32)
    for j0 in range(0, M, BJ):
        cols = j0 + tl.arange(0, BJ)
        p, sim, ra, rb = _bwd_tile(A, B, A, RA, RB, LA, LB, ROWS, G, rows, cols, N, M, D, row_offset, m_n,
                                   inv_t, inv_n, BI, BJ, BK, PREC, False)
        c += tl.sum(p * sim, axis=1)
        q = (p * ra[:, None] * rb[None, :]).to(B.dtype.element_ty)
        _accumulate(ACC, rows, rmask, q, B, cols, cols < M, D, j0 > 0, BD, PREC)
    tl.store(CROW + rows, c, mask=rmask)


@triton.jit
def d2d_stream_cols_kernel(A, B, RA, RB, LA, LB, ROWS, G, ACC, CCOL, N, M, D, row_offset, m_n, inv_t, inv_n,
                           PREC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
                           BD: tl.constexpr):
    """Streaming backward, a block of columns (the gathered negatives): the transpose of the rows kernel."""
    cols = tl.program_id(0) * BJ + tl.arange(0, BJ)
    cmask = cols < M
    c = tl.zeros((BJ,), tl.float32)
    for i0 in range(0, N, BI):
        rows = i0 + tl.arange(0, BI)
        p, sim, ra, rb = _bwd_tile(A, B, A, RA, RB, LA, LB, ROWS, G, rows, cols, N, M, D, row_offset, m_n,
                                   inv_t, inv_n, BI, BJ, BK, PREC, False)
        c += tl.sum(p * sim, axis=0)
        q = tl.trans(p * ra[:, None] * rb[None, :]).to(A.dtype.element_ty)
        _accumulate(ACC, cols, cmask, q, A, rows, rows < N, D, i0 > 0, BD, PREC)
    tl.store(CCOL + cols, c, mask=cmask)


@triton.jit
def _partial_sum(C, S, idx, n, imask, BS: tl.constexpr):
    """sum_s C[s, idx] over the S <= BS partial rows of a (S, n) buffer: one (BS, len(idx)) load and a fixed-order
    reduction (no atomics)."""
    s = tl.arange(0, BS)
    return tl.sum(tl.load(C + s[:, None] * n + idx[None, :], mask=(s[:, None] < S) & imask[None, :], other=0.0),
                  axis=0)


@triton.jit
def d2d_finish_kernel(X, OUT, N, D, ACC, R, C, SC, ACC2, R2, C2, SC2, V, ROWS, G, DV, inv_n,
                      TWO: tl.constexpr, POS: tl.constexpr, WANT_DV: tl.constexpr, BR: tl.constexpr,
                      BD: tl.constexpr, BS: tl.constexpr):
    """Program (i, k): rows block i, features block k of the gradient of one side (x = A or B):
        OUT = ACC - r^2 c x                        the normalization's chain rule, with c = sum of C's SC partials
            (+ ACC2 - r2^2 c2 x                    TWO: the columns are the rows themselves, both sides at once)
            (+ r gp (rv v - s r x)                 POS: the positive term, gp = g/N dloss/ds; and its proxy's
                                                   gradient DV = rv gp (r x - s rv v))"""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ds = tl.program_id(1) * BD + tl.arange(0, BD)
    rmask = rows < N
    mask = rmask[:, None] & (ds[None, :] < D)
    offs = rows[:, None] * D + ds[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + rows, mask=rmask, other=0.0)
    coef = r * r * _partial_sum(C, SC, rows, N, rmask, BS)
    out = tl.load(ACC + offs, mask=mask, other=0.0).to(tl.float32)
    if TWO:
        r2 = tl.load(R2 + rows, mask=rmask, other=0.0)
        out += tl.load(ACC2 + offs, mask=mask, other=0.0).to(tl.float32)
        out -= (r2 * r2 * _partial_sum(C2, SC2, rows, N, rmask, BS))[:, None] * x
    if POS:
        rv = tl.load(ROWS + N + rows, mask=rmask, other=0.0)
        s = tl.load(ROWS + 2 * N + rows, mask=rmask, other=0.0)
        gp = tl.load(ROWS + 5 * N + rows, mask=rmask, other=0.0) * (tl.load(G) * inv_n)
        v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
        coef += r * r * gp * s
        out += (r * gp * rv)[:, None] * v
        if WANT_DV:
            dv = (rv * gp * r)[:, None] * x - (rv * gp * s * rv)[:, None] * v
            tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)
    out -= coef[:, None] * x
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


def _finish(x: torch.Tensor, acc: torch.Tensor, r: torch.Tensor, c: torch.Tensor, two=None, pos=None) -> tuple:
    """Launch d2d_finish_kernel for one side; ``two`` = (acc2, r2, c2), ``pos`` = (v, rows, g, inv_n, want_dv).
    Returns (dx, dv or None)."""
    n, d = x.shape
    out = torch.empty_like(x)
    dv = torch.empty_like(pos[0]) if pos is not None and pos[4] else None
    tiles = row_tiles(x.device)
    acc2, r2, c2 = two if two is not None else (acc, r, c)
    v, rows, g, inv_n, _ = pos if pos is not None else (x, r, r, 0.0, False)
    launch(d2d_finish_kernel, (cdiv(n, tiles["BR"]), cdiv(d, tiles["BD"])),
           x, out, n, d, acc, r, c, c.shape[0], acc2, r2, c2, c2.shape[0], v, rows, g, out if dv is None else dv,
           inv_n, TWO=two is not None, POS=pos is not None, WANT_DV=dv is not None,
           BS=max(next_power_of_2(max(c.shape[0], c2.shape[0])), 2), **tiles)
    return out, dv


class D2DCE(torch.autograd.Function):
    """The mean D2D-CE of kernels.d2d_ce (see similarity.py for the arguments) on the Triton kernels.

    ``cols`` / ``col_labels``: the columns (gathered negatives), or None for the rows themselves. ``split_cols``:
    the "fused" forward's column split width (0: chosen for the GPU; a large value: one split, the 1-D grid);
    ``mode``: one of MODES (see the module docstring)."""

    @staticmethod
    def forward(ctx, embed: torch.Tensor, proxy: torch.Tensor, labels: torch.Tensor, cols, col_labels,
                row_offset: int, m_p: float, m_n: float, t: float, studiogan: bool, split_cols: int = 0,
                mode: str = "auto") -> torch.Tensor:
        a, v, la = embed.contiguous(), proxy.contiguous(), labels.contiguous()
        same = cols is None
        b, lb = (a, la) if same else (cols.contiguous(), col_labels.contiguous())
        n, m, d = a.shape[0], b.shape[0], a.shape[1]
        if max(n, m) * d >= 2 ** 31:  # the kernels index with 32-bit offsets
            raise ValueError(f"d2d_ce(backend='triton'): {max(n, m)} x {d} elements exceed 32-bit offsets; split "
                             f"the batch or use backend='torch'")
        if mode not in MODES:
            raise ValueError(f"d2d_ce: triton_mode={mode!r} is not one of {MODES}")
        if mode == "auto":
            mode = "matrix" if n * m <= MATRIX_MAX else "stream"
        f32 = dict(device=a.device, dtype=torch.float32)
        ra, rb = torch.empty(n, **f32), torch.empty(m, **f32)  # two buffers even for b is a: one writer each
        rows = torch.empty(6, n, **f32)
        prec = precision(a.dtype)
        if mode == "matrix":
            raw = raw_products(a, b)
            tiles = scan_tiles(a.device)
            launch(inv_norms_kernel, (cdiv(m, tiles["BR"]),), b, rb, m, d, NORM_EPS, BR=tiles["BR"],
                   BD=tiles["BD"])
            launch(d2d_rows_kernel, (cdiv(n, tiles["BR"]),),
                   raw, a, v, ra, rb, la, lb, rows, n, m, d, row_offset, m_p, m_n, 1.0 / t, NORM_EPS,
                   STUDIOGAN=studiogan, **tiles)
        else:
            raw = None
            cs = split_cols or column_splits(n, m, a.device)
            splits = cdiv(m, cs)
            partial = torch.empty(3, splits, n, **f32)
            neg_lse_split_kernel[lambda meta: (cdiv(n, meta["BI"]), splits)](
                a, b, ra, rb, la, lb, partial[0], partial[1], partial[2], n, m, d, cs, row_offset, m_n, 1.0 / t,
                NORM_EPS, STUDIOGAN=studiogan, PREC=prec)
            tiles = combine_tiles(a.device)
            launch(d2d_combine_kernel, (cdiv(n, tiles["BR"]),),
                   partial[0], partial[1], partial[2], a, v, ra, rows, n, splits, d, m_p, 1.0 / t, NORM_EPS,
                   STUDIOGAN=studiogan, BS=max(next_power_of_2(splits), 2), **tiles)
        ctx.save_for_backward(a, v, b, la, lb, ra, rb, rows, raw)
        ctx.same = same
        ctx.consts = (row_offset, m_n, 1.0 / t, prec)
        ctx.mode = mode
        return rows[0].mean()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, v, b, la, lb, ra, rb, rows, raw = ctx.saved_tensors
        row_offset, m_n, inv_t, prec = ctx.consts
        g = g.float()  # a 0-d tensor, read by the kernels on the device
        n, m, d = a.shape[0], b.shape[0], a.shape[1]
        inv_n = 1.0 / n
        need_a, need_v, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        per_row = (ra, rb, la, lb, rows, g)
        scal = (n, m, d, row_offset, m_n, inv_t, inv_n)
        if ctx.mode != "stream":
            if raw is not None:  # "matrix": Q from the forward's products
                bl = from_s_tiles(n, a.device)
            else:
                bl = gpu_tiles(a.dtype, n) if a.is_cuda and not interpreting() else dict(BI=32, BJ=32, BK=32,
                                                                                        num_warps=4)
            grid = (cdiv(n, bl["BI"]), cdiv(m, bl["BJ"]))
            # Q in the inputs' dtype for bf16 (bf16 products, fp32 accumulation in cuBLAS); fp32 otherwise (fp16's
            # range could overflow with large inverse norms)
            mm_dtype = a.dtype if a.dtype == torch.bfloat16 else torch.float32
            q = torch.empty(n, m, device=a.device, dtype=mm_dtype)
            crow = torch.empty(grid[1], n, device=a.device, dtype=torch.float32)
            ccol = torch.empty(grid[0], m, device=a.device, dtype=torch.float32)
            launch(d2d_grad_matrix_kernel, grid, a, b, a if raw is None else raw, *per_row, q, crow, ccol, *scal,
                   PREC=prec, BI=bl["BI"], BJ=bl["BJ"], BK=bl["BK"], num_warps=bl["num_warps"],
                   FROM_S=raw is not None)
            with autocast_off(a.device.type):  # Q's dtype, whatever the caller's context
                bm, am = (b, a) if a.dtype == b.dtype == mm_dtype else (b.to(mm_dtype), a.to(mm_dtype))
                acc_a = torch.mm(q, bm) if need_a else None
                acc_b = torch.mm(q.t(), am) if need_b or (ctx.same and need_a) else None
        else:
            bl = stream_tiles(a.dtype) if a.is_cuda and not interpreting() else dict(BI=32, BJ=32, BK=32, BD=32,
                                                                                       num_warps=4)
            acc_a = acc_b = None
            crow = torch.empty(1, n, device=a.device, dtype=torch.float32)
            ccol = torch.empty(1, m, device=a.device, dtype=torch.float32)
            if need_a or need_v:
                acc_a = torch.empty(n, d, device=a.device, dtype=torch.float32)
                launch(d2d_stream_rows_kernel, (cdiv(n, bl["BI"]),), a, b, *per_row, acc_a, crow, *scal,
                       PREC=prec, **bl)
            if need_b or (ctx.same and need_a):
                acc_b = torch.empty(m, d, device=a.device, dtype=torch.float32)
                launch(d2d_stream_cols_kernel, (cdiv(m, bl["BJ"]),), a, b, *per_row, acc_b, ccol, *scal,
                       PREC=prec, **bl)
        da = dv = db = None
        if need_a or need_v:
            if acc_a is None:  # only the proxy's gradient is wanted: the rows' terms are computed and dropped
                acc_a = torch.zeros(n, d, device=a.device, dtype=torch.float32)
            two = (acc_b, rb, ccol) if ctx.same and need_a else None
            da, dv = _finish(a, acc_a, ra, crow, two=two, pos=(v, rows, g, inv_n, need_v))
        if need_b and not ctx.same:
            db, _ = _finish(b, acc_b, rb, ccol)
        return (da if need_a else None), dv, None, db, None, None, None, None, None, None, None, None
