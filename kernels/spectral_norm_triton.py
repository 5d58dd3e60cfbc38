"""Triton power iteration for a whole list of weight matrices: two launches per iteration, one for the backward;
and the whole spectral normalization W / sigma of the list in one more launch forward and two backward.

Launch 1 tiles every matrix by columns and, for tall matrices (BigGAN-128's G begins with a 24576 x 20 linear
layer), by chunks of rows: v_raw = W^T u, each program summing over its chunk's rows; a matrix of several chunks has
its partials summed by its last program. Launch 2 tiles by rows and, for wide matrices (BigGAN-128's D has 1536 x
13824), by chunks of columns: partial W v_raw into a (chunks, rows) buffer; the last program to finish a matrix
sums the chunks, normalizes u and v and writes sigma = |W v|, which equals u^T W v. "Last program": an integer
atomic counter per matrix, acq_rel at GPU scope; the partials are summed in a fixed order, so the result is
deterministic and no float atomics are used. Tiles are ordered so that the programs that end last start first (see
Plan). Weights are read through a table of data pointers, so nothing is packed or copied; the table is cached
while the parameters stay where they are (they do across optimizer steps), so a step adds no host-to-device copy.

Vector accesses: where every weight pointer is 16-byte aligned (checked on the host when the table is built:
``PTR_ALIGNED``) and a matrix's row length is a multiple of 4, its rows are loaded 4 elements at a time (128-bit for
fp32); the flat W / sigma and gradient buffers place each matrix at a multiple of 4 elements for the same reason.
The hints are written so that Triton's alignment analysis can use them (see ``_span`` and ``_at``): the first
version's hints were dropped by the compiler and every load was scalar, which ``kernels.compile_check`` now
catches (an aligned SN build without vector accesses fails).

``fused_normalize`` adds W / sigma for every matrix, written into one flat buffer in the dtype the layers compute in
(bf16 under autocast: the cast autocast would make per layer and per forward is folded into the write), and its
backward dW = G / sigma - <G, W> / sigma^2 u v^T: per-tile partial sums of <G, W> in one launch, then one launch that
sums each matrix's partials in a fixed order and writes dW; both read each layer's incoming gradient where it is,
through a pointer table like the weights'. Against torch's per-layer division, its cast and their backward, that is
3 + 2 launches for a whole network instead of ~6 per layer.

HPC_GAN_KERNEL_DEBUG=1 fills sigma with NaN before each launch and checks afterwards (a host sync) that every
matrix's last program ran.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from kernels.dispatch import interpreting, tl_dtype
from kernels.launch import cdiv, next_power_of_2


class Tiles(NamedTuple):
    """How the kernels tile: rows and columns per tile, columns per u-pass chunk (a multiple of bc), the launches'
    warps and pipeline stages, and rows per v-pass chunk (a multiple of br). The GPU default has run on an H100 and
    an H200, where the power-iteration passes read the weights at ~1.1 TB/s, a quarter of the copy bandwidth:
    ``kernels.bench.bench_sn_tiles`` (the check pack's sn stage) times others at BigGAN-128's shapes, to choose
    from on the next GPU run."""
    br: int
    bc: int
    ch: int
    warps: int = 4
    stages: int = 3
    rch: int = 2048

    @property
    def fold(self) -> int:
        """sn_v_kernel's accumulator rows: the warps along a tile's rows (rows r and r + fold are one thread's)."""
        return min(self.br, self.warps)


GPU_TILES = Tiles(32, 128, 4096)
INTERPRETER_TILES = Tiles(32, 32, 64, rch=64)  # small tiles: the interpreter's cost grows with the tile


def default_tiles(device: torch.device) -> Tiles:
    return INTERPRETER_TILES if device.type != "cuda" or interpreting() else GPU_TILES


def finish_block(device: torch.device) -> int:
    """Elements per trip of the u pass's finishing work (the last program of each matrix sums the chunks, takes the
    norms and scales u and v). It runs serially, one memory round trip per trip: in tiles' widths (128 columns,
    32 rows), BigGAN-128's 1536 x 13824 matrices took ~500 trips after their last tile, and its 24576 x 20 linear
    layer 2,304 (~0.25 us each, from L2: the u pass's 0.589 ms on the H200)."""
    return 64 if device.type != "cuda" or interpreting() else 1024


@triton.jit
def _span(c0, BC: tl.constexpr):
    """Columns c0 .. c0 + BC - 1 of a tile, c0 a multiple of BC (itself a multiple of 4): said to the compiler
    where the range is made (a hint on a value handed to a function is dropped)."""
    return tl.max_contiguous(tl.multiple_of(c0 + tl.arange(0, BC), 4), 4)


@triton.jit
def _at(base, rs, cs, n_cols, ALIGNED: tl.constexpr):
    """Pointers to elements (rs, cs) of a row-major matrix with rows of n_cols at ``base``. ALIGNED (n_cols % 4
    == 0, ``base`` 16-byte aligned for fp32, 8 for bf16): 4-wide vector loads and stores. Triton's alignment
    analysis cannot see that a runtime row length is a multiple of 4 (``multiple_of`` on a scalar argument is
    dropped), so it is written as (n // 4) * 4."""
    if ALIGNED:
        n_cols = (n_cols // 4) * 4
    return base + rs[:, None] * n_cols + cs[None, :]


@triton.jit
def _inside(rs, cs, n_rows, col_end, ALIGNED: tl.constexpr):
    """Mask of the tile's elements in rows < n_rows and columns < col_end; ALIGNED: col_end % 4 == 0 (the mask
    is then constant over each 4-wide vector, which vector accesses need)."""
    if ALIGNED:
        col_end = (col_end // 4) * 4
    return (rs[:, None] < n_rows) & (cs[None, :] < col_end)


@triton.jit
def _load_at(base, rs, cs, n_rows, n_cols, col_end, ALIGNED: tl.constexpr):
    return tl.load(_at(base, rs, cs, n_cols, ALIGNED), mask=_inside(rs, cs, n_rows, col_end, ALIGNED), other=0.0)


@triton.jit
def _store_at(base, x, rs, cs, n_rows, n_cols, ALIGNED: tl.constexpr):
    """x into the tile (rs, cs) of a (n_rows, n_cols) matrix at ``base``, in base's dtype."""
    tl.store(_at(base, rs, cs, n_cols, ALIGNED), x.to(base.dtype.element_ty), mask=_inside(rs, cs, n_rows, n_cols,
                                                                                          ALIGNED))


@triton.jit
def _row_vector(base, rs, cs, n_rows, col_end):
    """base[cs] for every row of the tile (rs, cs), loaded in the tile's own layout: each row reads the same
    elements (from L1 after the first). A (BC,) load gets a layout of its own, and broadcasting it over the tile
    exchanges it through shared memory with a barrier every trip (the TTGIR of sn_u, sn_grad and
    sn_normalize_grad showed it), which keeps the next tile's loads from being issued early. It costs a tile of
    registers."""
    return tl.load(base + cs[None, :] + 0 * rs[:, None], mask=(rs[:, None] < n_rows) & (cs[None, :] < col_end),
                   other=0.0)


@triton.jit
def _from_table(PTRS, m, DTYPE: tl.constexpr, PTR_ALIGNED: tl.constexpr):
    """Matrix m (weights, or their incoming gradients), from a table of data pointers; PTR_ALIGNED: the host
    checked that every entry is 16-byte aligned (a pointer read from memory is otherwise assumed unaligned, and
    every load scalar)."""
    w = tl.load(PTRS + m).to(tl.pointer_type(DTYPE))
    if PTR_ALIGNED:
        w = tl.multiple_of(w, 16)
    return w


@triton.jit
def _flat(base, WOFF, m):
    """Matrix m's place in a flat buffer: offsets are multiples of 4 elements (Plan pads them)."""
    return base + (tl.load(WOFF + m) // 4) * 4


@triton.jit
def _tile(TILE_MAT, TILE_START, ROWS, COLS):
    """(matrix, first row or column, rows, columns) of this program's tile."""
    pid = tl.program_id(0)
    m = tl.load(TILE_MAT + pid)
    return m, tl.load(TILE_START + pid), tl.load(ROWS + m), tl.load(COLS + m)


@triton.jit
def _last_to_arrive(COUNT, NTILES, m):
    """Counts this program's arrival at matrix m, after its stores (the barrier orders them before it), and says
    whether it is the matrix's last tile: an integer counter, acq_rel at GPU scope. The last resets it when done."""
    tl.debug_barrier()
    arrived = tl.atomic_add(COUNT + m, 1, sem="acq_rel", scope="gpu")
    return arrived == tl.load(NTILES + m) - 1


@triton.jit
def _sum_chunks(part, stride, n_chunks, dst, n, scale, FB: tl.constexpr):
    """dst[i] = scale * sum_k part[k * stride + i] for i < n, FB at a time; k in a fixed order (bitwise
    reproducible), loads .cg (the partials were written by other programs)."""
    for q0 in range(0, n, FB):
        qs = q0 + tl.arange(0, FB)
        total = tl.zeros((FB,), tl.float32)
        for k in range(0, n_chunks):
            total += tl.load(part + k * stride + qs, mask=qs < n, other=0.0, cache_modifier=".cg")
        tl.store(dst + qs, total * scale, mask=qs < n)


@triton.jit
def _sum_squares(base, n, BLOCK: tl.constexpr):
    ss = tl.zeros((BLOCK,), tl.float32)
    for i0 in range(0, n, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        x = tl.load(base + idx, mask=idx < n, other=0.0, cache_modifier=".cg")  # .cg: written by other programs
        ss += x * x
    return tl.sum(ss, axis=0)


@triton.jit
def _scale(base, n, factor, BLOCK: tl.constexpr):
    for i0 in range(0, n, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        x = tl.load(base + idx, mask=idx < n, other=0.0, cache_modifier=".cg")
        tl.store(base + idx, x * factor, mask=idx < n)


# The kernels below (but sn_u_kernel and sn_scale_kernel) decide their rows' alignment (n_cols % 4 == 0: vector
# accesses) once, outside their loop over the tile: a branch per trip for each load and store made one loop body of
# both forms, which cost registers (the normalization's backward on sm_90 under Triton 3.6: 233, 166 once hoisted)
# and so programs per SM.

@triton.jit
def sn_v_kernel(W_PTRS, U_PTRS, U_FLAT, V_OUT, V_PART, TILE_MAT, TILE_START, TILE_CHUNK, NTILES, COUNT, ROWS, COLS,
                UOFF, VOFF, VPOFF, NCHUNK, U_FROM_FLAT: tl.constexpr, W_DTYPE: tl.constexpr,
                PTR_ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, FOLD: tl.constexpr,
                RCH: tl.constexpr, FB: tl.constexpr):
    """Tile (matrix, column tile, row chunk): v_raw = W^T u over the chunk's RCH rows. A matrix of one chunk
    writes v_raw; a taller one writes partials into V_PART[VPOFF + chunk * cols], and its last tile (an arrival
    counter, as in sn_u_kernel) sums them in a fixed order, FB columns at a time. Without chunks, BigGAN-128's
    first linear layer (24576 x 20) was one program walking 768 row tiles, one memory round trip each: the v pass
    took 0.58 ms on the H200 against a 0.15 ms floor, ~0.75 us per trip."""
    pid = tl.program_id(0)
    m, c0, n_rows, n_cols = _tile(TILE_MAT, TILE_START, ROWS, COLS)
    chunk = tl.load(TILE_CHUNK + pid)
    w = _from_table(W_PTRS, m, W_DTYPE, PTR_ALIGNED)
    if U_FROM_FLAT:
        u_base = U_FLAT + tl.load(UOFF + m)
    else:
        u_base = tl.load(U_PTRS + m).to(tl.pointer_type(tl.float32))
    cs = _span(c0, BC)
    r_lo = chunk * RCH
    r_hi = tl.minimum(r_lo + RCH, n_rows)
    if n_cols % 4 == 0:
        v = _v_rows(w, u_base, cs, r_lo, r_hi, n_cols, True, BR, BC, FOLD)
    else:
        v = _v_rows(w, u_base, cs, r_lo, r_hi, n_cols, False, BR, BC, FOLD)
    vb = V_OUT + tl.load(VOFF + m)
    n_chunks = tl.load(NCHUNK + m)
    if n_chunks == 1:
        tl.store(vb + cs, v, mask=cs < n_cols)
    else:
        part = V_PART + tl.load(VPOFF + m)
        tl.store(part + chunk * n_cols + cs, v, mask=cs < n_cols)
        if _last_to_arrive(COUNT, NTILES, m):  # last tile of this matrix: sum the chunks
            _sum_chunks(part, n_cols, n_chunks, vb, n_cols, 1.0, FB)
            tl.atomic_xchg(COUNT + m, 0, sem="relaxed", scope="gpu")  # ready for the next launch


@triton.jit
def _v_rows(w, u_base, cs, r_lo, r_hi, n_cols, ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
            FOLD: tl.constexpr):
    # an accumulator reduced across rows once after the loop: a reduction across rows every trip costs a
    # shared-memory exchange and a barrier per tile, which serializes the loads (H100: 4.2x the bandwidth floor).
    # Each trip's products fold into FOLD rows (the warps along rows: rows r and r + FOLD are one thread's), a
    # thread's own adds, so the accumulator takes FOLD rows of registers, not BR: more programs per SM
    acc = tl.zeros((FOLD, BC), tl.float32)
    for r0 in range(r_lo, r_hi, BR):
        rs = r0 + tl.arange(0, BR)
        wt = _load_at(w, rs, cs, r_hi, n_cols, n_cols, ALIGNED)
        u = tl.load(u_base + rs, mask=rs < r_hi, other=0.0)
        acc += tl.sum(tl.reshape(wt.to(tl.float32) * u[:, None], (BR // FOLD, FOLD, BC)), axis=0)
    return tl.sum(acc, axis=0)


@triton.jit
def sn_u_kernel(W_PTRS, U_OUT, U_PART, V_OUT, SIGMA, TILE_MAT, TILE_START, TILE_CHUNK, NTILES, COUNT, ROWS, COLS,
                UOFF, VOFF, NCHUNK, n_u, eps, W_DTYPE: tl.constexpr, PTR_ALIGNED: tl.constexpr, BR: tl.constexpr,
                BC: tl.constexpr, CH: tl.constexpr, FB: tl.constexpr):
    """Tile (matrix, row block, column chunk): partial (W v_raw)[rows] over the chunk's CH columns into
    U_PART[chunk, rows]; the matrix's last tile sums the chunks, normalizes u and v and writes sigma, FB elements
    at a time (see finish_block)."""
    pid = tl.program_id(0)
    m, r0, n_rows, n_cols = _tile(TILE_MAT, TILE_START, ROWS, COLS)
    chunk = tl.load(TILE_CHUNK + pid)
    w = _from_table(W_PTRS, m, W_DTYPE, PTR_ALIGNED)
    vb = V_OUT + tl.load(VOFF + m)
    ub = U_OUT + tl.load(UOFF + m)
    rs = r0 + tl.arange(0, BR)
    c_lo = chunk * CH
    c_hi = tl.minimum(c_lo + CH, n_cols)
    part = _u_cols(w, vb, rs, n_rows, n_cols, c_lo, c_hi, PTR_ALIGNED, BR, BC)
    u_part = U_PART + tl.load(UOFF + m)
    tl.store(u_part + chunk * n_u + rs, part, mask=rs < n_rows)
    if _last_to_arrive(COUNT, NTILES, m):  # last tile of this matrix: sum the chunks, normalize u, v; sigma
        inv_v = 1.0 / tl.maximum(tl.sqrt(_sum_squares(vb, n_cols, FB)), eps)
        _sum_chunks(u_part, n_u, tl.load(NCHUNK + m), ub, n_rows, inv_v, FB)
        tl.debug_barrier()
        sq = _sum_squares(ub, n_rows, FB)
        norm_u = tl.maximum(tl.sqrt(sq), eps)
        tl.store(SIGMA + m, sq / norm_u)
        _scale(ub, n_rows, 1.0 / norm_u, FB)
        _scale(vb, n_cols, inv_v, FB)
        tl.atomic_xchg(COUNT + m, 0, sem="relaxed", scope="gpu")  # ready for the next launch (a kernel boundary)


@triton.jit
def _u_cols(w, vb, rs, n_rows, n_cols, c_lo, c_hi, PTR_ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    # reduced once after the loop, as in _v_rows. v is loaded in the tile's layout (_row_vector) and each trip
    # folds the 4 columns a thread loads at once into one: a quarter of the registers. The build for unaligned
    # pointers (rare) keeps the plain forms: they do not spill on sm_80. The rows' alignment is decided per trip
    # here: hoisted, the two loops took more registers (116 against 96 on sm_90 under Triton 3.6)
    if PTR_ALIGNED:
        acc = tl.zeros((BR, BC // 4), tl.float32)
    else:
        acc = tl.zeros((BR, BC), tl.float32)
    for c0 in range(c_lo, c_hi, BC):
        cs = _span(c0, BC)
        if n_cols % 4 == 0:
            wt = _load_at(w, rs, cs, n_rows, n_cols, c_hi, True)
        else:
            wt = _load_at(w, rs, cs, n_rows, n_cols, c_hi, False)
        wt = wt.to(tl.float32)
        if PTR_ALIGNED:
            acc += tl.sum(tl.reshape(wt * _row_vector(vb, rs, cs, n_rows, c_hi), (BR, BC // 4, 4)), axis=2)
        else:
            acc += wt * tl.load(vb + cs, mask=cs < c_hi, other=0.0)[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def sn_grad_kernel(GRAD, GSIG, U_OUT, V_OUT, TILE_MAT, TILE_START, ROWS, COLS, UOFF, VOFF, WOFF,
                    BR: tl.constexpr, BC: tl.constexpr):
    """d sigma_m / d W_m = u_m v_m^T, scaled by the incoming gradient, into one flat buffer for all matrices."""
    m, r0, n_rows, n_cols = _tile(TILE_MAT, TILE_START, ROWS, COLS)
    rs = r0 + tl.arange(0, BR)
    u = tl.load(U_OUT + tl.load(UOFF + m) + rs, mask=rs < n_rows, other=0.0) * tl.load(GSIG + m)
    vb = V_OUT + tl.load(VOFF + m)
    gb = _flat(GRAD, WOFF, m)
    if n_cols % 4 == 0:
        _grad_cols(gb, u, vb, rs, n_rows, n_cols, True, BC)
    else:
        _grad_cols(gb, u, vb, rs, n_rows, n_cols, False, BC)


@triton.jit
def _grad_cols(gb, u, vb, rs, n_rows, n_cols, ALIGNED: tl.constexpr, BC: tl.constexpr):
    for c0 in range(0, n_cols, BC):
        cs = _span(c0, BC)
        _store_at(gb, u[:, None] * _row_vector(vb, rs, cs, n_rows, n_cols), rs, cs, n_rows, n_cols, ALIGNED)


@triton.jit
def sn_scale_kernel(W_PTRS, OUT, SIGMA, TILE_MAT, TILE_START, ROWS, COLS, WOFF, W_DTYPE: tl.constexpr,
                    PTR_ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """W_m / sigma_m for one (matrix, row block) tile, into the flat OUT buffer (OUT's dtype)."""
    m, r0, n_rows, n_cols = _tile(TILE_MAT, TILE_START, ROWS, COLS)
    w = _from_table(W_PTRS, m, W_DTYPE, PTR_ALIGNED)
    inv = 1.0 / tl.load(SIGMA + m)
    ob = _flat(OUT, WOFF, m)
    rs = r0 + tl.arange(0, BR)
    for c0 in range(0, n_cols, BC):  # the branch inside: hoisted, bf16 -> bf16 spilled on sm_90 under Triton 3.9
        cs = _span(c0, BC)
        if n_cols % 4 == 0:
            _scale_tile(w, ob, inv, rs, cs, n_rows, n_cols, True)
        else:
            _scale_tile(w, ob, inv, rs, cs, n_rows, n_cols, False)


@triton.jit
def _scale_tile(w, ob, inv, rs, cs, n_rows, n_cols, ALIGNED: tl.constexpr):
    wt = _load_at(w, rs, cs, n_rows, n_cols, n_cols, ALIGNED)
    _store_at(ob, wt.to(tl.float32) * inv, rs, cs, n_rows, n_cols, ALIGNED)


@triton.jit
def sn_dot_kernel(W_PTRS, G_PTRS, PART, TILE_MAT, TILE_START, ROWS, COLS, W_DTYPE: tl.constexpr,
                  G_DTYPE: tl.constexpr, PTR_ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """<G, W> over one (matrix, row block) tile, into PART[tile] (summed per matrix by sn_normalize_grad_kernel)."""
    m, r0, n_rows, n_cols = _tile(TILE_MAT, TILE_START, ROWS, COLS)
    w = _from_table(W_PTRS, m, W_DTYPE, PTR_ALIGNED)
    gb = _from_table(G_PTRS, m, G_DTYPE, PTR_ALIGNED)
    rs = r0 + tl.arange(0, BR)
    if n_cols % 4 == 0:
        total = _dot_cols(w, gb, rs, n_rows, n_cols, True, BR, BC)
    else:
        total = _dot_cols(w, gb, rs, n_rows, n_cols, False, BR, BC)
    tl.store(PART + tl.program_id(0), total)


@triton.jit
def _dot_cols(w, gb, rs, n_rows, n_cols, ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    acc = tl.zeros((BR, BC), tl.float32)
    for c0 in range(0, n_cols, BC):
        cs = _span(c0, BC)
        wt = _load_at(w, rs, cs, n_rows, n_cols, n_cols, ALIGNED)
        gt = _load_at(gb, rs, cs, n_rows, n_cols, n_cols, ALIGNED)
        acc += wt.to(tl.float32) * gt.to(tl.float32)
    return tl.sum(tl.sum(acc, axis=1), axis=0)


@triton.jit
def sn_normalize_grad_kernel(GRAD, G_PTRS, PART, SIGMA, U_OUT, V_OUT, TILE_MAT, TILE_START, ROWS, COLS, UOFF, VOFF,
                             WOFF, FIRST, NTILES, G_DTYPE: tl.constexpr, PTR_ALIGNED: tl.constexpr, BR: tl.constexpr,
                             BC: tl.constexpr, BT: tl.constexpr):
    """dW = G / sigma - <G, W> / sigma^2 u v^T for one (matrix, row block) tile; <G, W> is the sum of the matrix's
    tile partials, in a fixed order (the same in every program of the matrix: bitwise reproducible)."""
    m, r0, n_rows, n_cols = _tile(TILE_MAT, TILE_START, ROWS, COLS)
    first, count = tl.load(FIRST + m), tl.load(NTILES + m)
    dot = tl.zeros((BT,), tl.float32)
    for t0 in range(0, count, BT):
        ts = t0 + tl.arange(0, BT)
        dot += tl.load(PART + first + ts, mask=ts < count, other=0.0)
    inv = 1.0 / tl.load(SIGMA + m)
    coef = tl.sum(dot, axis=0) * inv * inv
    rs = r0 + tl.arange(0, BR)
    u = tl.load(U_OUT + tl.load(UOFF + m) + rs, mask=rs < n_rows, other=0.0) * coef
    vb = V_OUT + tl.load(VOFF + m)
    gb, db = _from_table(G_PTRS, m, G_DTYPE, PTR_ALIGNED), _flat(GRAD, WOFF, m)
    if n_cols % 4 == 0:
        _normalize_grad_cols(gb, db, vb, u, inv, rs, n_rows, n_cols, True, BC)
    else:
        _normalize_grad_cols(gb, db, vb, u, inv, rs, n_rows, n_cols, False, BC)


@triton.jit
def _normalize_grad_cols(gb, db, vb, u, inv, rs, n_rows, n_cols, ALIGNED: tl.constexpr, BC: tl.constexpr):
    for c0 in range(0, n_cols, BC):
        cs = _span(c0, BC)
        g = _load_at(gb, rs, cs, n_rows, n_cols, n_cols, ALIGNED).to(tl.float32)
        _store_at(db, g * inv - u[:, None] * _row_vector(vb, rs, cs, n_rows, n_cols), rs, cs, n_rows, n_cols,
                  ALIGNED)


class Plan:
    """Tile tables and offsets for one list of weight shapes on one device (built once, reused every step). A
    weight of shape (out, *rest) is the (out, prod(rest)) matrix of ``shapes``; ``views`` gives it back in its own
    shape."""

    def __init__(self, weight_shapes: Tuple[Tuple[int, ...], ...], device: torch.device, tiles: Tiles) -> None:
        if tiles.ch % tiles.bc or tiles.bc % 4 or tiles.br % tiles.fold or tiles.rch % tiles.br:
            raise ValueError(f"SN tiles {tiles}: ch must be a multiple of bc, bc of 4, br of warps (or less), and "
                             f"rch of br")
        shapes = tuple((s[0], math.prod(s[1:])) for s in weight_shapes)
        self.shapes = shapes
        self.br, self.bc, self.ch, self.rch = tiles.br, tiles.bc, tiles.ch, tiles.rch
        self.fb = finish_block(device)
        self.launch = dict(num_warps=tiles.warps, num_stages=tiles.stages)
        self.fold = tiles.fold
        rows = [r for r, _ in shapes]
        cols = [c for _, c in shapes]
        off = lambda xs: [sum(xs[:i]) for i in range(len(xs))]  # noqa: E731
        self.n_u, self.n_v = sum(rows), sum(cols)
        self.u_sizes, self.v_sizes = rows, cols
        self.u_off, self.v_off = off(rows), off(cols)
        # each matrix's place in the flat W / sigma and gradient buffers starts at a multiple of 8 elements: its
        # rows are 16-byte aligned (fp32) where their length is a multiple of 4 (vector loads and stores), and each
        # view starts 16-byte aligned in bf16 too (what inductor wants of a static CUDA-graph input)
        sizes = [r * c for r, c in shapes]
        self.pads = [-n % 8 for n in sizes]
        self.w_off = off([n + p for n, p in zip(sizes, self.pads)])
        self.n_w = self.w_off[-1] + sizes[-1] + self.pads[-1]
        chunks = [cdiv(c, self.ch) for c in cols]
        self.max_chunks = max(chunks)
        v_chunks = [cdiv(r, self.rch) for r in rows]
        # partial v_raw of the matrices split into row chunks: v_chunks x cols each
        self.vp_off = off([k * c if k > 1 else 0 for k, c in zip(v_chunks, cols)])
        self.n_vp = max(1, sum(k * c for k, c in zip(v_chunks, cols) if k > 1))
        # Programs are dispatched about in launch order, so those that end late go first. v pass: the longest
        # programs (row tiles walked), then the largest matrices. u pass: the matrices whose last program has
        # the longest finishing work after its tile (chunks summed and u scaled over all rows, v over all
        # columns, FB elements a trip: BigGAN-128's 24576 x 20 linear layer has the longest), then the largest
        size = lambda m: rows[m] * cols[m]  # noqa: E731
        by_v_trips = sorted(range(len(shapes)), key=lambda m: (-cdiv(min(rows[m], self.rch), self.br), -size(m)))
        by_finish = sorted(range(len(shapes)),
                           key=lambda m: (-(cdiv(rows[m], self.fb) * (chunks[m] + 2) + 2 * cdiv(cols[m], self.fb)),
                                          -size(m)))
        largest_first = sorted(range(len(shapes)), key=lambda m: -size(m))
        v_tiles = [(m, c0, k) for m in by_v_trips for k in range(v_chunks[m]) for c0 in range(0, cols[m], self.bc)]
        u_tiles = [(m, r0, k) for m in by_finish for r0 in range(0, rows[m], self.br) for k in range(chunks[m])]
        grad_tiles = [(m, r0) for m in largest_first for r0 in range(0, rows[m], self.br)]
        i64 = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
        self.v_mat, self.v_start = i64([t[0] for t in v_tiles]), i64([t[1] for t in v_tiles])
        self.v_chunk = i64([t[2] for t in v_tiles])
        self.v_nchunk, self.vpoff = i64(v_chunks), i64(self.vp_off)
        self.v_ntiles = i64([k * cdiv(c, self.bc) for k, c in zip(v_chunks, cols)])
        self.v_count = torch.zeros(len(shapes), dtype=torch.int32, device=device)
        self.u_mat, self.u_start = i64([t[0] for t in u_tiles]), i64([t[1] for t in u_tiles])
        self.u_chunk = i64([t[2] for t in u_tiles])
        self.g_mat, self.g_start = i64([m for m, _ in grad_tiles]), i64([s for _, s in grad_tiles])
        self.nchunk = i64(chunks)
        # the grad tiles of matrix m are contiguous (largest matrix first): where they start, how many
        first = {}
        for i, (m, _) in enumerate(grad_tiles):
            first.setdefault(m, i)
        self.g_first = i64([first[m] for m in range(len(shapes))])
        self.g_ntiles = i64([(r + self.br - 1) // self.br for r in rows])
        self.max_g_tiles = max((r + self.br - 1) // self.br for r in rows)
        self.ntiles = i64([(r + self.br - 1) // self.br * k for r, k in zip(rows, chunks)])
        self.count = torch.zeros(len(shapes), dtype=torch.int32, device=device)
        self.rows, self.cols = i64(rows), i64(cols)
        self.uoff, self.voff, self.woff = i64(self.u_off), i64(self.v_off), i64(self.w_off)
        self._ptrs: Dict[tuple, Tuple[torch.Tensor, bool, torch.Tensor]] = {}
        # (shape, contiguous strides, offset) of each weight in a flat buffer: one as_strided per view, half the
        # host time of a slice and a view (65 of them per forward and per backward at BigGAN-128)
        self._views = [(tuple(s), torch.empty(s, device="meta").stride(), o) for s, o in zip(weight_shapes, self.w_off)]

    def pointers(self, tensors: List[torch.Tensor]) -> Tuple[torch.Tensor, bool]:
        """(the tensors' data pointers as a device table, whether all are 16-byte aligned: the kernels' hint).
        Weights keep their addresses across steps, and the caching allocator mostly hands the backward's incoming
        gradients the same blocks every step, so tables are cached by address; a new one is copied from pinned
        memory without waiting for the GPU (a plain torch.tensor(..., device=cuda) would synchronize)."""
        key = tuple(t.data_ptr() for t in tensors)
        hit = self._ptrs.get(key)
        if hit is None:
            while len(self._ptrs) >= 16:  # the oldest layouts first (parameters re-sharded, gradients moved)
                self._ptrs.pop(next(iter(self._ptrs)))
            device = tensors[0].device
            host = torch.tensor(key, dtype=torch.int64, pin_memory=device.type == "cuda")
            # the host copy lives with the entry: a CUDA graph that captured the copy reads it again at replay
            hit = self._ptrs[key] = (host.to(device, non_blocking=True), all(p % 16 == 0 for p in key), host)
        else:
            self._ptrs[key] = self._ptrs.pop(key)  # most recently used last
        return hit[0], hit[1]

    def views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """Each weight's view of a flat buffer, in the weight's own shape."""
        base = flat.storage_offset()
        return [flat.as_strided(shape, strides, base + o) for shape, strides, o in self._views]

    def per_matrix(self, u_out: torch.Tensor, v_out: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Each matrix's u and v from the flat buffers (one split each: a Python slice each cost twice the host
        time)."""
        return list(u_out.split(self.u_sizes)), list(v_out.split(self.v_sizes))


_PLANS: Dict[tuple, Plan] = {}


def plan_for(weights: List[torch.Tensor], tiles: Optional[Tiles] = None) -> Plan:
    """The tile plan of a list of weights (each taken as an (out, everything else) matrix), built once per shapes,
    device and tiles."""
    device = weights[0].device
    tiles = tiles or default_tiles(device)
    key = (tuple(tuple(w.shape) for w in weights), device, tiles)
    if key not in _PLANS:
        _PLANS[key] = Plan(key[0], device, tiles)
    return _PLANS[key]


def _power_iterate(plan: Plan, ws: List[torch.Tensor], us: List[torch.Tensor], n_iters: int, eps: float
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Tuple[torch.Tensor, bool]]:
    """(sigmas, u_out, v_out, (the weights' pointer table, all aligned)): n_iters steps for every matrix, 2 launches
    each."""
    dev = ws[0].device
    (w_ptrs, aligned), (u_ptrs, _) = plan.pointers(ws), plan.pointers(us)
    wdt = tl_dtype(ws[0].dtype)
    f32 = dict(device=dev, dtype=torch.float32)
    u_out = torch.empty(plan.n_u, **f32)
    u_part = torch.empty(plan.max_chunks, plan.n_u, **f32)
    v_part = torch.empty(plan.n_vp, **f32)
    # debug: NaN where a last program should have written: sigma, and v (a split matrix's v pass)
    debug = os.environ.get("HPC_GAN_KERNEL_DEBUG") == "1"
    empty = (lambda n: torch.full((n,), float("nan"), **f32)) if debug else (lambda n: torch.empty(n, **f32))
    v_out, sigmas = empty(plan.n_v), empty(len(ws))
    for it in range(n_iters):
        sn_v_kernel[(plan.v_mat.numel(),)](
            w_ptrs, u_ptrs, u_out, v_out, v_part, plan.v_mat, plan.v_start, plan.v_chunk, plan.v_ntiles,
            plan.v_count, plan.rows, plan.cols, plan.uoff, plan.voff, plan.vpoff, plan.v_nchunk,
            U_FROM_FLAT=it > 0, W_DTYPE=wdt, PTR_ALIGNED=aligned, BR=plan.br, BC=plan.bc, FOLD=plan.fold,
            RCH=plan.rch, FB=plan.fb, **plan.launch)
        sn_u_kernel[(plan.u_mat.numel(),)](
            w_ptrs, u_out, u_part, v_out, sigmas, plan.u_mat, plan.u_start, plan.u_chunk, plan.ntiles,
            plan.count, plan.rows, plan.cols, plan.uoff, plan.voff, plan.nchunk, plan.n_u, eps, W_DTYPE=wdt,
            PTR_ALIGNED=aligned, BR=plan.br, BC=plan.bc, CH=plan.ch, FB=plan.fb, **plan.launch)
    if debug and torch.isnan(sigmas).any():  # a matrix whose last program never ran leaves its NaN
        missed = torch.isnan(sigmas).nonzero().flatten().tolist()
        raise RuntimeError(f"sn_v_kernel / sn_u_kernel: no last program ran for matrices {missed} of shapes "
                           f"{[plan.shapes[i] for i in missed]}: an arrival counter is broken")
    return sigmas, u_out, v_out, (w_ptrs, aligned)


class _FusedSN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: Plan, n_iters: int, eps: float, us: Tuple[torch.Tensor, ...], *ws: torch.Tensor):
        # the u vectors ride in a tuple: constants, so autograd need not weigh them as inputs (host time)
        sigmas, u_out, v_out, _ = _power_iterate(plan, list(ws), list(us), n_iters, eps)
        ctx.plan, ctx.w_dtype = plan, ws[0].dtype
        ctx.save_for_backward(u_out, v_out)
        ctx.mark_non_differentiable(u_out, v_out)
        return sigmas, u_out, v_out

    @staticmethod
    def backward(ctx, g_sigma: torch.Tensor, _gu: torch.Tensor, _gv: torch.Tensor):
        plan: Plan = ctx.plan
        u_out, v_out = ctx.saved_tensors
        grad = torch.empty(plan.n_w, device=u_out.device, dtype=ctx.w_dtype)
        sn_grad_kernel[(plan.g_mat.numel(),)](
            grad, g_sigma.contiguous().float(), u_out, v_out, plan.g_mat, plan.g_start, plan.rows, plan.cols,
            plan.uoff, plan.voff, plan.woff, BR=plan.br, BC=plan.bc, **plan.launch)
        return (None, None, None, None, *plan.views(grad))


def _check_inputs(weights: List[torch.Tensor], us: List[torch.Tensor]) -> None:
    if len({w.dtype for w in weights}) != 1 or not all(w.is_contiguous() for w in weights):
        raise ValueError("sn_power_iteration(backend='triton'): weights must be contiguous and share one dtype")
    if any(u.dtype != torch.float32 or not u.is_contiguous() for u in us):
        raise ValueError("sn_power_iteration(backend='triton'): u vectors must be contiguous float32")


def fused_power_iteration(weights: List[torch.Tensor], us: List[torch.Tensor], n_iters: int, eps: float,
                          tiles: Optional[Tiles] = None) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """(sigmas, us, vs) of every matrix; ``tiles``: the device's default unless given (benchmarks)."""
    _check_inputs(weights, us)
    plan = plan_for(weights, tiles)
    sigmas, u_out, v_out = _FusedSN.apply(plan, n_iters, eps, tuple(us), *weights)
    return (sigmas, *plan.per_matrix(u_out, v_out))


class _FusedNormalize(torch.autograd.Function):
    """Outputs: sigmas, u, v (constants: torch's spectral_norm differentiates W / sigma through W only), then
    W_i / sigma_i for every matrix (``out_dtype``), each its own output though they share one buffer. Had the
    buffer been the output and the matrices slices of it taken outside, autograd would have given each slice's
    gradient as a zero-filled buffer of the whole size (slice_backward), and summed them: 65 x 162M elements per
    backward at BigGAN-128 (seen in an op count)."""

    @staticmethod
    def forward(ctx, plan: Plan, n_iters: int, eps: float, out_dtype: torch.dtype,
                out_box: Tuple[Optional[torch.Tensor]], us: Tuple[torch.Tensor, ...], *weights: torch.Tensor):
        ws = list(weights)  # as the layers hold them (conv weights 4-D); the us: constants, as in _FusedSN
        sigmas, u_out, v_out, (w_ptrs, aligned) = _power_iterate(plan, ws, list(us), n_iters, eps)
        out = out_box[0]  # in a tuple: not an input of the function, so its views are no views of an input
        if out is None:
            flat = torch.empty(plan.n_w, device=ws[0].device, dtype=out_dtype)
        else:  # rewritten in place: a version bump, so that a backward still reading the last views fails loudly
            flat = out
            torch.autograd.graph.increment_version(flat)
        sn_scale_kernel[(plan.g_mat.numel(),)](
            w_ptrs, flat, sigmas, plan.g_mat, plan.g_start, plan.rows, plan.cols, plan.woff,
            W_DTYPE=tl_dtype(ws[0].dtype), PTR_ALIGNED=aligned, BR=plan.br, BC=plan.bc, **plan.launch)
        ctx.plan, ctx.w_dtype, ctx.out_dtype = plan, ws[0].dtype, out_dtype
        ctx.w_table = (w_ptrs, aligned)  # the saved weights cannot move before the backward
        ctx.set_materialize_grads(False)  # no zero-filled gradients for sigma, u, v (never differentiated)
        ctx.save_for_backward(sigmas, u_out, v_out, *ws)
        ctx.mark_non_differentiable(sigmas, u_out, v_out)
        return (sigmas, u_out, v_out, *plan.views(flat))

    @staticmethod
    def backward(ctx, _gs, _gu, _gv, *grads: torch.Tensor):
        plan: Plan = ctx.plan
        sigmas, u_out, v_out, *ws = ctx.saved_tensors
        dev = sigmas.device
        # the kernels read the incoming gradients where they are, through a pointer table: the H200 profile showed
        # their concatenation into one buffer at 11% of the whole job (a layer whose output went unused: zeros)
        gs = [g.contiguous() if g is not None else torch.zeros(w.shape, device=dev, dtype=ctx.out_dtype)
              for g, w in zip(grads, ws)]
        (w_ptrs, w_aligned), (g_ptrs, g_aligned) = ctx.w_table, plan.pointers(gs)
        aligned = w_aligned and g_aligned
        g_dtype = tl_dtype(gs[0].dtype)
        part = torch.empty(plan.g_mat.numel(), device=dev, dtype=torch.float32)
        grid = (plan.g_mat.numel(),)
        sn_dot_kernel[grid](w_ptrs, g_ptrs, part, plan.g_mat, plan.g_start, plan.rows, plan.cols,
                            W_DTYPE=tl_dtype(ctx.w_dtype), G_DTYPE=g_dtype, PTR_ALIGNED=aligned, BR=plan.br,
                            BC=plan.bc, **plan.launch)
        grad = torch.empty(plan.n_w, device=dev, dtype=ctx.w_dtype)
        sn_normalize_grad_kernel[grid](
            grad, g_ptrs, part, sigmas, u_out, v_out, plan.g_mat, plan.g_start, plan.rows, plan.cols, plan.uoff,
            plan.voff, plan.woff, plan.g_first, plan.g_ntiles, G_DTYPE=g_dtype, PTR_ALIGNED=aligned, BR=plan.br,
            BC=plan.bc, BT=max(next_power_of_2(plan.max_g_tiles), 2), **plan.launch)
        return (None, None, None, None, None, None, *plan.views(grad))


def fused_normalize(weights: List[torch.Tensor], us: List[torch.Tensor], n_iters: int, eps: float,
                    out_dtype: torch.dtype, tiles: Optional[Tiles] = None, out: Optional[torch.Tensor] = None
                    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
    """(W_i / sigma_i in ``out_dtype`` shaped as the weights, us, vs, sigmas): kernels.spectral_normalize on the
    Triton kernels. ``weights`` as the layers hold them (conv weights 4-D), each contiguous, one dtype; ``tiles``:
    the device's default unless given (benchmarks). ``out``: a flat buffer (``flat_size`` elements of
    ``out_dtype``) to write W / sigma into, the same every call (fixed addresses), instead of a new one: the caller
    must run the backward of one call's results before the next call (a backward that reads overwritten results
    fails: the buffer's version is bumped)."""
    _check_inputs(weights, us)
    plan = plan_for(weights, tiles)
    if out is not None and (out.shape != (plan.n_w,) or out.dtype != out_dtype or out.device != weights[0].device):
        raise ValueError(f"fused_normalize: out must be a flat {out_dtype} buffer of {plan.n_w} elements on "
                         f"{weights[0].device}; got {tuple(out.shape)} {out.dtype} on {out.device}")
    sigmas, u_out, v_out, *normalized = _FusedNormalize.apply(plan, n_iters, eps, out_dtype, (out,), tuple(us),
                                                              *weights)
    return (normalized, *plan.per_matrix(u_out, v_out), sigmas)


def flat_size(weights: List[torch.Tensor]) -> int:
    """The elements of fused_normalize's flat W / sigma buffer for these weights (each matrix 16-byte aligned)."""
    return plan_for(weights).n_w
