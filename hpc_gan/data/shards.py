"""A data set prepared by ``hpc-gan prepare-data``: webdataset shards read by random access through their index.

Sample i's encoded bytes are read straight out of its shard (memory-mapped) at the offset the index gives, so both
pipelines follow the trainer's global-batch order exactly: the torch path decodes them with PIL in DataLoader
workers, the DALI path hands them to DALI's decoder (nvJPEG on GPUs)."""
from __future__ import annotations

import io
import json
import mmap
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from hpc_gan.data.prepare import center_square_resize, read_index
from hpc_gan.errors import UserError


class ShardDataset(Dataset):
    def __init__(self, root: str, resolution: int) -> None:
        self.root = Path(root)
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise UserError(f"data.path={root} has no dataset.json; prepare it with `hpc-gan prepare-data "
                            f"--src <images> --out {root} --resolution {resolution}`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta["resolution"] != resolution:
            raise UserError(f"data.path={root} was prepared at {self.meta['resolution']}px but model.resolution="
                            f"{resolution}; prepare it again with --resolution {resolution}")
        self.resolution, self.classes = resolution, self.meta["classes"]
        self.shard_paths, shard, offset, size, labels = [], [], [], [], []
        for s, entry in enumerate(self.meta["shards"]):
            tar = self.root / entry["name"]
            self.shard_paths.append(str(tar))
            comps = read_index(tar.with_suffix(".idx"))
            labels += json.loads(tar.with_suffix(".json").read_text())["labels"]
            for comp in comps:
                ext = next(k for k in comp if k != "cls")
                shard.append(s)
                offset.append(comp[ext][0])
                size.append(comp[ext][1])
        if len(labels) != len(shard):
            raise UserError(f"data.path={root}: shard indexes list {len(shard)} images but their sidecars "
                            f"{len(labels)} labels; prepare it again")
        self.shard, self.offset, self.size = np.asarray(shard), np.asarray(offset), np.asarray(size)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self._maps: Dict[int, mmap.mmap] = {}  # opened lazily, per process (DataLoader workers fork)

    def __len__(self) -> int:
        return len(self.labels)

    def read_bytes(self, i: int) -> bytes:
        s = int(self.shard[i])
        if s not in self._maps:
            with open(self.shard_paths[s], "rb") as f:
                self._maps[s] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        o = int(self.offset[i])
        return self._maps[s][o:o + int(self.size[i])]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image
        with Image.open(io.BytesIO(self.read_bytes(i))) as im:
            im = im.convert("RGB")
            if im.size != (self.resolution, self.resolution):
                im = center_square_resize(im, self.resolution)
            arr = np.asarray(im, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), self.labels[i]

    def __getstate__(self) -> dict:  # mmaps do not pickle (spawned workers): reopen there
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state
