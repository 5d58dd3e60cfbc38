"""Real images for training, as a stream of global batches that does not depend on the number of ranks.

Step k of a run always draws the same global batch of sample indices (an epoch-wise permutation seeded by
``train.seed``, last partial batch dropped) and the same flips; each rank takes its positions of it (``rank_positions``). The stream's
state is one integer (global batches consumed), saved in checkpoints, so a resumed run continues the exact order.
"""
from __future__ import annotations

import functools

from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ArrayDataset(Dataset):
    """Images already in memory: uint8 (N, H, W, 3) and int64 labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class FolderDataset(Dataset):
    """A folder of class folders (ImageNet's train/ layout); classes are the sorted folder names. Images are
    centre-cropped along the long edge and area-resized to the model resolution (BigGAN's preprocessing)."""

    def __init__(self, root: str, resolution: int) -> None:
        rootp = Path(root)
        if not rootp.is_dir():
            raise FileNotFoundError(f"data.path={root} is not a directory; point it at a folder of class folders")
        self.classes = sorted(p.name for p in rootp.iterdir() if p.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"data.path={root} has no class folders; expected {root}/<class>/<image>")
        self.files: List[Tuple[Path, int]] = [
            (f, c) for c, name in enumerate(self.classes)
            for f in sorted((rootp / name).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise FileNotFoundError(f"data.path={root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
        self.resolution = resolution
        self.labels = torch.tensor([c for _, c in self.files], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.files)

    def read_bytes(self, i: int) -> bytes:
        return self.files[i][0].read_bytes()

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        from hpc_gan.data.prepare import center_square_resize
        path, label = self.files[i]
        try:
            with Image.open(path) as im:
                arr = np.asarray(center_square_resize(im, self.resolution), dtype=np.uint8)
        except OSError as e:
            raise ValueError(f"{path}: unreadable image ({e}); remove it, or train from `hpc-gan prepare-data` "
                             f"shards, which skips and lists such files") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), torch.tensor(label)


def load_npz(path: str) -> Tuple[np.ndarray, np.ndarray]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"data.path={path} does not exist; give an .npz with 'images' and 'labels'")
    with np.load(path) as f:
        missing = {"images", "labels"} - set(f.files)
        if missing:
            raise ValueError(f"{path} lacks arrays {sorted(missing)}; it needs images (N,H,W,3) uint8 and labels (N,)")
        images, labels = f["images"], f["labels"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
    return images, labels


def build_dataset(data_cfg: Any, resolution: int, seed: int) -> Dataset:
    if data_cfg.name == "synthetic":
        from hpc_gan.data.synthetic import make_synthetic
        images, labels = make_synthetic(data_cfg.synthetic_size, resolution, data_cfg.num_classes, seed=seed)
        return ArrayDataset(images, labels)
    if data_cfg.name == "npz":
        images, labels = load_npz(data_cfg.path)
        if images.shape[1] != resolution or images.shape[2] != resolution:
            raise ValueError(f"{data_cfg.path}: images are {images.shape[1]}x{images.shape[2]} but "
                             f"model.resolution={resolution}; resize them or change model.resolution")
        ds = ArrayDataset(images, labels)
    elif data_cfg.name == "shards":
        from hpc_gan.data.shards import ShardDataset
        ds = ShardDataset(data_cfg.path, resolution)
    else:
        ds = FolderDataset(data_cfg.path, resolution)
    n_labels = int(ds.labels.max()) + 1
    if n_labels > data_cfg.num_classes:
        raise ValueError(f"data.path={data_cfg.path} has {n_labels} classes but data.num_classes="
                         f"{data_cfg.num_classes}; set data.num_classes={n_labels}")
    return ds


def global_batch_indices(n: int, batch: int, seed: int, k: int) -> torch.Tensor:
    """Sample indices of global batch k: batches walk an epoch-wise permutation, dropping the last partial one."""
    per_epoch = n // batch
    if per_epoch == 0:
        raise ValueError(f"the data set has {n} images, fewer than one global batch of {batch}")
    epoch, pos = divmod(k, per_epoch)
    return _epoch_permutation(n, seed, epoch)[pos * batch:(pos + 1) * batch]


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    # cached: a permutation of ImageNet costs ~10 ms, too much to redo every step
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def flip_mask(batch: int, seed: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7_368_787 + k + 1)
    return torch.rand(batch, generator=g) < 0.5


def rank_positions(batch: int, world: int, rank: int, micro: int) -> torch.Tensor:
    """Positions in the global batch that rank ``rank`` trains on, micro-batch after micro-batch.

    The global batch is laid out micro-batch-major: accumulation step m covers the contiguous chunk
    [m * world * micro, (m + 1) * world * micro), split over the ranks in order. So the samples that meet in one
    synchronized BN or one global-negatives D2D-CE are the same whatever the world size: 2 ranks x micro B see exactly
    what 1 rank x micro 2B sees. With no accumulation this is the plain contiguous per-rank slice."""
    if batch % (world * micro):
        raise ValueError(f"global batch {batch} is not micro-batch {micro} x accumulation x {world} ranks")
    chunks = [torch.arange(m * world * micro + rank * micro, m * world * micro + (rank + 1) * micro)
              for m in range(batch // (world * micro))]
    return torch.cat(chunks)


class _RankSlices:
    """batch_sampler for a DataLoader: this rank's positions of each global batch, from batch ``start`` on."""

    def __init__(self, n: int, batch: int, seed: int, start: int, positions: torch.Tensor) -> None:
        self.n, self.batch, self.seed, self.start, self.positions = n, batch, seed, start, positions

    def __iter__(self) -> Iterator[List[int]]:
        k = self.start
        while True:
            yield global_batch_indices(self.n, self.batch, self.seed, k)[self.positions].tolist()
            k += 1

    def __len__(self) -> int:  # an endless stream; DataLoader only needs the attribute
        return 2 ** 62


class StreamBase:
    """What every real-image stream shares: this rank's positions of each global batch, and a state that is one
    integer (global batches consumed)."""

    def __init__(self, dataset: Any, batch: int, seed: int, hflip: bool, device: torch.device, rank: int, world: int,
                 micro: int) -> None:
        self.positions = rank_positions(batch, world, rank, micro or batch // world)
        self.dataset, self.batch, self.seed, self.hflip = dataset, batch, seed, hflip
        self.device, self.rank, self.world = device, rank, world
        self.consumed = 0
        self._it: Optional[Iterator] = None

    def state_dict(self) -> Dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.consumed = int(state["consumed"])
        self._it = None


class RealStream(StreamBase):
    """Endless per-rank batches of (images in [-1, 1] float NCHW on ``device``, labels int64)."""

    def __init__(self, dataset: Dataset, batch: int, seed: int, hflip: bool, device: torch.device,
                 rank: int = 0, world: int = 1, num_workers: int = 0, micro: int = 0) -> None:
        super().__init__(dataset, batch, seed, hflip, device, rank, world, micro)
        self.num_workers = num_workers

    def _iterator(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        sampler = _RankSlices(len(self.dataset), self.batch, self.seed, self.consumed, self.positions)
        if isinstance(self.dataset, ArrayDataset):  # in memory: one gather per batch, no workers needed
            for idx in sampler:
                yield self.dataset.gather(torch.as_tensor(idx))
        yield from DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                              pin_memory=self.device.type == "cuda", persistent_workers=self.num_workers > 0)

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = self._iterator()
        images, labels = next(self._it)
        if self.hflip:
            flip = flip_mask(self.batch, self.seed, self.consumed)[self.positions]
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        self.consumed += 1
        images = images.to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
        return images, labels.to(self.device, non_blocking=True)
