"""Launching a Triton kernel without the JIT's per-call work (``kernels.launch.DIRECT``; off by default: the JIT's
own launch is the reference, and the direct one has not yet run on a GPU).

``kernel[grid](*args, **kwargs)`` binds and specializes every argument, builds a cache key and looks the compiled
kernel up, on every call. The GPU runs found D2D-CE's eager forward + backward host-bound at ~1.3 ms for 13
launches (H200, 2026-11-27); the check pack's kernels stage times one JIT launch against one through its compiled
kernel, and a whole call each way (``host_costs``). With ``DIRECT`` on, ``launch`` keeps each compiled kernel under
a key at least as fine as everything the JIT specializes on (the device; each tensor's dtype and 16-byte alignment;
the exact value of every integer, bool and string argument, constexprs and launch options included) and calls its
launcher with the arguments in the kernel's order, constexprs included (Triton >= 3.3, as inductor's launchers do).
A key seen for the first time goes through the JIT, which compiles and launches as always; so do Triton's
interpreter and any argument of another kind. Tests compare the two launches bitwise on CUDA
(tests/test_kernels.py).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Tuple

import torch

from kernels.dispatch import interpreting

DIRECT = False
# (id(kernel), device, argument keys, keyword names) -> the JIT's compiled kernel
_COMPILED: Dict[Tuple, Any] = {}
_PARAMETERS: Dict[int, List[Tuple[str, Any]]] = {}  # id(kernel) -> its (name, default) in order


def arg_key(a: Any) -> Optional[Tuple]:
    """What the JIT specializes on for one argument, or finer; None for a kind this module leaves to the JIT."""
    if isinstance(a, torch.Tensor):  # its device is the launch's (in the key once)
        return (a.dtype, a.data_ptr() & 15 == 0)
    if isinstance(a, (bool, int, str)):  # the type too: True == 1
        return (type(a), a)
    if isinstance(a, float):
        return (float,)  # passed as fp32, never specialized on its value
    return None


def _parameters(kernel: Any) -> List[Tuple[str, Any]]:
    """(name, default) of each parameter of the kernel's Python function, in order (once per kernel)."""
    found = _PARAMETERS.get(id(kernel))
    if found is None:
        params = inspect.signature(kernel.fn).parameters.values()
        found = _PARAMETERS[id(kernel)] = [(p.name, p.default) for p in params]
    return found


def signature_args(kernel: Any, args: Tuple, kwargs: Dict[str, Any]) -> List[Any]:
    """Every argument of ``kernel`` in its parameter order, as its compiled launcher takes them: the positional
    ones, then each later parameter from the keywords or its default (launch options such as num_warps are no
    parameters: left out)."""
    return [*args, *(kwargs[name] if name in kwargs else default for name, default in _parameters(kernel)[len(args):])]


def launch(kernel: Any, grid: Tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, through its compiled kernel where ``DIRECT`` is on and this call's key has
    been seen (the module docstring). ``grid``: a tuple of ints."""
    if not DIRECT or interpreting():
        kernel[grid](*args, **kwargs)
        return
    keys = (*map(arg_key, args), *map(arg_key, kwargs.values()))
    if None in keys:
        kernel[grid](*args, **kwargs)
        return
    key = (id(kernel), torch.cuda.current_device(), keys, tuple(kwargs))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **kwargs)  # compiles (once) and launches, as always
        if hasattr(compiled, "__getitem__"):  # a Triton whose JIT hands back no compiled kernel keeps the JIT
            _COMPILED[key] = compiled
        return
    compiled[(*grid, 1, 1)[:3]](*signature_args(kernel, args, kwargs))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a grid on the host. ``triton.cdiv`` is a constexpr function (Triton 3.6 and 3.9): ~1.7 us a
    call on the development CPU, where this is ~0.05, and D2D-CE's forward + backward took ten of them."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of 2 >= n (1 for n <= 1), on the host: ``triton.next_power_of_2`` without its per-call
    cost (see ``cdiv``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def direct_kernels() -> int:
    """How many (kernel, key) pairs have a compiled kernel kept for direct launches in this process."""
    return len(_COMPILED)
