"""Host time of the Triton paths around their kernels, measured on a CPU (a benchmark, not a test).

    python scripts/host_probe.py [d2d|sn] [--reps N]

The GPU runs found both custom ops host-bound in wall time (H200, 2026-11-28): D2D-CE's forward + backward took
~1.3 ms of host time for 0.04-0.2 ms of device work, of which its Triton launches were ~0.3 ms; the whole spectral
normalization of BigGAN-128's 65 matrices (W / sigma in bf16 and its backward) 6.3 ms of wall for 1.1 ms of device
work in 5 launches. What is not a launch is Python and torch work that runs the same on any host, so it can be
weighed here: each op's Triton path with every kernel launch replaced by a counter (in Triton's interpreter the
kernels would dominate; their outputs are never read here), beside an identity autograd function's forward and
backward as the unit (181.5 us on the H200's host, 30-45 here: that host ran the same work ~4-5x slower).

- d2d: the kernels stage's call at a tiny shape (8 local rows, 64 gathered columns, d 16, fp32): a slice of the
  columns as the rows, the rest as negatives, forward + backward; and the torch reference's.
- sn: spectral_normalize(backend="triton", out_dtype=bf16) of BigGAN-128's 65 weight shapes and its backward, as the
  sn stage's ``normalize_triton`` times it (~1.3 GB of memory).

Prints microseconds per call, the fastest of five rounds (the least disturbed by other work).
"""
import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kernels.bench import d2d_inputs  # noqa: E402
from kernels.host_bench import IdentityFunction  # noqa: E402
from kernels.similarity import d2d_ce  # noqa: E402
from kernels.spectral_norm import spectral_normalize  # noqa: E402

LAUNCHES = [0]


def _skip_launch(self, *args, **kwargs) -> None:
    LAUNCHES[0] += 1


def per_call_us(fn, reps: int) -> float:
    fn()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - t0) / reps * 1e6)
    return min(rounds)


def launches_of(fn) -> int:
    fn()
    LAUNCHES[0] = 0
    fn()
    return LAUNCHES[0]


def d2d_cases():
    n, m, d = 8, 64, 16
    cols, col_labels, proxy, offset = d2d_inputs(torch.device("cpu"), n, m, d, torch.float32)
    labels = col_labels[offset:offset + n]

    def loss(backend: str) -> torch.Tensor:
        return d2d_ce(cols[offset:offset + n], proxy, labels, 0.5, 0.98, backend=backend,
                      negatives=(cols, col_labels), row_offset=offset)

    def forward_backward(backend: str):
        def run() -> None:
            cols.grad = proxy.grad = None
            loss(backend).backward()
        return run

    return (f"D2D-CE at {n} x {m} x {d}, fp32",
            [("Triton path, forward + backward", forward_backward("triton")),
             ("Triton path, forward alone", lambda: loss("triton")),
             ("torch reference, forward + backward", forward_backward("torch"))])


def sn_cases():
    from hpc_gan.gpucheck.common import biggan128_sn_shapes
    shapes = biggan128_sn_shapes()
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(*s, generator=g).requires_grad_() for s in shapes]
    us = [torch.nn.functional.normalize(torch.randn(s[0], generator=g), dim=0) for s in shapes]
    grads = [torch.randn(*s, generator=g).to(torch.bfloat16) for s in shapes]

    def job() -> None:
        for w in ws:
            w.grad = None
        torch.autograd.backward(spectral_normalize(ws, us, 1, backend="triton", out_dtype=torch.bfloat16)[0], grads)

    def forward() -> None:
        spectral_normalize(ws, us, 1, backend="triton", out_dtype=torch.bfloat16)

    return f"spectral norm of BigGAN-128's {len(shapes)} matrices, fp32 weights, bf16 W / sigma", [
        ("Triton path, W / sigma + backward", job), ("Triton path, W / sigma alone", forward)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("op", nargs="?", choices=("d2d", "sn"), default="d2d")
    ap.add_argument("--reps", type=int, default=0, help="calls per round (default: 2000 for d2d, 100 for sn)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    InterpretedFunction.run = _skip_launch  # every Triton launch, through kernels.launch or kernel[grid]
    title, cases = d2d_cases() if args.op == "d2d" else sn_cases()
    reps = args.reps or (2000 if args.op == "d2d" else 100)
    x = torch.zeros(4, requires_grad=True)
    print(f"{title}; CPU, {reps} calls x 5 rounds, the fastest round")
    for name, fn in cases:
        launched = launches_of(fn)
        note = f" ({launched} Triton launches, skipped)" if launched else ""
        print(f"  {name}: {per_call_us(fn, reps):.1f} us{note}")
    print(f"  identity autograd function, forward + backward: "
          f"{per_call_us(lambda: IdentityFunction.apply(x).sum().backward(), 20 * reps):.1f} us")


if __name__ == "__main__":
    main()
