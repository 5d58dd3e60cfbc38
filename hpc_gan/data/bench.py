"""``hpc-gan bench --data``: images/s of the DALI and torch pipelines over the same prepared shards (a benchmark,
not a test). Without a prepared set, one is made from generated 128 px JPEGs in a temporary directory."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch


def _make_set(root: Path, n: int, resolution: int) -> Path:
    from PIL import Image

    from hpc_gan.data.prepare import prepare
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:resolution + 32, 0:resolution + 16]
    for i in range(n):  # smooth colour fields with noise: JPEG sizes like photos, not like flat colour
        d = root / "src" / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        f = rng.random(6)
        img = np.stack([np.sin(xx * f[0] / 9 + f[3] * 6) + np.cos(yy * f[1] / 7), np.sin(yy * f[2] / 5),
                        np.cos((xx + yy) * f[4] / 11)], -1)
        img = ((img - img.min()) / (np.ptp(img) + 1e-9) * 200 + rng.random(img.shape) * 55).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i}.jpg", quality=90)
    prepare(str(root / "src"), str(root / "shards"), resolution, shard_size=256, log=lambda s: None)
    return root / "shards"


def _rate(stream: Any, batches: int, batch: int) -> float:
    stream.next()  # warm-up: workers / pipeline start
    t0 = time.perf_counter()
    for _ in range(batches):
        x, _ = stream.next()
    if x.is_cuda:
        torch.cuda.synchronize()
    return batches * batch / (time.perf_counter() - t0)


def bench_data(path: Optional[str], device: torch.device, batch: int = 64, batches: int = 20, workers: int = 2,
               threads: int = 2, resolution: int = 128, log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    from hpc_gan.data.dali import DaliStream, dali_available
    from hpc_gan.data.shards import ShardDataset
    from hpc_gan.data.streams import RealStream
    from hpc_gan.plan import StepPlan
    plan = StepPlan(batch)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(path) if path else _make_set(Path(tmp), max(2 * batch, 512), resolution)
        ds = ShardDataset(str(root), resolution)
        rows = [{"pipeline": f"torch DataLoader ({workers} workers, PIL decode)", "device": str(device),
                 "img_per_s": _rate(RealStream(ds, plan, True, device, num_workers=workers), batches, batch)}]
        if dali_available():
            decoder = "mixed" if device.type == "cuda" else "cpu"
            stream = DaliStream(ds, plan, True, device, decoder=decoder, threads=threads)
            rows.append({"pipeline": f"DALI ({decoder} decode, {threads} threads)", "device": str(device),
                         "img_per_s": _rate(stream, batches, batch)})
            rows[-1]["vs_torch"] = rows[-1]["img_per_s"] / rows[0]["img_per_s"]
        else:
            log("bench --data: DALI is not installed (pip install -e .[dali]); torch pipeline only")
    for r in rows:
        r.update(resolution=resolution, batch=batch, images=len(ds))
    return rows
