"""prepare-data (trees with a corrupt file, CIFAR pickles, .npz), the shards' native DALI readability, the DALI
CPU pipeline against the torch loader, rank coverage, resume, and the one-line errors."""
import importlib.util
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpc_gan.data.loader import FolderDataset, build_dataset
from hpc_gan.data.prepare import PrepareError, center_square_resize, prepare
from hpc_gan.data.shards import ShardDataset
from hpc_gan.data.streams import RealStream
from hpc_gan.errors import UserError
from hpc_gan.plan import StepPlan

HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI is not installed (pip install -e .[dali])")
CPU = torch.device("cpu")
SIZES = [(40, 30), (30, 50), (64, 64), (20, 24), (33, 33)]


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes x 5 images (JPEG and PNG, varied sizes) + one corrupt JPEG."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "eel"):
        (root / "train" / c).mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES):
            arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / "train" / c / f"im{i}.{'png' if i % 2 else 'jpg'}")
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    report = prepare(str(tree), str(out), 16, shard_size=4, workers=2, log=quiet)
    return out, report


def test_prepare_tree_counts_labels_resolution_and_skips_the_corrupt_file(tree, prepared):
    out, report = prepared
    assert report["num_images"] == 15 and report["classes"] == ["cat", "dog", "eel"]
    assert len(report["skipped"]) == 1 and report["skipped"][0]["file"].endswith("broken.jpg")
    assert len(report["shards"]) == 4 and not list(out.glob("*.tmp"))
    ds = ShardDataset(str(out), 16)
    assert ds.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    # the same preprocessing as the folder loader, up to JPEG (quality 95) re-encoding
    folder = FolderDataset(str(tree / "train"), 16)
    diff = (ds[2][0].float() - folder[2][0].float()).abs().mean()
    assert diff < 6, diff


def test_prepare_is_idempotent_and_resumes_missing_shards(tree, prepared, tmp_path):
    out, report = prepared
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(str(tree), str(out), 16, shard_size=4, workers=2, log=quiet)
    assert again == report and mtimes == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # an interrupted run: one shard's index (written last) and the final report missing
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    (copy / "shard-000002.idx").unlink()
    (copy / "dataset.json").unlink()
    keep = (copy / "shard-000001.tar").stat().st_mtime_ns
    logs = []
    redo = prepare(str(tree), str(copy), 16, shard_size=4, workers=1, log=logs.append)
    assert "3 shards already done" in logs[0] and redo["num_images"] == 15
    assert (copy / "shard-000001.tar").stat().st_mtime_ns == keep
    with pytest.raises(PrepareError, match="other settings"):
        prepare(str(tree), str(out), 32, shard_size=4, log=quiet)


def test_prepare_cifar_pickles_and_npz_losslessly(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (12, 3 * 32 * 32), dtype=np.uint8)
    labels = list(rng.integers(0, 10, 12))
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for b in range(2):
        with open(cifar / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump({b"data": data[b * 6:(b + 1) * 6], b"labels": labels[b * 6:(b + 1) * 6]}, f)
    report = prepare(str(tmp_path), str(tmp_path / "out"), 32, shard_size=5, encoding="png", log=quiet)
    assert report["num_images"] == 12 and report["num_classes"] == 10
    ds = ShardDataset(str(tmp_path / "out"), 32)
    images = data.reshape(-1, 3, 32, 32)
    for i in range(12):  # arrays keep their order
        x, y = ds[i]
        assert int(y) == labels[i] and torch.equal(x, torch.from_numpy(images[i]))  # PNG: lossless
    npz = tmp_path / "arrays.npz"
    np.savez(npz, images=images.transpose(0, 2, 3, 1)[:7], labels=np.asarray(labels[:7]))
    report = prepare(str(npz), str(tmp_path / "out_npz"), 16, shard_size=3, encoding="png", log=quiet)
    assert report["num_images"] == 7 and ShardDataset(str(tmp_path / "out_npz"), 16)[0][0].shape == (3, 16, 16)


def test_center_square_resize_crops_the_long_edge():
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, 10:20] = 255  # the centre square of a wide image is white
    out = np.asarray(center_square_resize(Image.fromarray(arr), 5))
    assert out.shape == (5, 5, 3) and out.min() == 255


