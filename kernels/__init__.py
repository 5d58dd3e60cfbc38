"""Custom ops of hpc-gan, each beside its pure-PyTorch reference. Imports nothing from hpc_gan."""
from kernels.dispatch import BACKENDS, D2D_MODES, BackendUnavailable, use_triton
from kernels.similarity import d2d_ce, normalized_similarity
from kernels.spectral_norm import SN_BACKENDS, resolve_sn_backend, sn_power_iteration, spectral_normalize

__all__ = ["BACKENDS", "D2D_MODES", "SN_BACKENDS", "BackendUnavailable", "use_triton", "d2d_ce",
           "normalized_similarity", "resolve_sn_backend", "sn_power_iteration", "spectral_normalize"]
