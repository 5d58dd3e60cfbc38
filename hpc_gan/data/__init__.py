"""Training data: the embedded synthetic set, .npz arrays and class folders, as world-size independent batches."""
from hpc_gan.data.loader import RealStream, build_dataset

__all__ = ["RealStream", "build_dataset"]
