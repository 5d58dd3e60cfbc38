"""Real images for training as a stream of per-rank batches that does not depend on the number of ranks.

Global batch k of a run always holds the same sample indices and the same flips (:class:`hpc_gan.plan.StepPlan`);
each rank takes its positions of it. The stream's state is one integer (global batches consumed), saved in
checkpoints, so a resumed run continues the exact order. :func:`build_stream` picks the torch or the DALI pipeline.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from hpc_gan.data.loader import EncodedDataset, InMemoryDataset
from hpc_gan.errors import UserError
from hpc_gan.plan import StepPlan


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without making the host wait for the GPU: CUDA runs a copy from pageable host memory
    only after the work already queued on the stream, and blocks the host until then (one stall per step, which
    lost the host its lead on the device). CPU tensors are staged in pinned memory (torch's caching host allocator:
    no allocation once warm; a DataLoader's pinned batches are used as they are)."""
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class RankBatches:
    """batch_sampler for a DataLoader: this rank's sample indices of each global batch, from batch ``start`` on."""

    def __init__(self, n: int, plan: StepPlan, start: int) -> None:
        self.n, self.plan, self.start = n, plan, start

    def __iter__(self) -> Iterator[List[int]]:
        k = self.start
        while True:
            yield self.plan.rank_indices(self.n, k).tolist()
            k += 1

    def __len__(self) -> int:  # an endless stream; DataLoader only needs the attribute
        return 2 ** 62


class StreamBase:
    """What every real-image stream shares: the plan, and a state that is one integer (global batches consumed)."""

    def __init__(self, dataset: Any, plan: StepPlan, hflip: bool, device: torch.device) -> None:
        self.dataset, self.plan, self.hflip, self.device = dataset, plan, hflip, device
        self.consumed = 0
        self._it: Optional[Iterator] = None

    def state_dict(self) -> Dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.consumed = int(state["consumed"])
        self._it = None


class RealStream(StreamBase):
    """Endless per-rank batches of (images in [-1, 1] float NCHW on ``device``, labels int64), torch pipeline."""

    def __init__(self, dataset: Any, plan: StepPlan, hflip: bool, device: torch.device, num_workers: int = 0) -> None:
        super().__init__(dataset, plan, hflip, device)
        self.num_workers = num_workers

    def _iterator(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        sampler = RankBatches(len(self.dataset), self.plan, self.consumed)
        pin = self.device.type == "cuda"  # batches in pinned memory: copied to the GPU without a staging copy
        if isinstance(self.dataset, InMemoryDataset):  # one gather per batch, no workers needed
            for idx in sampler:
                yield self.dataset.gather(torch.as_tensor(idx), pin=pin)
        yield from DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers, pin_memory=pin,
                              persistent_workers=self.num_workers > 0)

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = self._iterator()
        try:
            images, labels = next(self._it)
        except UserError as e:  # from a DataLoader worker, which re-raises it with its traceback as the message
            raise UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]) from None
        flip = self.plan.flips(self.consumed) if self.hflip else None
        self.consumed += 1
        images = to_device(images, self.device).float().div_(127.5).sub_(1.0)
        if flip is not None:  # on the device: the pinned batch goes over as it came
            images = torch.where(to_device(flip, self.device)[:, None, None, None], images.flip(3), images)
        return images, to_device(labels, self.device)


def build_stream(cfg: Any, dataset: Any, plan: StepPlan, device: torch.device) -> StreamBase:
    """RealStream (torch) or DaliStream for ``data.backend`` (auto: DALI where it is installed, the run is on a
    GPU and the data set is encoded images; torch otherwise)."""
    from hpc_gan.data.dali import DaliStream, dali_available, decode_device
    d = cfg.data
    backend = d.backend
    if backend == "auto":
        encoded = isinstance(dataset, EncodedDataset)
        backend = "dali" if encoded and device.type == "cuda" and dali_available() else "torch"
    if backend == "torch":
        decode_device(d.decode_device, device)  # the same one-line error for a GPU-only option on a CPU
        return RealStream(dataset, plan, d.hflip, device, d.num_workers)
    resize = cfg.model.resolution if d.name == "folder" else None
    return DaliStream(dataset, plan, d.hflip, device, d.decode_device, d.dali_threads, resize, d.dali_workers)
