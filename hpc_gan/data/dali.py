"""NVIDIA DALI pipeline for real images, a drop-in for ``RealStream`` (``data.backend: dali``).

Decode (``device="mixed"``: nvJPEG on the GPU; ``"cpu"`` where ``device_id=None``), the centre crop + resize of raw
class-folder images, mirror and normalization to [-1, 1] NCHW float run in DALI. Which samples a rank gets, in which
order, and which are mirrored is decided exactly as in the torch path (the trainer's world-size-independent global
batch, this rank's positions of it, the seeded flip mask): the encoded bytes of those samples are fed through
``fn.external_source``. So DALI and torch give the same samples per rank and step up to decoder differences, the
shards read by each rank are disjoint, and the stream's state is one integer, saved in checkpoints.

(A DALI reader with ``shard_id``/``num_shards`` would make each rank's samples depend on the world size, which the
distributed training contract rules out; the reader's job here is reading bytes at index offsets, which is cheap.)
"""
from __future__ import annotations

import importlib.util
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np
import torch

from hpc_gan.data.loader import EncodedDataset
from hpc_gan.data.streams import RankBatches, StreamBase
from hpc_gan.errors import UserError
from hpc_gan.plan import StepPlan


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


def require_dali() -> None:
    if not dali_available():
        raise UserError("data.backend=dali needs NVIDIA DALI, which is not installed: pip install -e .[dali] "
                        "(nvidia-dali-cuda120), or set data.backend=torch")


def decode_device(requested: str, device: torch.device) -> str:
    if requested == "mixed" and device.type != "cuda":
        raise UserError("data.decode_device=mixed decodes on a GPU, but this run is on the CPU; use "
                        "data.decode_device=cpu or auto")
    if requested == "auto":
        return "mixed" if device.type == "cuda" else "cpu"
    return requested


class DaliStream(StreamBase):
    """Endless per-rank batches of (images in [-1, 1] float NCHW on ``device``, labels int64), like RealStream."""

    def __init__(self, dataset: Any, plan: StepPlan, hflip: bool, device: torch.device, decoder: str = "auto",
                 threads: int = 4, resize: Optional[int] = None) -> None:
        require_dali()
        if not isinstance(dataset, EncodedDataset):
            raise UserError("data.backend=dali reads encoded images: use data.name=shards (hpc-gan prepare-data) "
                            "or folder; in-memory sets (synthetic, npz) use data.backend=torch")
        super().__init__(dataset, plan, hflip, device)
        self.decoder, self.threads, self.resize = decode_device(decoder, device), threads, resize

    def _source(self) -> Iterator[Tuple[List[np.ndarray], List[np.ndarray], List[np.ndarray]]]:
        k = self.consumed
        for idx in RankBatches(len(self.dataset), self.plan, self.consumed):
            flips = self.plan.flips(k) if self.hflip else torch.zeros(len(idx), dtype=torch.bool)
            enc = [np.frombuffer(self.dataset.read_bytes(i), dtype=np.uint8) for i in idx]
            labels = list(self.dataset.labels[torch.as_tensor(idx)].numpy())  # one gather per batch
            yield enc, labels, [np.asarray(int(f), dtype=np.int32) for f in flips]
            k += 1

    def _pipeline(self) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        source = self._source()

        # seed: DALI's own operators draw nothing here (flips come from the plan); any fixed value does
        @pipeline_def(batch_size=self.plan.local_batch, num_threads=self.threads,
                      device_id=(self.device.index or 0) if self.device.type == "cuda" else None,
                      seed=0, prefetch_queue_depth=2)
        def pipe():
            enc, labels, mirror = fn.external_source(source=lambda: next(source), num_outputs=3, batch=True,
                                                     dtype=[types.UINT8, types.INT64, types.INT32])
            images = fn.decoders.image(enc, device=self.decoder, output_type=types.RGB)
            if self.resize:  # raw class folders: BigGAN's centre square crop, then an antialiased resize
                images = fn.resize(images, resize_shorter=self.resize, antialias=True)
                images = fn.crop(images, crop=(self.resize, self.resize))
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                              mean=[127.5] * 3, std=[127.5] * 3)
            if self.decoder == "mixed":
                labels = labels.gpu()
            return images, labels

        p = pipe()
        p.build()
        return p

    def _iterator(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
        it = DALIGenericIterator([self._pipeline()], ["images", "labels"], auto_reset=False)
        for out in it:
            yield out[0]["images"], out[0]["labels"].reshape(-1)

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = self._iterator()
        images, labels = next(self._it)
        self.consumed += 1
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True).long()
