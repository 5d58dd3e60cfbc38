"""Data sets of real images: the embedded synthetic set and .npz arrays (in memory), class folders and prepared
shards (encoded images). Two protocols say what the rest of the code may rely on: :class:`InMemoryDataset` (uint8
images already decoded, gathered by index) and :class:`EncodedDataset` (the encoded bytes of sample i, which DALI
decodes). The streams that turn a data set into per-rank batches are in streams.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Protocol, Tuple, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset

from hpc_gan.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@runtime_checkable
class InMemoryDataset(Protocol):
    """Decoded uint8 images (N, 3, H, W) and int64 labels (N,) in memory."""
    images: torch.Tensor
    labels: torch.Tensor

    def gather(self, idx: torch.Tensor, pin: bool = False) -> Tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class EncodedDataset(Protocol):
    """Encoded images (JPEG, PNG) read by index, and int64 labels (N,)."""
    labels: torch.Tensor

    def read_bytes(self, i: int) -> bytes: ...


class ArrayDataset(Dataset):
    """Images already in memory: uint8 (N, H, W, 3) and int64 labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, idx: torch.Tensor, pin: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images and labels ``idx`` as one batch. Each image is copied whole as a row of a flat view (index_select:
        0.12 ms for 32 images at 128 px on the development CPU, where indexing the 4-D tensor took 0.86: on a GPU run
        this is host time in every D step), into pinned memory where ``pin`` (then copied to a GPU without a
        staging copy)."""
        flat = self.images.view(len(self.images), -1)
        out = torch.empty((len(idx), flat.shape[1]), dtype=flat.dtype, pin_memory=pin)
        torch.index_select(flat, 0, idx, out=out)
        return out.view(len(idx), *self.images.shape[1:]), self.labels[idx]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class FolderDataset(Dataset):
    """A folder of class folders (ImageNet's train/ layout); classes are the sorted folder names. Images are
    centre-cropped along the long edge and area-resized to the model resolution (BigGAN's preprocessing)."""

    def __init__(self, root: str, resolution: int) -> None:
        rootp = Path(root)
        if not rootp.is_dir():
            raise UserError(f"data.path={root} is not a directory; point it at a folder of class folders")
        self.classes = sorted(p.name for p in rootp.iterdir() if p.is_dir())
        if not self.classes:
            raise UserError(f"data.path={root} has no class folders; expected {root}/<class>/<image>")
        self.files: List[Tuple[Path, int]] = [
            (f, c) for c, name in enumerate(self.classes)
            for f in sorted((rootp / name).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise UserError(f"data.path={root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
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
            raise UserError(f"{path}: unreadable image ({e}); remove it, or train from `hpc-gan prepare-data` "
                            f"shards, which skips and lists such files") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), torch.tensor(label)


def load_npz(path: str) -> Tuple[np.ndarray, np.ndarray]:
    if not Path(path).is_file():
        raise UserError(f"data.path={path} does not exist; give an .npz with 'images' and 'labels'")
    with np.load(path) as f:
        missing = {"images", "labels"} - set(f.files)
        if missing:
            raise UserError(f"{path} lacks arrays {sorted(missing)}; it needs images (N,H,W,3) uint8 and labels (N,)")
        images, labels = f["images"], f["labels"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"{path}: images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
    return images, labels


FOLDER_MAX_RANKS = 8  # beyond one node, every rank walking ~1.3M files at start-up floods a shared file system


def build_dataset(data_cfg: Any, resolution: int, seed: int, world: int = 1) -> Dataset:
    """The data set of ``data.name``. Raw class folders are refused above FOLDER_MAX_RANKS ranks: each rank lists
    and stats every file at start-up and opens one file per sample; prepared shards are a few large files read at
    index offsets."""
    if data_cfg.name == "folder" and world > FOLDER_MAX_RANKS:
        raise UserError(f"data.name=folder at {world} ranks (more than {FOLDER_MAX_RANKS}): every rank would list "
                        f"every file under {data_cfg.path or 'data.path'}; prepare shards once (hpc-gan prepare-data "
                        f"--src {data_cfg.path or 'DIR'} --out OUT --resolution {resolution}) and set "
                        f"data.name=shards data.path=OUT")
    if data_cfg.name == "synthetic":
        from hpc_gan.data.synthetic import make_synthetic
        images, labels = make_synthetic(data_cfg.synthetic_size, resolution, data_cfg.num_classes, seed=seed)
        return ArrayDataset(images, labels)
    if data_cfg.name == "npz":
        images, labels = load_npz(data_cfg.path)
        if images.shape[1] != resolution or images.shape[2] != resolution:
            raise UserError(f"{data_cfg.path}: images are {images.shape[1]}x{images.shape[2]} but "
                            f"model.resolution={resolution}; resize them or change model.resolution")
        ds = ArrayDataset(images, labels)
    elif data_cfg.name == "shards":
        from hpc_gan.data.shards import ShardDataset
        ds = ShardDataset(data_cfg.path, resolution)
    else:
        ds = FolderDataset(data_cfg.path, resolution)
    named = getattr(ds, "classes", None)  # folders and shards name their classes: the count is exact
    if named is not None and len(named) != data_cfg.num_classes:
        raise UserError(f"data.path={data_cfg.path} has {len(named)} classes but data.num_classes="
                        f"{data_cfg.num_classes}; set data.num_classes={len(named)}")
    n_labels = int(ds.labels.max()) + 1
    if n_labels > data_cfg.num_classes:
        raise UserError(f"data.path={data_cfg.path} has {n_labels} classes but data.num_classes="
                        f"{data_cfg.num_classes}; set data.num_classes={n_labels}")
    return ds
