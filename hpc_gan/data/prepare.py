"""``hpc-gan prepare-data``: from what a user downloads to shards that DALI reads natively.

Sources: an ImageNet-style tree (``train/<class>/<image>`` or a folder of class folders), CIFAR-10/100 python
pickles, or an .npz with ``images`` (N, H, W, 3) uint8 and ``labels``. Every image gets BigGAN's preprocessing
(centre crop along the long edge to a square, then an area resize to the target resolution) and is written as one
sample of a webdataset shard: ``<key>.jpg`` (or ``.png``) + ``<key>.cls`` (the label, ASCII), with the index file
DALI's ``fn.readers.webdataset`` wants (``wds2idx`` format v1.2). Plus ``dataset.json``: classes, counts, shards,
skipped files and why.

Shards are written by a process pool, each atomically (``.tmp`` + rename; the index is written last and marks the
shard complete), so an interrupted run leaves nothing half-written and a re-run only does the missing shards.
Unreadable images are skipped, counted and listed.
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import pickle
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from hpc_gan.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")
FORMAT_VERSION = 1


class PrepareError(UserError):
    """A problem with prepare-data's input or output directory; one line with the fix."""


def center_square_resize(img: Image.Image, resolution: int) -> Image.Image:
    """BigGAN's preprocessing: centre crop to a square along the long edge, then an area (box) resize (bicubic
    where the image is smaller than the target)."""
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s == resolution:
        return img
    resample = Image.Resampling.BOX if s > resolution else Image.Resampling.BICUBIC
    return img.resize((resolution, resolution), resample=resample)


# ---- sources: (classes, items) where an item is (key, label, how to load it) -----------------------------------
def _tree_items(src: Path) -> Tuple[List[str], List[Tuple[str, int, Any]]]:
    root = src / "train" if (src / "train").is_dir() else src
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise PrepareError(f"{root} has no class folders; expected {root}/<class>/<image> (ImageNet's train/ layout)")
    items = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix in IMAGE_SUFFIXES and f.is_file():
                items.append((f"{label:05d}_{f.stem}", label, str(f)))
    if not items:
        raise PrepareError(f"no images ({', '.join(IMAGE_SUFFIXES[:5])}) under {root}/<class>/")
    return classes, items


_ARRAYS: Optional[np.ndarray] = None  # set before the pool forks; workers read rows from it


def _cifar_arrays(src: Path) -> Tuple[List[str], np.ndarray, np.ndarray]:
    for base in (src, src / "cifar-10-batches-py", src / "cifar-100-python"):
        batches = sorted(base.glob("data_batch_*"))
        if batches:  # CIFAR-10
            parts = [pickle.load(open(b, "rb"), encoding="bytes") for b in batches]
            data = np.concatenate([p[b"data"] for p in parts])
            labels = np.concatenate([np.asarray(p[b"labels"]) for p in parts])
            meta = base / "batches.meta"
            names = [n.decode() for n in pickle.load(open(meta, "rb"), encoding="bytes")[b"label_names"]] \
                if meta.exists() else [str(i) for i in range(10)]
            return names, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels
        if (base / "train").is_file():  # CIFAR-100
            d = pickle.load(open(base / "train", "rb"), encoding="bytes")
            meta = base / "meta"
            names = [n.decode() for n in pickle.load(open(meta, "rb"), encoding="bytes")[b"fine_label_names"]] \
                if meta.exists() else [str(i) for i in range(100)]
            return names, d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(d[b"fine_labels"])
    raise PrepareError(f"{src}: no CIFAR python pickles (data_batch_1..5, or train) found")


