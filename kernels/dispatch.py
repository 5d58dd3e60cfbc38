"""Where the Triton kernels can run, and the one-line errors when they cannot.

Triton runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was first imported
(the interpreter: fp32 only, slow; what the CPU tests use)."""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
D2D_MODES = ("paper", "studiogan")  # kernels.d2d_ce: Eq. 6, or PyTorch-StudioGAN's shifted variant


class BackendUnavailable(RuntimeError):
    """backend="triton" was asked for where Triton cannot run (not installed, CPU without the interpreter, a dtype
    the interpreter lacks); the message names the fix."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(backend: str, *tensors: torch.Tensor, op: str) -> bool:
    """Resolve backend for these inputs: "auto" means Triton on CUDA tensors (where triton is installed), the torch
    reference otherwise; "triton" insists and fails with the fix where it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and available()
    if not available():
        raise BackendUnavailable(f"{op}: backend='triton' needs triton; `pip install triton` or use backend='torch'")
    if not on_cuda and not interpreting():
        raise BackendUnavailable(f"{op}: backend='triton' on {tensors[0].device} tensors needs TRITON_INTERPRET=1 set "
                           f"before triton is imported (CPU interpreter), or CUDA tensors, or backend='torch'")
    if not on_cuda:
        bad = [t.dtype for t in tensors if t.is_floating_point() and t.dtype != torch.float32]
        if bad:
            raise BackendUnavailable(f"{op}: the Triton CPU interpreter runs fp32 only, got {bad[0]}; cast to float32 or "
                               f"use backend='torch'")
    return True


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off for ``device_type``: torch.autocast(enabled=False) where autocast is on, else a
    null context (entering and leaving torch.autocast took 2.8 us of host time on the development CPU, this 0.45;
    twice per D2D-CE call, and once per G block's upsampling)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def tl_dtype(dtype: torch.dtype):  # -> triton.language.dtype
    import triton.language as tl
    table = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    if dtype not in table:
        raise TypeError(f"no Triton kernel for {dtype}; use float32, bfloat16 or float16")
    return table[dtype]
