"""The GPU check pack's runner and command line: each stage in its own process group with a time box (what a stage
leaves of its box goes to the next), the report rewritten after every stage (see docs/gpu-check.md)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from hpc_gan.gpucheck import stages
from hpc_gan.gpucheck.common import CASES_ENV, ROOT, STAGE_DIR_ENV, Save, run_boxed
from hpc_gan.gpucheck.report import write_report
from hpc_gan.gpucheck.train_cases import FASTEST_LABELS, case_key, stage_train, train_case, train_cases

# (name, stage, seconds allowed on a GPU, seconds allowed in smoke mode): 480 s in all on one H100, under the 8 minutes
# that one call may take (the H100 runs took 380 and 476 s, the H200 runs 482-484 s). What a stage leaves of its box
# goes to the next one, so the whole call stays within the sum; train runs last and gets all the short stages left
# (~30-40 s): its compiled cases need minutes on a cold machine, and no other stage's time is as uncertain.
# From the H200's fifth run (2026-11-27), on a fresh machine: kernels' 16 shapes took 86.6 s (90 s and env's leftover
# hold them); sn 29.6 s; tests ran out of 63 s with 86 of its 93 tests done (42 s on the warm machine): 75 s; layers
# keeps 30 s (most of its 63.5 s were convolutions timed without cuDNN, ~10x slow); train's first case, CUDA graphs
# at 256 per GPU, took 120 s to its first step: 155 s and the short stages' leftovers hold it.
Stage = Callable[[bool, float, Save], Dict[str, Any]]  # (smoke, deadline, save) -> its numbers
STAGES: List[Tuple[str, Stage, int, int]] = [
    ("env", stages.stage_env, 15, 60), ("accuracy", stages.stage_accuracy, 45, 120),
    ("kernels", stages.stage_kernels, 90, 120), ("sn", stages.stage_sn, 35, 120),
    ("layers", stages.stage_layers, 30, 60), ("tests", stages.stage_tests, 75, 240),
    ("determinism", stages.stage_determinism, 20, 120), ("dali", stages.stage_dali, 7, 60),
    ("deepspeed", stages.stage_deepspeed, 8, 60), ("train", stage_train, 155, 240),
]


def run_stage(name: str, smoke: bool, deadline: float, save: Optional[Save] = None) -> Dict[str, Any]:
    stage = next(fn for stage_name, fn, _, _ in STAGES if stage_name == name)
    return stage(smoke, deadline, save or (lambda partial: None))


def _child(name: str, smoke: bool, deadline: float, out: Path) -> int:
    """One stage, in this process: its result to ``out`` as JSON (and its partial results as it goes)."""
    t0 = time.time()

    def save(partial: Dict[str, Any]) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({**partial, "name": name, "seconds": round(time.time() - t0, 1)}, default=str))
        tmp.replace(out)  # whole files only: the parent may read it after killing this process
    try:
        result = run_stage(name, smoke, deadline, save)
        result.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001 -- a stage's failure is its result
        result = {"status": "fail", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                  "traceback": traceback.format_exc()[-2000:]}
    result.update(name=name, seconds=round(time.time() - t0, 1))
    out.write_text(json.dumps(result, indent=1, default=str))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu-check.sh",
                                description="the GPU check pack (see docs/gpu-check.md)")
    p.add_argument("--out", default="runs/gpu-check", help="where report.json and report.md go")
    p.add_argument("--smoke", action="store_true", help="every stage at toy sizes on the CPU (Triton interpreter)")
    p.add_argument("--stages", nargs="*", default=[s for s, _, _, _ in STAGES], help="a subset of the stages")
    p.add_argument("--cases", nargs="*", default=[], metavar="BATCH:MODE",
                   help="the train stage's cases to run, in this order (e.g. 256:compile 32:cuda_graphs); default all")
    p.add_argument("--seconds", type=float, default=None,
                   help="the whole call's time: the last stage chosen gets what the others leave of it (default: the "
                        "chosen stages' boxes added up, 480 s for all of them on a GPU)")
    p.add_argument("--child", nargs=3, metavar=("STAGE", "DEADLINE", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--train-case", nargs="+", help=argparse.SUPPRESS)  # PRESET OUT STEPS WARMUP OVERRIDES...
    args = p.parse_args(argv)
    if args.train_case or args.child:  # the stages and train cases compute (on the CPU, in smoke mode)
        from hpc_gan.mkl_vml import warm_vml_dispatch
        warm_vml_dispatch()  # before their first threaded CPU math (hpc_gan.mkl_vml)
    if args.train_case:
        preset, out, steps, warmup, *overrides = args.train_case
        return train_case(preset, out, int(steps), int(warmup), overrides)
    if args.child:
        return _child(args.child[0], args.smoke, float(args.child[1]), Path(args.child[2]))
    import torch
    smoke = args.smoke or not torch.cuda.is_available()
    names = [s for s, _, _, _ in STAGES]
    if set(args.stages) - set(names):
        p.error(f"--stages {' '.join(x for x in args.stages if x not in names)}: no such stage; "
                f"the stages are {' '.join(names)}")
    _, _, cases = train_cases(smoke, wanted=[])  # all of them, to check --cases against
    # the fastest-layers cases exist once the layers stage has run: named before it, they are known here
    fastest_keys = [case_key(cases[0][0], label) for label in FASTEST_LABELS[:1 if smoke else None]]
    keys = [case_key(b, label) for b, label, _ in cases] + fastest_keys
    if set(args.cases) - set(keys):
        p.error(f"--cases {' '.join(x for x in args.cases if x not in keys)}: no such train case here; "
                f"the cases are {' '.join(dict.fromkeys(keys))}")
    needs_layers = [k for k in args.cases if k in fastest_keys]
    if needs_layers and "layers" not in args.stages:  # the H200's second call, 2026-11-27, spent a start on this
        p.error(f"--cases {needs_layers[0]} runs what the layers stage found fastest: add layers to --stages "
                f"(--stages layers train)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                              "command": " ".join(["scripts/gpu-check.sh", *(argv if argv is not None else
                                                                               sys.argv[1:])]),
                              "smoke": smoke, "stages": []}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    if smoke:
        env["TRITON_INTERPRET"] = "1"  # the kernels run on the CPU, in Triton's interpreter
    stage_dir = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # DIR keeps the two reports alone
    env[STAGE_DIR_ENV] = str(stage_dir)  # a later stage may read an earlier one's result (train reads layers)
    env[CASES_ENV] = " ".join(args.cases)
    chosen = [(name, smoke_s if smoke else gpu_s) for name, _, gpu_s, smoke_s in STAGES if name in args.stages]
    end = time.time() + (args.seconds or sum(box for _, box in chosen))
    spare = 0.0  # seconds the stages so far left of their boxes
    for i, (name, box) in enumerate(chosen):
        left = end - time.time()
        limit = round(left if i == len(chosen) - 1 else min(box + spare, left))
        if limit < 1:
            report["stages"].append({"name": name, "status": "skip", "seconds": 0.0,
                                     "why": "out of time (--seconds)"})
            write_report(out_dir, report)
            continue
        out = stage_dir / f"stage-{name}.json"
        t0 = time.time()
        print(f"gpu-check: {name} (at most {limit} s) ...", flush=True)
        cmd = [sys.executable, "-m", "hpc_gan.gpucheck", "--child", name, str(t0 + limit), str(out)]
        rc, stderr = run_boxed(cmd + (["--smoke"] if smoke else []), env, limit)
        result = json.loads(out.read_text()) if out.exists() else {"name": name}  # partial, if it was cut off
        if rc is None:
            result.update(status="timeout", error=f"over its {limit} s")
        elif rc != 0:  # died (a crash, a CUDA error): keep what it saved, with the reason
            result.update(status="fail", error=(stderr.strip().splitlines() or [f"exit {rc}"])[-1][:300])
        result["seconds"] = round(time.time() - t0, 1)
        spare = max(0.0, limit - result["seconds"])
        report["stages"].append(result)
        write_report(out_dir, report)
        print(f"gpu-check: {name}: {result['status']} in {result['seconds']} s", flush=True)
    bad = [s["name"] for s in report["stages"] if s["status"] in ("fail", "timeout")]
    print(f"gpu-check: report in {out_dir}/report.md" + (f"; not ok: {', '.join(bad)}" if bad else "; all ok"))
    return 1 if bad else 0