def _array_source(src: Path) -> Tuple[List[str], List[Tuple[str, int, Any]], np.ndarray]:
    if src.suffix == ".npz":
        with np.load(src) as z:
            if "images" not in z or "labels" not in z:
                raise PrepareError(f"{src}: needs arrays 'images' (N,H,W,3) uint8 and 'labels' (N,)")
            images, labels = z["images"], z["labels"]
        names = [str(i) for i in range(int(labels.max()) + 1)]
    else:
        names, images, labels = _cifar_arrays(src)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise PrepareError(f"{src}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    items = [(f"{int(y):05d}_{i:08d}", int(y), i) for i, y in enumerate(labels)]
    return names, items, images


def discover(src: Path) -> Tuple[str, List[str], List[Tuple[str, int, Any]], Optional[np.ndarray]]:
    """(kind, class names, items, in-memory arrays or None) of a source path."""
    if not src.exists():
        raise PrepareError(f"--src {src} does not exist")
    if src.is_file() and src.suffix == ".npz":
        names, items, arrays = _array_source(src)
        return "npz", names, items, arrays
    if src.is_dir() and (list(src.glob("data_batch_*")) or (src / "train").is_file()
                         or (src / "cifar-10-batches-py").is_dir() or (src / "cifar-100-python").is_dir()):
        names, items, arrays = _array_source(src)
        return "cifar", names, items, arrays
    if src.is_dir():
        names, items = _tree_items(src)
        return "tree", names, items, None
    raise PrepareError(f"--src {src}: expected an image tree, CIFAR python pickles or an .npz")


# ---- writing ---------------------------------------------------------------------------------------------------
def _load(ref: Any) -> Image.Image:
    if isinstance(ref, str):
        with Image.open(ref) as img:
            img.load()  # decode now: a truncated or corrupt file fails here, not later
            return img.copy()
    return Image.fromarray(_ARRAYS[ref])


def _encode(img: Image.Image, encoding: str) -> bytes:
    buf = io.BytesIO()
    if encoding == "jpg":
        img.save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(job: Tuple[str, List[Tuple[str, int, Any]], int, str]) -> Dict[str, Any]:
    """Write one shard (tar, sidecar json, then index: the index marks it complete)."""
    path, items, resolution, encoding = job
    tar_path, idx_path, meta_path = Path(path + ".tar"), Path(path + ".idx"), Path(path + ".json")
    skipped, labels = [], []
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, label, ref in items:
            try:
                data = _encode(center_square_resize(_load(ref), resolution), encoding)
            except Exception as e:  # noqa: BLE001 -- any decoder error means: skip and report this file
                skipped.append({"file": str(ref), "reason": f"{type(e).__name__}: {str(e)[:160]}"})
                continue
            _add(tar, f"{key}.{encoding}", data)
            _add(tar, f"{key}.cls", str(label).encode())
            labels.append(label)
    lines = []
    with tarfile.open(tmp) as tar:  # DALI's webdataset index v1.2: one line per sample, its components
        members = tar.getmembers()
        for img_m, cls_m in zip(members[0::2], members[1::2]):
            lines.append(f"{encoding} {img_m.offset_data} {img_m.size} {img_m.name} "
                         f"cls {cls_m.offset_data} {cls_m.size} {cls_m.name}")
    os.replace(tmp, tar_path)
    # the labels again, in order, so a reader gets them from one small file instead of one seek per sample
    _atomic_write(meta_path, json.dumps({"count": len(labels), "labels": labels, "skipped": skipped}))
    _atomic_write(idx_path, f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))
    return {"shard": tar_path.name, "count": len(labels), "skipped": skipped}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare(src: str, out: str, resolution: int, shard_size: int = 1000, workers: int = 0, encoding: str = "jpg",
            log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Prepare ``src`` into shards under ``out``; returns the report (also in ``out``/dataset.json)."""
    global _ARRAYS
    if encoding not in ("jpg", "png"):
        raise PrepareError(f"--encoding {encoding}: use jpg or png")
    if resolution < 8:
        raise PrepareError(f"--resolution {resolution}: too small; BigGAN presets use 32, 64, 128, 256")
    src_p, out_p = Path(src), Path(out)
    t0 = time.time()
    kind, names, items, arrays = discover(src_p)
    _ARRAYS = arrays
    out_p.mkdir(parents=True, exist_ok=True)
    settings = {"source": str(src_p.resolve()), "resolution": resolution, "encoding": encoding,
                "shard_size": shard_size, "items": len(items)}
    done_path = out_p / "dataset.json"
    if done_path.exists():
        old = json.loads(done_path.read_text())
        if old.get("settings") == settings:
            log(f"prepare-data: {out_p} is already prepared from {src_p} ({old['num_images']} images); nothing to do")
            return old
        raise PrepareError(f"{out_p} holds a data set prepared with other settings {old.get('settings')}; "
                           f"choose a new --out or delete it")
    jobs = []
    for k in range(0, len(items), shard_size):
        path = str(out_p / f"shard-{k // shard_size:06d}")
        if not Path(path + ".idx").exists():  # the index is written last: without it the shard is redone
            jobs.append((path, items[k:k + shard_size], resolution, encoding))
    n_shards = (len(items) + shard_size - 1) // shard_size
    log(f"prepare-data: {len(items)} images of {len(names)} classes ({kind}) -> {n_shards} shards of {shard_size} "
        f"at {resolution}px {encoding} in {out_p}; {n_shards - len(jobs)} shards already done")
    workers = workers or min(len(jobs), os.cpu_count() or 1) or 1
    done = 0
    if jobs:
        ctx = mp.get_context("fork")  # workers inherit the in-memory arrays of CIFAR / npz sources
        with ctx.Pool(workers) as pool:
            for i, res in enumerate(pool.imap_unordered(write_shard, jobs), 1):
                done += res["count"]
                rate = done / max(time.time() - t0, 1e-9)
                log(f"prepare-data: shard {i}/{len(jobs)} {res['shard']} ({res['count']} images, "
                    f"{len(res['skipped'])} skipped) | {rate:.0f} img/s")
    shards, skipped = [], []
    for k in range(n_shards):
        meta = json.loads((out_p / f"shard-{k:06d}.json").read_text())
        shards.append({"name": f"shard-{k:06d}.tar", "count": meta["count"]})
        skipped += meta["skipped"]
    total = sum(s["count"] for s in shards)
    report = {"format": FORMAT_VERSION, "settings": settings, "classes": names, "num_classes": len(names),
              "num_images": total, "resolution": resolution, "encoding": encoding, "shards": shards,
              "skipped": skipped, "seconds": round(time.time() - t0, 1)}
    _atomic_write(done_path, json.dumps(report, indent=1))
    (out_p / "classes.json").write_text(json.dumps({n: i for i, n in enumerate(names)}, indent=1))
    log(f"prepare-data: wrote {total} images in {n_shards} shards, skipped {len(skipped)}"
        + "".join(f"\n  skipped {s['file']}: {s['reason']}" for s in skipped[:20])
        + (f"\n  ... and {len(skipped) - 20} more (all in dataset.json)" if len(skipped) > 20 else ""))
    return report


def read_index(idx_path: Path) -> List[Dict[str, Tuple[int, int]]]:
    """Components of each sample of a shard: {ext: (offset, size)}."""
    lines = idx_path.read_text().splitlines()
    out = []
    for line in lines[1:]:
        parts = line.split()
        out.append({parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)})
    return out


__all__: Sequence[str] = ["prepare", "read_index", "center_square_resize", "PrepareError", "discover"]