@needs_dali
def test_dali_reads_the_shards_natively(prepared):
    from nvidia.dali import fn, pipeline_def
    out, _ = prepared
    tars = sorted(str(p) for p in out.glob("shard-*.tar"))

    @pipeline_def(batch_size=15, num_threads=1, device_id=None)
    def pipe():
        img, cls = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["jpg", "cls"])
        return fn.decoders.image(img, device="cpu"), cls
    p = pipe()
    p.build()
    images, cls = p.run()
    assert sorted(int(bytes(np.asarray(cls.at(i))).decode()) for i in range(15)) == [0] * 5 + [1] * 5 + [2] * 5
    assert all(np.asarray(images.at(i)).shape == (16, 16, 3) for i in range(15))


@needs_dali
@pytest.mark.parametrize("source,workers", [("shards", 0), ("folder", 0), ("shards", 2)],
                         ids=["shards", "folder", "shards-parallel-source"])
def test_dali_cpu_pipeline_equals_torch_loader_per_rank(prepared, tree, source, workers):
    """The same samples per rank and step as the torch loader; with workers, the file reads run in DALI's
    parallel external source (spawned processes), which must not change what each step gets."""
    from hpc_gan.data.dali import DaliStream
    if source == "folder":  # a raw tree without the corrupt file (raw folders are not cleaned; shards are)
        clean = prepared[0].parent / "clean_tree"
        if not clean.exists():
            subprocess.run(["cp", "-r", str(tree / "train"), str(clean)], check=True)
            (clean / "dog" / "broken.jpg").unlink()
        ds = FolderDataset(str(clean), 16)
    else:
        ds = ShardDataset(str(prepared[0]), 16)
    resize = 16 if source == "folder" else None
    seen = {0: [], 1: []}
    for rank in range(2):
        ref = RealStream(ds, StepPlan(6, world=2, rank=rank, seed=4), hflip=True, device=CPU)
        dali = DaliStream(ds, StepPlan(6, world=2, rank=rank, seed=4), hflip=True, device=CPU, decoder="cpu",
                          threads=1, resize=resize, workers=workers)
        for step in range(5):  # crosses epochs: 15 images, 2 global batches of 6 per epoch
            xr, yr = ref.next()
            xd, yd = dali.next()
            assert torch.equal(yr, yd), f"rank {rank} step {step}: labels {yr.tolist()} vs {yd.tolist()}"
            assert xd.shape == xr.shape == (3, 3, 16, 16) and xd.dtype == torch.float32
            # prepared shards: same decoder family (libjpeg-turbo), equal up to float rounding. Raw folders: PIL's
            # box filter vs DALI's antialiased resize, on pixel noise (the worst case): measured 0.19-0.24
            tol = 1e-5 if source == "shards" else 0.3
            assert (xd - xr).abs().mean() < tol, (source, rank, step, float((xd - xr).abs().mean()))
            seen[rank].append(yd)
    assert all(len(s) == 5 for s in seen.values())


@pytest.mark.parametrize("reader", ["torch-workers", pytest.param("dali", marks=needs_dali),
                                    pytest.param("dali-workers", marks=needs_dali)])
def test_a_damaged_image_is_one_line_naming_it(tree, reader):
    """A raw folder's damaged file, met in a DataLoader worker (which re-raises errors with its traceback as the
    message) or by DALI's decoder (whose error names no file): one line that names the file."""
    from hpc_gan.data.dali import DaliStream
    ds = FolderDataset(str(tree / "train"), 16)
    plan = StepPlan(6, seed=4)
    stream = RealStream(ds, plan, hflip=False, device=CPU, num_workers=2) if reader == "torch-workers" else \
        DaliStream(ds, plan, hflip=False, device=CPU, decoder="cpu", threads=1, resize=16,
                   workers=2 if reader == "dali-workers" else 0)
    with pytest.raises(UserError) as e:
        for _ in range(4):  # 16 files, batches of 6: the damaged one comes within the first epoch
            stream.next()
    assert str(e.value).count("\n") == 0 and "dog/broken.jpg: unreadable image" in str(e.value), str(e.value)


