"""A process-wide guard against a torch + oneMKL bug that made resumed CPU runs differ from straight ones.

ATen sends contiguous float32/float64 unary ops (tanh, exp, sqrt, ...) to MKL's VML, one call per intra-op thread
on its chunk. oneMKL 2024.2, as bundled in the torch wheels, picks each VML function's kernel on that function's
first call; when that call runs on several threads at once, one thread can run a low-accuracy kernel for its whole
chunk (pytorch/pytorch#188792; the next call is correct). Seen here: the first ``tanh`` of G's output after a
resume was wrong by up to 5e-5 in the second thread's half of its elements in 2-9% of fresh processes on 2 threads,
so resumed runs left the straight run's trajectory; with this guard, in none of 200 (scripts/vml_race.py,
docs/benchmarks.md).

One 1-element call per VML function and precision, on the calling thread before any parallel use, settles MKL's
choice for the process (the fix the upstream pull request makes inside ATen). Forked workers inherit it."""
from __future__ import annotations

import torch

# ATen's IMPLEMENT_VML_MKL list (ATen/cpu/vml.h; a test checks it against the installed torch's header), and
# the five torch 2.13 leaves commented out there, in case another version sends them: a call costs ~2 us.
VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin", "sqrt",
           "tan", "tanh", "trunc", "abs", "cosh", "expm1", "log1p", "sinh")

_warmed = False


def warm_vml_dispatch() -> None:
    """Resolve MKL's kernel choice for every VML function ATen uses (idempotent; ~1.7 ms, once per process). Call
    before the process's first multithreaded CPU math: every entry point does (hpc_gan.cli, Trainer,
    the GPU pack's children, the tests)."""
    global _warmed
    if _warmed:
        return
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)  # inside every op's domain (acos, log, erfinv, ...)
        for name in VML_OPS:
            getattr(torch, name)(x)
    _warmed = True
