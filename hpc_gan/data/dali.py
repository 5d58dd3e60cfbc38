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
import itertools
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np
import torch

from hpc_gan.data.loader import EncodedDataset
from hpc_gan.data.streams import StreamBase, to_device
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


class RankBatchSource:
    """Encoded bytes, labels and mirror flags of this rank's share of global batch ``start + iteration``, for
    ``fn.external_source`` in batch mode. Stateless given the batch index (the plan decides everything), so DALI can
    run it in its worker processes (``parallel=True``): file reads leave the training thread, and several batches are
    read ahead at once. Picklable: spawned workers rebuild it (a shard set reopens its memory maps there)."""

    def __init__(self, dataset: Any, plan: StepPlan, hflip: bool, start: int) -> None:
        self.dataset, self.plan, self.hflip, self.start = dataset, plan, hflip, start

    def batch(self, k: int) -> Tuple[List[np.ndarray], List[np.ndarray], List[np.ndarray]]:
        idx = self.plan.rank_indices(len(self.dataset), k)
        flips = self.plan.flips(k) if self.hflip else torch.zeros(len(idx), dtype=torch.bool)
        enc = [np.frombuffer(self.dataset.read_bytes(int(i)), dtype=np.uint8) for i in idx]
        labels = [np.asarray(v, dtype=np.int64) for v in self.dataset.labels[idx].numpy()]  # one gather
        return enc, labels, [np.asarray(int(f), dtype=np.int32) for f in flips]

    def __call__(self, info: Any) -> Tuple[List[np.ndarray], List[np.ndarray], List[np.ndarray]]:
        return self.batch(self.start + info.iteration)  # info: DALI's BatchInfo (iteration counts from 0)


class DaliStream(StreamBase):
    """Endless per-rank batches of (images in [-1, 1] float NCHW on ``device``, labels int64), like RealStream.
    ``workers`` > 0: the source runs in that many DALI worker processes (0: on the training thread, the reference)."""

    def __init__(self, dataset: Any, plan: StepPlan, hflip: bool, device: torch.device, decoder: str = "auto",
                 threads: int = 4, resize: Optional[int] = None, workers: int = 0) -> None:
        require_dali()
        if not isinstance(dataset, EncodedDataset):
            raise UserError("data.backend=dali reads encoded images: use data.name=shards (hpc-gan prepare-data) "
                            "or folder; in-memory sets (synthetic, npz) use data.backend=torch")
        super().__init__(dataset, plan, hflip, device)
        self.decoder, self.threads, self.resize = decode_device(decoder, device), threads, resize
        self.workers = workers

    def _pipeline(self) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        source = RankBatchSource(self.dataset, self.plan, self.hflip, self.consumed)
        dtypes = [types.UINT8, types.INT64, types.INT32]
        serial = (source.batch(k) for k in itertools.count(self.consumed))

        # seed: DALI's own operators draw nothing here (flips come from the plan); any fixed value does.
        # spawn, not fork: the training process may already hold a CUDA context
        @pipeline_def(batch_size=self.plan.local_batch, num_threads=self.threads,
                      device_id=(self.device.index or 0) if self.device.type == "cuda" else None,
                      seed=0, prefetch_queue_depth=2, py_num_workers=max(1, self.workers), py_start_method="spawn")
        def pipe():
            if self.workers:
                enc, labels, mirror = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                                         parallel=True, prefetch_queue_depth=self.workers,
                                                         dtype=dtypes)
            else:
                enc, labels, mirror = fn.external_source(source=lambda: next(serial), num_outputs=3, batch=True,
                                                         dtype=dtypes)
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
        if self.workers:
            p.start_py_workers()
        p.build()
        return p

    def _decode_failure(self, error: RuntimeError) -> str:
        """One line for DALI's failure to decode an image (its own message names no file): the first sample of the
        batches DALI may have been decoding (this one and those read ahead) that the torch path cannot read
        either, in that dataset's words."""
        for k in range(self.consumed, self.consumed + 3 + self.workers):  # prefetch depth 2, + the workers' queue
            for i in self.plan.rank_indices(len(self.dataset), k):
                try:
                    self.dataset[int(i)]
                except UserError as e:
                    return f"DALI could not decode an image: {e}"
                except OSError as e:
                    return f"DALI could not decode sample {int(i)} of data.path ({e}); prepare the data again"
        reason = next((line.strip() for line in str(error).splitlines() if "failure" in line.lower()), "")
        return (f"DALI could not decode an image ({reason or 'see its log'}), which the torch path reads; try "
                f"data.backend=torch")

    def _iterator(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
        it = DALIGenericIterator([self._pipeline()], ["images", "labels"], auto_reset=False)
        for out in it:
            yield out[0]["images"], out[0]["labels"].reshape(-1)

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = self._iterator()
        try:
            images, labels = next(self._it)
        except RuntimeError as e:
            if "decoders.image" not in str(e):
                raise
            raise UserError(self._decode_failure(e)) from None
        self.consumed += 1
        return to_device(images, self.device), to_device(labels, self.device).long()