@needs_dali
def test_dali_ranks_are_disjoint_cover_the_epoch_and_resume(prepared):
    from hpc_gan.data.dali import DaliStream
    ds = ShardDataset(str(prepared[0]), 16)
    marked = ShardDataset(str(prepared[0]), 16)
    marked.labels = torch.arange(len(ds))  # labels as sample ids: what each rank read
    ids = []
    for rank in range(3):
        s = DaliStream(marked, StepPlan(15, world=3, rank=rank, seed=9), hflip=False, device=CPU, decoder="cpu",
                       threads=1)
        ids.append(s.next()[1])
    allids = torch.cat(ids)
    assert sorted(allids.tolist()) == list(range(15))  # one epoch, disjoint, complete
    a = DaliStream(ds, StepPlan(6, seed=2), hflip=True, device=CPU, decoder="cpu", threads=1)
    for _ in range(3):
        a.next()
    b = DaliStream(ds, StepPlan(6, seed=2), hflip=True, device=CPU, decoder="cpu", threads=1)
    b.load_state_dict(a.state_dict())
    xa, ya = a.next()
    xb, yb = b.next()
    assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_training_reads_prepared_shards(prepared, tiny_cfg):
    from hpc_gan.train.trainer import Trainer
    cfg = tiny_cfg("data.name=shards", f"data.path={prepared[0]}", "data.num_classes=3", "train.batch_size=6")
    assert isinstance(build_dataset(cfg.data, 16, 0), ShardDataset)
    tr = Trainer(cfg, CPU)
    tr.train_step()
    assert all(np.isfinite(v) for v in tr.pop_metrics().values())


def test_clear_errors_for_missing_dali_and_gpu_only_options(prepared, tree, tiny_cfg):
    from hpc_gan.data.streams import build_stream
    cfg = tiny_cfg("data.name=shards", f"data.path={prepared[0]}", "data.num_classes=3", "data.decode_device=mixed")
    ds = ShardDataset(str(prepared[0]), 16)
    with pytest.raises(UserError, match="decode_device=mixed decodes on a GPU.*decode_device=cpu"):
        build_stream(cfg, ds, StepPlan.from_config(cfg), CPU)
    code = ("import sys; sys.modules['nvidia.dali'] = None\n"
            "from hpc_gan.data.dali import require_dali\n"
            "require_dali()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode != 0 and "pip install -e .[dali]" in proc.stderr
    with pytest.raises(UserError, match="prepare-data"):
        ShardDataset(str(prepared[0].parent), 16)
    with pytest.raises(UserError, match="broken.jpg: unreadable image.*prepare-data"):
        FolderDataset(str(tree / "train"), 16)[5]
    with pytest.raises(UserError, match="prepared at 16px"):
        ShardDataset(str(prepared[0]), 32)
    for name, path in (("shards", prepared[0]), ("folder", tree / "train")):  # named classes: the count is exact
        for n in (2, 5):
            cfg = tiny_cfg(f"data.name={name}", f"data.path={path}", f"data.num_classes={n}")
            with pytest.raises(UserError, match=f"has 3 classes but data.num_classes={n}; set data.num_classes=3"):
                build_dataset(cfg.data, 16, 0)


def test_encoded_datasets_declare_what_they_are(prepared, tree):
    from hpc_gan.data import EncodedDataset, InMemoryDataset
    for ds in (ShardDataset(str(prepared[0]), 16), FolderDataset(str(tree / "train"), 16)):
        assert isinstance(ds, EncodedDataset) and not isinstance(ds, InMemoryDataset)


def test_raw_folders_are_refused_beyond_one_node(tree, tiny_cfg):
    """Above 8 ranks a class-folder data set is refused in one line that names prepare-data; at 8 it loads."""
    cfg = tiny_cfg("data.name=folder", f"data.path={tree / 'train'}", "data.num_classes=3")
    with pytest.raises(UserError, match=r"data.name=folder at 16 ranks.*hpc-gan prepare-data.*data.name=shards") as e:
        build_dataset(cfg.data, 16, 0, world=16)
    assert "\n" not in str(e.value)
    assert len(build_dataset(cfg.data, 16, 0, world=8)) > 0
