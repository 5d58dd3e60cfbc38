"""Training data: the embedded synthetic set, .npz arrays, class folders and prepared shards, as world-size
independent per-rank batches (torch or DALI)."""
from hpc_gan.data.loader import EncodedDataset, InMemoryDataset, build_dataset
from hpc_gan.data.streams import RealStream, build_stream

__all__ = ["EncodedDataset", "InMemoryDataset", "RealStream", "build_dataset", "build_stream"]
