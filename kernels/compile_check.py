"""Compile every Triton kernel ahead of time for NVIDIA GPU targets, without a GPU.

The CPU interpreter checks the kernels' arithmetic but not what only the GPU compiler sees (types of dot operands,
pointer casts, scalar control flow around atomics, register-level layouts). This runs Triton's real CUDA pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for each kernel, each dtype and each target, so a
login node or a CPU CI can tell that the kernels will build on an H100. It proves compilation, not speed or results.

    python -m kernels.compile_check [--arch 90 80] [--dtype fp32 bf16]

Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels with Python functions).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Tuple


def _specs(dtype: str) -> List[Tuple[str, object, Dict[str, str], Dict[str, object]]]:
    import triton.language as tl

    import kernels.similarity_triton as S
    import kernels.spectral_norm_triton as N
    t = "*fp32" if dtype == "fp32" else "*bf16"
    f32, i64 = "*fp32", "*i64"
    blocks = dict(BI=64, BJ=64, BK=64)
    sim_common = {"A": t, "B": t, "RA": f32, "RB": f32, "LA": i64, "LB": i64}
    scal = {"N": "i32", "M": "i32", "D": "i32", "row_offset": "i32", "m_n": "fp32", "inv_t": "fp32"}
    prec = "tf32" if dtype == "fp32" else "ieee"
    specs = [
        ("inv_norm", S.inv_norm_kernel, {"X": t, "OUT": f32, "N": "i32", "D": "i32", "eps": "fp32"},
         dict(BR=64, BD=64)),
        ("cosine", S.cosine_kernel, {"A": t, "B": t, "S": t, "N": "i32", "M": "i32", "D": "i32", "eps": "fp32"},
         dict(PREC=prec, **blocks)),
    ]
    for studiogan in (False, True):
        specs.append((f"d2d_fwd(studiogan={studiogan})", S.neg_lse_fwd_kernel,
                      {**sim_common, "LSE": f32, "OUT": f32, **scal}, dict(STUDIOGAN=studiogan, PREC=prec, **blocks)))
    bwd = {**sim_common, "LSE": f32, "G": f32, "ACC": f32}
    specs.append(("d2d_bwd_rows", S.neg_lse_bwd_rows_kernel, {**bwd, "DA": t, **scal}, dict(PREC=prec, BD=64, **blocks)))
    specs.append(("d2d_bwd_cols", S.neg_lse_bwd_cols_kernel, {**bwd, "DB": t, **scal}, dict(PREC=prec, BD=64, **blocks)))
    wdt = tl.float32 if dtype == "fp32" else tl.bfloat16
    table = {k: i64 for k in ("TILE_MAT", "TILE_START", "ROWS", "COLS", "UOFF", "VOFF")}
    for from_flat in (False, True):
        specs.append((f"sn_v(u_from_flat={from_flat})", N.sn_v_kernel,
                      {"W_PTRS": i64, "U_PTRS": i64, "U_FLAT": f32, "V_OUT": f32, **table},
                      dict(U_FROM_FLAT=from_flat, W_DTYPE=wdt, BR=32, BC=128)))
    specs.append(("sn_u", N.sn_u_kernel, {"W_PTRS": i64, "U_OUT": f32, "V_OUT": f32, "SIGMA": f32, "TILE_MAT": i64,
                                           "TILE_START": i64, "NTILES": i64, "COUNT": "*i32", "ROWS": i64,
                                           "COLS": i64, "UOFF": i64, "VOFF": i64, "eps": "fp32"},
                  dict(W_DTYPE=wdt, BR=32, BC=128)))
    specs.append(("sn_grad", N.sn_grad_kernel, {"GRAD": t, "GSIG": f32, "U_OUT": f32, "V_OUT": f32, **table,
                                                 "WOFF": i64}, dict(BR=32, BC=128)))
    return specs


def compile_all(archs: List[int], dtypes: List[str], log=print) -> int:
    """Compile every kernel for every (arch, dtype); returns the number of failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    failures = 0
    for arch in archs:
        for dtype in dtypes:
            for name, fn, sig, consts in _specs(dtype):
                signature = {**sig, **{k: "constexpr" for k in consts}}
                t0 = time.time()
                try:
                    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                                       target=GPUTarget("cuda", arch, 32))
                    ok = "cubin" in k.asm
                    msg = f"{len(k.asm['cubin'])} B cubin" if ok else "no cubin"
                except Exception as e:  # noqa: BLE001 -- report every kernel, then fail at the end
                    ok, msg = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                failures += not ok
                log(f"sm_{arch} {dtype:4s} {name:28s} {'ok  ' if ok else 'FAIL'} {msg} ({time.time() - t0:.1f} s)")
    return failures


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="*", default=[90], help="compute capabilities, e.g. 90 (H100) 80 (A100)")
    p.add_argument("--dtype", nargs="*", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("kernels.compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    failures = compile_all(args.arch, args.dtype)
    print(f"{failures} of the kernels failed to compile" if failures else "all kernels compile")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
