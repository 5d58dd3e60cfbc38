"""train.compile_tuning: inductor's coordinate-descent tuning of its fused Triton kernels' launch configs, kept to
the kernels that take long enough to matter.

Inductor tunes every kernel of a graph when ``coordinate_descent_tuning`` is on: a compiled BigGAN-128 step has a
few hundred fused kernels, and each tuning compiles and benchmarks about ten neighbouring configs one after another,
minutes in all, where the step's time is in a handful of them (the H200's CUDA-graph step at 256, 2026-11-27: one
reduction took 5.9 ms of the ~90 ms outside the convolutions). So each kernel is first timed once in the config
inductor's heuristics chose, and only one slower than ``TUNE_ABOVE_MS`` is tuned. This wraps a method of inductor's
runtime (``CachingAutotuner.coordinate_descent_tuning``, torch 2.11-2.13); where it is missing, every kernel is
tuned, as inductor does, and a warning says so.
"""
from __future__ import annotations

import warnings

TUNE_ABOVE_MS = 0.2  # a kernel faster than this in inductor's own config keeps it


def enable(threshold_ms: float = TUNE_ABOVE_MS) -> bool:
    """Turn inductor's coordinate-descent tuning on for this process, for kernels slower than ``threshold_ms``.
    Returns whether the filter is in place (False: every kernel is tuned)."""
    import torch._inductor.config as inductor_config
    inductor_config.coordinate_descent_tuning = True
    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError:
        CachingAutotuner = None
    tune = getattr(CachingAutotuner, "coordinate_descent_tuning", None)
    if tune is None or not hasattr(CachingAutotuner, "bench"):
        warnings.warn("train.compile_tuning: this torch's inductor has no CachingAutotuner.coordinate_descent_tuning"
                      " to filter; every fused kernel is tuned (minutes)")
        return False
    if getattr(tune, "slow_kernels_only", None) is not None:  # installed earlier in this process: set the threshold
        tune.slow_kernels_only = threshold_ms
        return True

    def tune_if_slow(self, launcher, *args, **kwargs):
        # _should_coordesc_tune: inductor's own test (off for kernels it does not tune); the timing clones any
        # argument the kernel mutates, as the tuning's own benchmarks do
        if getattr(self, "_should_coordesc_tune", True) and \
                self.bench(launcher, *args, **kwargs) < tune_if_slow.slow_kernels_only:
            # marked as decided, as a tuned config is: inductor asks again on every call of an unmarked one
            launcher.config.found_by_coordesc = True
            return launcher
        return tune(self, launcher, *args, **kwargs)

    tune_if_slow.slow_kernels_only = threshold_ms
    CachingAutotuner.coordinate_descent_tuning = tune_if_slow
    return True
