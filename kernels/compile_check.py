"""Compile every Triton kernel ahead of time for NVIDIA GPU targets, without a GPU, as the runtime would build it.

The CPU interpreter checks the kernels' arithmetic but not what only the GPU compiler sees (types of dot operands,
pointer casts, scalar control flow around atomics, register pressure, shared memory). This runs Triton's real CUDA
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for each kernel, each dtype, each autotuned
configuration and each target, mirroring what the runtime compiles:

- specialization: at training shapes every pointer is 16-byte aligned and N, M, d are multiples of 16, which the
  runtime marks (``tt.divisibility``); those builds are checked, and a generic build (odd shapes) of each kernel;
- precision: fp32 inputs multiply as the kernels do at runtime ("tf32x3"), bf16 in bf16;
- limits: a build fails when it needs more shared memory than the target has (232,448 B on sm_90, 166,912 B on
  sm_80), when ptxas reports register spills (``ptxas -v`` on the build's PTX), or when an aligned build moves
  its data without a single vector load or store.

    python -m kernels.compile_check [--arch 90 80] [--dtype fp32 bf16] [--only NAME]

Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels with Python functions). It proves
compilation, not speed or results.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory per block (opt-in maximum)
DIV16_INTS = {"N", "M", "D", "CS", "n_u"}  # ints that are multiples of 16 at the training shapes

Spec = Tuple[str, object, Dict[str, str], Dict[str, object], Dict[str, int]]


def _specs(dtype: str) -> List[Spec]:
    """(name, jit function, signature, constexprs, options) of every build the runtime makes."""
    import torch
    import triton.language as tl

    import kernels.cosine_triton as C
    import kernels.similarity_triton as S
    import kernels.spectral_norm_triton as N
    t = "*fp32" if dtype == "fp32" else "*bf16"
    f32, i64 = "*fp32", "*i64"
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    prec = S.precision(torch_dtype)
    if prec == "tf32":  # what runs under torch's default (TF32 off for matmuls): three TF32 products
        prec = "tf32x3"
    sim_common = {"A": t, "B": t, "RA": f32, "RB": f32, "LA": i64, "LB": i64}
    scal = {"N": "i32", "M": "i32", "D": "i32", "row_offset": "i32", "m_n": "fp32", "inv_t": "fp32"}
    rows = S.row_tiles(torch.device("cuda"))  # the GPU's tiles: this runs without the interpreter
    cos = C.cosine_tiles(torch_dtype)
    specs: List[Spec] = [
        ("cosine", C.cosine_kernel, {"A": t, "B": t, "S": t, "N": "i32", "M": "i32", "D": "i32", "eps": "fp32"},
         dict(PREC=prec, BI=cos["BI"], BJ=cos["BJ"], BK=cos["BK"]), {"num_warps": cos["num_warps"]}),
    ]
    split = S.neg_lse_split_kernel  # autotuned: every candidate of this dtype is a build the runtime may pick
    for studiogan in (False, True):
        for cfg in S.split_configs(torch_dtype):
            specs.append((f"d2d_split(studiogan={studiogan}, {cfg.kwargs}, w{cfg.num_warps}s{cfg.num_stages})",
                          split.fn, {**sim_common, "PMAX": f32, "PSUM": f32, "PSHIFT": f32, **scal, "CS": "i32",
                                     "eps": "fp32"},
                          dict(STUDIOGAN=studiogan, PREC=prec, **cfg.kwargs),
                          {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
        specs.append((f"d2d_combine(studiogan={studiogan})", S.d2d_combine_kernel,
                      {"PMAX": f32, "PSUM": f32, "PSHIFT": f32, "A": t, "V": t, "RA": f32, "ROWS": f32, "N": "i32",
                       "S": "i32", "D": "i32", "m_p": "fp32", "inv_t": "fp32", "eps": "fp32"},
                      dict(STUDIOGAN=studiogan, BS=64, **S.combine_tiles(torch.device("cuda"))), {}))
    scan = S.scan_tiles(torch.device("cuda"))
    specs.append(("d2d_inv_norms", S.inv_norms_kernel, {"X": t, "R": f32, "N": "i32", "D": "i32", "eps": "fp32"},
                  dict(BR=scan["BR"], BD=scan["BD"]), {}))
    for studiogan in (False, True):
        specs.append((f"d2d_rows(studiogan={studiogan})", S.d2d_rows_kernel,
                      {"S": f32, "A": t, "V": t, "RA": f32, "RB": f32, "LA": i64, "LB": i64, "ROWS": f32, "N": "i32",
                       "M": "i32", "D": "i32", "row_offset": "i32", "m_p": "fp32", "m_n": "fp32", "inv_t": "fp32",
                       "eps": "fp32"}, dict(STUDIOGAN=studiogan, **scan), {}))
    bwd = {**sim_common, "ROWS": f32, "G": f32}
    scal_b = {**scal, "inv_n": "fp32"}
    q = f32 if dtype == "fp32" else t
    grad_matrix = [(S.gpu_tiles(torch_dtype, n), False) for n in (16, 32, 1 << 30)]  # row tiles 16, 32, 64
    grad_matrix += [(S.from_s_tiles(n, torch.device("cuda")), True) for n in (16, 32)]  # "matrix" mode, from S
    for gm, from_s in grad_matrix:
        specs.append((f"d2d_grad_matrix(BI={gm['BI']}, BJ={gm['BJ']}, from_s={from_s})", S.d2d_grad_matrix_kernel,
                      {"A": t, "B": t, "S": f32, **{k: v for k, v in bwd.items() if k not in ("A", "B")}, "Q": q,
                       "CROW": f32, "CCOL": f32, **scal_b},
                      dict(PREC=prec, BI=gm["BI"], BJ=gm["BJ"], BK=gm["BK"], FROM_S=from_s),
                      {"num_warps": gm["num_warps"]}))
    stream = S.stream_tiles(torch_dtype)
    stream_warps = {"num_warps": stream.pop("num_warps")}
    specs.append(("d2d_stream_rows", S.d2d_stream_rows_kernel, {**bwd, "ACC": f32, "CROW": f32, **scal_b},
                  dict(PREC=prec, **stream), stream_warps))
    specs.append(("d2d_stream_cols", S.d2d_stream_cols_kernel, {**bwd, "ACC": f32, "CCOL": f32, **scal_b},
                  dict(PREC=prec, **stream), stream_warps))
    for acc in sorted({q, f32}):  # the matrix backward's products (Q's dtype), the streaming one's fp32 buffers
        for two, pos in ((False, True), (True, True), (False, False)):
            specs.append((f"d2d_finish(acc={acc[1:]}, two={two}, pos={pos})", S.d2d_finish_kernel,
                          {"X": t, "OUT": t, "N": "i32", "D": "i32", "ACC": acc, "R": f32, "C": f32, "SC": "i32",
                           "ACC2": acc, "R2": f32, "C2": f32, "SC2": "i32", "V": t, "ROWS": f32, "G": f32, "DV": t,
                           "inv_n": "fp32"}, dict(TWO=two, POS=pos, WANT_DV=pos, BS=32, **rows), {}))
    wdt = tl.float32 if dtype == "fp32" else tl.bfloat16
    gt = N.GPU_TILES  # the SN kernels' tiles and launch options as they run on a GPU
    sn = dict(BR=gt.br, BC=gt.bc)
    sn_launch = {"num_warps": gt.warps, "num_stages": gt.stages}
    table = {k: i64 for k in ("TILE_MAT", "TILE_START", "ROWS", "COLS", "UOFF", "VOFF")}
    fb = N.finish_block(torch.device("cuda"))
    for from_flat in (False, True):
        specs.append((f"sn_v(u_from_flat={from_flat})", N.sn_v_kernel,
                      {"W_PTRS": i64, "U_PTRS": i64, "U_FLAT": f32, "V_OUT": f32, "V_PART": f32, "TILE_MAT": i64,
                       "TILE_START": i64, "TILE_CHUNK": i64, "NTILES": i64, "COUNT": "*i32", "ROWS": i64,
                       "COLS": i64, "UOFF": i64, "VOFF": i64, "VPOFF": i64, "NCHUNK": i64},
                      dict(U_FROM_FLAT=from_flat, W_DTYPE=wdt, PTR_ALIGNED=True, FOLD=gt.fold, RCH=gt.rch, FB=fb,
                           **sn),
                      sn_launch))
    specs.append(("sn_u", N.sn_u_kernel, {"W_PTRS": i64, "U_OUT": f32, "U_PART": f32, "V_OUT": f32, "SIGMA": f32,
                                          "TILE_MAT": i64, "TILE_START": i64, "TILE_CHUNK": i64, "NTILES": i64,
                                          "COUNT": "*i32", "ROWS": i64, "COLS": i64, "UOFF": i64, "VOFF": i64,
                                          "NCHUNK": i64, "n_u": "i32", "eps": "fp32"},
                  dict(W_DTYPE=wdt, PTR_ALIGNED=True, CH=gt.ch, FB=fb, **sn), sn_launch))
    specs.append(("sn_grad", N.sn_grad_kernel, {"GRAD": t, "GSIG": f32, "U_OUT": f32, "V_OUT": f32, **table,
                                                "WOFF": i64}, dict(**sn), sn_launch))
    tiles_g = {k: i64 for k in ("TILE_MAT", "TILE_START", "ROWS", "COLS")}
    tiles_ = {**tiles_g, "WOFF": i64}
    for out in sorted({t, "*bf16"}):  # W / sigma in the weights' dtype, or bf16 for layers under autocast
        specs.append((f"sn_scale(out={out[1:]})", N.sn_scale_kernel, {"W_PTRS": i64, "OUT": out, "SIGMA": f32,
                                                                      **tiles_},
                      dict(W_DTYPE=wdt, PTR_ALIGNED=True, **sn), sn_launch))
        gdt = tl.float32 if out == "*fp32" else tl.bfloat16  # the incoming gradients, through a pointer table
        specs.append((f"sn_dot(g={out[1:]})", N.sn_dot_kernel, {"W_PTRS": i64, "G_PTRS": i64, "PART": f32, **tiles_g},
                      dict(W_DTYPE=wdt, G_DTYPE=gdt, PTR_ALIGNED=True, **sn), sn_launch))
        specs.append((f"sn_normalize_grad(g={out[1:]})", N.sn_normalize_grad_kernel,
                      {"GRAD": t, "G_PTRS": i64, "PART": f32, "SIGMA": f32, "U_OUT": f32, "V_OUT": f32, **tiles_g,
                       "UOFF": i64, "VOFF": i64, "WOFF": i64, "FIRST": i64, "NTILES": i64},
                      dict(G_DTYPE=gdt, PTR_ALIGNED=True, BT=64, **sn), sn_launch))
    return specs


def _divisibility(fn: object, signature: Dict[str, str]) -> Dict[tuple, list]:
    """The runtime's specialization at training shapes: aligned pointers, 16-divisible shape ints."""
    names = fn.arg_names  # type: ignore[attr-defined]
    return {(names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items()
            if v.startswith("*") or k in DIV16_INTS}


def vector_accesses(ptx: str) -> int:
    """Vector global loads and stores (ld.global.v2/v4, st.global.v2/v4) in a kernel's PTX. An aligned build (16-byte
    aligned pointers, 16-divisible sizes) without any fails the check: the SN kernels' accesses were all scalar
    once, behind hints the compiler could not use, and nothing noticed."""
    return len(re.findall(r"\b(?:ld|st)\.global(?:\.\w+)*\.v[24]\b", ptx))


def ptxas_report(ptx: str, arch: int) -> Tuple[Optional[int], int]:
    """(registers, spill-store bytes) of the PTX's kernel, from the bundled ptxas -v; (None, 0) without it."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 -- no bundled ptxas: skip the register check, say so in the line
        return None, 0
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
    return (max(regs) if regs else None), sum(spills)


def compile_all(archs: List[int], dtypes: List[str], log=print, only: str = "") -> int:
    """Compile every build (whose name contains ``only``) for every (arch, dtype); returns the number of
    failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    failures = 0
    for arch in archs:
        limit = SHARED_LIMIT.get(arch, 101376)
        for dtype in dtypes:
            seen_generic = set()
            for name, fn, sig, consts, options in _specs(dtype):
                if only not in name:
                    continue
                signature = {**sig, **{k: "constexpr" for k in consts}}
                variants = [("aligned", _divisibility(fn, sig))]
                base = name.split("(")[0]
                if dtype == "fp32" and base not in seen_generic:  # one generic build per kernel: odd shapes
                    variants.append(("generic", {}))
                    seen_generic.add(base)
                for variant, attrs in variants:
                    t0 = time.time()
                    # the runtime passes PTR_ALIGNED=False where a weight's pointer is not 16-byte aligned
                    built = {**consts, "PTR_ALIGNED": False} if variant == "generic" and "PTR_ALIGNED" in consts \
                        else consts
                    try:
                        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=built, attrs=attrs),
                                           target=GPUTarget("cuda", arch, 32), options=options or None)
                        shared = k.metadata.shared
                        regs, spills = ptxas_report(k.asm["ptx"], arch)
                        vector = vector_accesses(k.asm["ptx"])
                        problems = ([f"{shared} B shared memory > {limit}"] if shared > limit else []) + \
                                   ([f"{spills} B register spills"] if spills else []) + \
                                   (["no vector loads or stores"] if variant == "aligned" and not vector else [])
                        ok = "cubin" in k.asm and not problems
                        msg = (f"{len(k.asm['cubin'])} B cubin, {shared} B shared, "
                               f"{'?' if regs is None else regs} registers, {vector} vector accesses" +
                               "".join(f"; {p}" for p in problems))
                    except Exception as e:  # noqa: BLE001 -- report every kernel, then fail at the end
                        ok, msg = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    failures += not ok
                    log(f"sm_{arch} {dtype:4s} {variant:7s} {name:60s} {'ok  ' if ok else 'FAIL'} {msg} "
                        f"({time.time() - t0:.1f} s)")
    return failures


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="*", default=[90], help="compute capabilities, e.g. 90 (H100) 80 (A100)")
    p.add_argument("--dtype", nargs="*", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    p.add_argument("--only", default="", help="only the builds whose name contains this, e.g. d2d_split")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("kernels.compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    failures = compile_all(args.arch, args.dtype, only=args.only)
    print(f"{failures} of the kernel builds failed" if failures else "all kernels compile")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
