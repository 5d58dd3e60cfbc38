"""The data stream: world-size independent global batches, epoch coverage, exact resume, and the three sources."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from PIL import Image

from hpc_gan.data.loader import ArrayDataset, FolderDataset, build_dataset
from hpc_gan.data.streams import RealStream
from hpc_gan.data.synthetic import make_synthetic
from hpc_gan.errors import UserError
from hpc_gan.plan import StepPlan

CPU = torch.device("cpu")


def _array_ds(n=40):
    images, labels = make_synthetic(n, 16, 10, seed=3)
    return ArrayDataset(images, labels)


def test_an_in_memory_gather_equals_indexing():
    """ArrayDataset.gather (rows of a flat view, index_select) against plain indexing, repeats and odd sizes."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (13, 7, 5, 3), generator=g, dtype=torch.uint8).numpy()
    ds = ArrayDataset(images, torch.arange(13).numpy())
    for n in (1, 5, 13, 20):
        idx = torch.randint(0, 13, (n,), generator=g)
        x, y = ds.gather(idx)
        assert x.shape == (n, 3, 7, 5) and torch.equal(x, ds.images[idx]) and torch.equal(y, idx)


def test_ranks_slice_the_same_global_batch():
    ds = _array_ds()
    one = RealStream(ds, StepPlan(8, seed=1), hflip=True, device=CPU)
    two = [RealStream(ds, StepPlan(8, world=2, rank=r, seed=1), hflip=True, device=CPU) for r in range(2)]
    for _ in range(7):  # crosses an epoch boundary (5 batches per epoch)
        x1, y1 = one.next()
        parts = [s.next() for s in two]
        assert torch.equal(x1, torch.cat([p[0] for p in parts])) and torch.equal(y1, torch.cat([p[1] for p in parts]))


def test_flips_mirror_the_images_the_plan_says():
    """hflip mirrors exactly the images that the plan's flips name, left to right, and leaves the others."""
    ds = _array_ds()
    plan = StepPlan(8, seed=5)
    flipped, plain = (RealStream(ds, plan, hflip=h, device=CPU) for h in (True, False))
    seen = []
    for k in range(3):
        (xf, yf), (xp, yp) = flipped.next(), plain.next()
        seen += plan.flips(k).tolist()
        want = torch.stack([x.flip(-1) if f else x for x, f in zip(xp, seen[-8:])])
        assert torch.equal(yf, yp) and torch.equal(xf, want)
    assert 0 < sum(seen) < len(seen)  # both kinds were checked


def test_an_epoch_covers_the_data_once():
    plan = StepPlan(8, seed=0)
    idx = torch.cat([plan.batch_indices(43, k) for k in range(5)])  # 5 full batches, 3 dropped
    assert len(set(idx.tolist())) == 40
    assert not torch.equal(plan.batch_indices(43, 0), plan.batch_indices(43, 5))  # new epoch order


def test_resume_continues_the_order():
    ds = _array_ds()
    a = RealStream(ds, StepPlan(8, seed=2), hflip=True, device=CPU)
    for _ in range(3):
        a.next()
    b = RealStream(ds, StepPlan(8, seed=2), hflip=True, device=CPU)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        xa, ya = a.next()
        xb, yb = b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.min() >= -1 and xa.max() <= 1 and xa.dtype == torch.float32


def test_folder_and_npz_sources(tmp_path):
    images, labels = make_synthetic(12, 16, 3, seed=0)
    for i, (img, y) in enumerate(zip(images, labels)):
        (tmp_path / "tree" / f"class{y}").mkdir(parents=True, exist_ok=True)
        big = np.repeat(np.repeat(img, 2, 0), 2, 1)[:, 4:]     # 32x28: exercises the centre crop and resize
        Image.fromarray(np.ascontiguousarray(big)).save(tmp_path / "tree" / f"class{y}" / f"{i}.png")
    folder = FolderDataset(str(tmp_path / "tree"), 16)
    assert folder.classes == ["class0", "class1", "class2"] and len(folder) == 12
    x, y = folder[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    stream = RealStream(folder, StepPlan(4), hflip=False, device=CPU, num_workers=0)
    xb, yb = stream.next()
    assert xb.shape == (4, 3, 16, 16) and yb.shape == (4,)

    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    cfg = SimpleNamespace(name="npz", path=str(tmp_path / "d.npz"), num_classes=3)
    assert len(build_dataset(cfg, 16, 0)) == 12
    with pytest.raises(UserError, match="data.num_classes=2"):
        build_dataset(SimpleNamespace(name="npz", path=str(tmp_path / "d.npz"), num_classes=2), 16, 0)
    with pytest.raises(UserError, match="change model.resolution"):
        build_dataset(cfg, 32, 0)
    with pytest.raises(UserError, match="class folders"):
        FolderDataset(str(tmp_path / "d.npz"), 16)


def test_synthetic_is_balanced_and_deterministic():
    a, la = make_synthetic(100, 16, 10, seed=5)
    b, lb = make_synthetic(100, 16, 10, seed=5)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert np.bincount(la).tolist() == [10] * 10


def test_datasets_declare_what_they_are():
    from hpc_gan.data import EncodedDataset, InMemoryDataset
    ds = _array_ds()
    assert isinstance(ds, InMemoryDataset) and not isinstance(ds, EncodedDataset)
