"""Device launches of one training iteration, counted on a CPU: the aten ops a TorchDispatchMode sees (less
allocations, views and the copies Triton's interpreter makes to move arguments) plus the Triton kernels launched
through the interpreter. A device-independent proxy for the CUDA kernels of an iteration with the Triton backends.

    python scripts/step_launches.py [CONFIG] [overrides...]

Defaults: configs/imagenet128_reacgan_b2048.yaml with ch 16, batch 8, 10 classes, fp32 on the CPU, and
model.sn_backend=triton loss.backend=triton (docs/benchmarks.md, "Since the first GPU run", has the numbers).
Three steps in Triton's interpreter: about 20 minutes on the 2-core development machine.
"""
import collections
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from hpc_gan.config import load  # noqa: E402
from hpc_gan.train.trainer import Trainer  # noqa: E402

HOST_SIDE = {"empty", "empty_like", "new_empty", "set_", "select", "t", "detach", "view", "empty_strided",
             "_unsafe_view", "alias", "as_strided", "slice", "unsqueeze", "squeeze", "expand", "permute",
             "transpose", "reshape", "split", "unbind", "_to_copy", "lift_fresh", "copy_"}


class AtenOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main(argv):
    config = argv[0] if argv and argv[0].endswith(".yaml") else "configs/imagenet128_reacgan_b2048.yaml"
    overrides = argv[1:] if argv and argv[0].endswith(".yaml") else argv
    torch.set_num_threads(2)
    launches: collections.Counter = collections.Counter()
    run = InterpretedFunction.run

    def counted(self, *a, **k):
        launches[self.fn.__name__] += 1
        return run(self, *a, **k)
    InterpretedFunction.run = counted
    cfg = load(config, ["model.g_ch=16", "model.d_ch=16", "data.num_classes=10", "data.name=synthetic",
                        "data.synthetic_size=64", "train.batch_size=8", "train.demo_classifier=false",
                        "run.device=cpu", "train.precision=fp32", "model.sn_backend=triton", "loss.backend=triton",
                        "train.log_every=1000", "run.tensorboard=false", "run.dir=/tmp/step_launches", *overrides])
    trainer = Trainer(cfg, torch.device("cpu"))
    trainer.train_step()
    trainer.train_step()  # plans, autotuning and caches are built
    launches.clear()
    with AtenOps() as ops:
        trainer.train_step()
    device = {k: v for k, v in ops.counts.items() if k not in HOST_SIDE}
    print(f"{sum(device.values()) + sum(launches.values())} launches per iteration: {sum(device.values())} aten "
          f"ops, {sum(launches.values())} Triton kernels {dict(launches)}")
    print("largest:", ", ".join(f"{k} {v}" for k, v in collections.Counter(device).most_common(12)))


if __name__ == "__main__":
    main(sys.argv[1:])
