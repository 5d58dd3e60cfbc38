"""One rank of a multi-process test, started by tests/test_dist.py through torchrun, mpiexec or a faked srun
environment. Usage: dist_worker.py MODE OUT_DIR [JSON]; rank 0 (or every rank, for "init") writes results to OUT_DIR.

MODE init   detect the launcher, create the process group, all-reduce the ranks, write rank-<r>.json
MODE bn     CrossReplicaBatchNorm2d forward/backward on this rank's slice of a seeded global batch
MODE steps  one full training step per case (config overrides in JSON), weights written by rank 0
MODE eval   sharded sampling + features of a tiny G, gathered; rank 0 writes them
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from hpc_gan.config import load  # noqa: E402
from hpc_gan.dist import launch  # noqa: E402


def mode_init(out: Path, info: launch.DistInfo) -> None:
    total = torch.tensor([float(info.rank)])
    dist.all_reduce(total)
    record = {"rank": info.rank, "local_rank": info.local_rank, "world": info.world, "local_world": info.local_world,
              "launcher": info.launcher, "master": f"{info.master_addr}:{info.master_port}", "backend": info.backend}
    record["rank_sum"] = float(total)
    (out / f"rank-{info.rank}.json").write_text(json.dumps(record))


def bn_case(scale: float = 2.0, shift: float = 0.7):
    """The global batch, upstream gradient and BN parameters every process and the single-process reference share."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, 3, 4, generator=g) * scale + shift
    grad = torch.randn(6, 5, 3, 4, generator=g)
    w, b = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    return x, grad, w, b


def mode_bn(out: Path, info: launch.DistInfo, case: dict) -> None:
    from hpc_gan.dist.batchnorm import CrossReplicaBatchNorm2d
    x, grad, w, b = bn_case(**case)
    n = x.shape[0] // info.world
    sl = slice(info.rank * n, (info.rank + 1) * n)
    bn = CrossReplicaBatchNorm2d(5, eps=1e-4, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    xl = x[sl].clone().requires_grad_()
    y = bn(xl)
    y.backward(grad[sl])
    parts = {"y": y.detach(), "dx": xl.grad}
    gathered = {}
    for key, t in parts.items():
        chunks = [torch.empty_like(t) for _ in range(info.world)]
        dist.all_gather(chunks, t.contiguous())
        gathered[key] = torch.cat(chunks)
    # weight/bias grads are local sums: their sum over ranks is the full-batch gradient
    for key, t in (("dw", bn.weight.grad), ("db", bn.bias.grad)):
        t = t.clone()
        dist.all_reduce(t)
        gathered[key] = t
    gathered["running_mean"], gathered["running_var"] = bn.running_mean, bn.running_var
    if info.rank == 0:
        torch.save(gathered, out / "bn.pt")


BN_STATS = ("running_mean", "running_var")


def mode_steps(out: Path, info: launch.DistInfo, cases: list) -> None:
    from hpc_gan.train.trainer import Trainer
    for i, overrides in enumerate(cases):
        cfg = load(ROOT / "configs" / "demo.yaml", overrides)
        tr = Trainer(cfg, torch.device("cpu"), info)
        tr.train_step(diagnostics=True)
        sharded = tr.ema.stale  # ZeRO: each rank averaged only its own master slices
        if not cfg.dist.sync_bn or 0 < cfg.dist.bn_group_size < info.world:  # each rank's own BN statistics,
            # before the check averages them
            torch.save({k: v.clone() for k, v in tr.g.module.state_dict().items() if k.endswith(BN_STATS)},
                       out / f"case-{i}-bn-rank{info.rank}.pt")
        tr.check_replicas()     # assembles G_ema first
        state = {"G": tr.g.weights_state_dict(), "D": tr.d.weights_state_dict(),
                 "G_ema": tr.ema_model().state_dict(), "metrics": tr.pop_metrics(), "ema_sharded": sharded}
        if info.rank == 0:
            torch.save(state, out / f"case-{i}.pt")
        del tr


def eval_case():
    """A tiny G and the tiny backbone that every process and the single-process reference share."""
    from hpc_gan.eval.backbones import TinyBackbone
    from hpc_gan.models import biggan
    torch.manual_seed(3)
    return biggan.Generator(16, 4, 5, 24, 8).eval(), TinyBackbone()


def mode_eval(out: Path, info: launch.DistInfo) -> None:
    from hpc_gan.eval.evaluate import sample_features
    from hpc_gan.plan import RandomStreams
    G, backbone = eval_case()
    feats = sample_features(G, backbone, 250, 5, 24, RandomStreams(7), truncation=0.8, batch=40)  # 7 uneven chunks
    small = sample_features(G, backbone, 30, 5, 24, RandomStreams(7), batch=40)  # one chunk: rank 1 computes none
    if info.rank == 0:
        torch.save({k: torch.from_numpy(v) for k, v in feats.items()}, out / "eval.pt")
        torch.save({k: torch.from_numpy(v) for k, v in small.items()}, out / "eval_small.pt")


def main() -> None:
    torch.set_num_threads(1)  # here, not at import: test_dist and test_eval import the cases into pytest's process
    mode, out = sys.argv[1], Path(sys.argv[2])
    info = launch.init(timeout_s=120, device_type="cpu")
    try:
        if mode == "init":
            mode_init(out, info)
        elif mode == "bn":
            mode_bn(out, info, json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
        elif mode == "eval":
            mode_eval(out, info)
        elif mode == "steps":
            mode_steps(out, info, json.loads(sys.argv[3]))
        else:
            raise SystemExit(f"unknown mode {mode}")
    finally:
        launch.shutdown(info)


if __name__ == "__main__":
    main()
