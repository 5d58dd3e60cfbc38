"""Multi-process training: launch detection, strategies (DDP, DeepSpeed ZeRO), cross-replica BN, global gathers,
replica consistency. Imports torch.distributed and hpc_gan.config only; the trainer builds on it."""
from hpc_gan.dist.launch import DistInfo, detect, init, shutdown

__all__ = ["DistInfo", "detect", "init", "shutdown"]
