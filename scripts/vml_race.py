"""How often a fresh process's first tanh is wrong, with and without hpc_gan.mkl_vml's guard (a measurement, not a
test: the race needs many processes and a busy machine).

    python scripts/vml_race.py [--procs N] [--parallel P]

Where it was found: a tiny CPU run resumed from its step-24 checkpoint, G's output tanh in the first step after
the resume (8 x 3 x 16 x 16, split over 2 intra-op threads). Each child process builds the trainer, loads the
checkpoint, runs one step under a dispatch mode that compares every tanh with float64, and prints the first call's
largest error. ``--procs`` children per arm, ``--parallel`` at a time, half of each arm (a loaded machine widens
the race window), so both arms see the same load. Prints, per arm, how many first calls were off by more than
1e-6 (a correct float32 tanh is off by ~3e-8 at most).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY = ["model.g_ch=8", "model.d_ch=8", "model.embed_dim=16", "data.synthetic_size=256", "train.batch_size=8",
        "train.sample_every=1000", "train.demo_classifier=false", "run.tensorboard=false", "train.standing_stats=0",
        "train.log_every=1000"]


def child(run_dir: str, guard: bool) -> None:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import hpc_gan.train.trainer as trainer_module
    from hpc_gan.config import load
    from hpc_gan.train import checkpoint

    if not guard:  # the trainer's own call is the process's first: without it, nothing settles MKL's choice
        trainer_module.warm_vml_dispatch = lambda: None
    cfg = load(os.path.join(ROOT, "configs", "demo.yaml"), TINY + [f"run.dir={run_dir}-child"])
    trainer = trainer_module.Trainer(cfg, torch.device("cpu"))
    trainer.load_state_dict(checkpoint.load_consolidated(checkpoint.latest(os.path.join(run_dir, "checkpoints"))))
    errors = []

    class TanhErrors(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.tanh.default and out.dtype == torch.float32:
                errors.append((out.double() - torch.tanh(args[0].double())).abs().max().item())
            return out

    with TanhErrors():
        trainer.train_step()
    print(json.dumps(errors))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=60, help="child processes per arm")
    ap.add_argument("--parallel", type=int, default=2, help="children at a time, half of each arm")
    ap.add_argument("--child", nargs=2, metavar=("RUN_DIR", "GUARD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1] == "1")
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        subprocess.run([sys.executable, "-m", "hpc_gan.cli", "train", "--config",
                        os.path.join(ROOT, "configs", "demo.yaml"), *TINY, "train.steps=24",
                        "train.checkpoint_every=24", f"run.dir={run}"], check=True, capture_output=True, cwd=ROOT)
        bad, done, per = {True: 0, False: 0}, 0, max(1, args.parallel // 2)
        while done < args.procs:
            wave = [(guard, subprocess.Popen([sys.executable, __file__, "--child", run, str(int(guard))],
                                             stdout=subprocess.PIPE, text=True, cwd=ROOT))
                    for _ in range(per) for guard in (False, True)]
            for guard, proc in wave:
                out = proc.communicate()[0]
                if proc.returncode:
                    sys.exit(f"vml_race.py: a child failed (exit {proc.returncode}); its traceback is above")
                first = json.loads(out.strip().splitlines()[-1])[0]
                bad[guard] += first > 1e-6
            done += per
            print(f"\r{done}/{args.procs} per arm: first tanh wrong in {bad[False]} without the guard, "
                  f"{bad[True]} with it", end="", flush=True)
        print()


if __name__ == "__main__":
    main()
