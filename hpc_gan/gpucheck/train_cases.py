"""The GPU check pack's train stage: the BigGAN-128 ReACGAN step in bf16 at 32 and 256 samples per GPU, eager,
compiled and under CUDA graphs, each case in a fresh process (``train_case``), the most telling first, each started
only where what is left of the stage's box holds it."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from hpc_gan.gpucheck.common import CASES_ENV, ROOT, STAGE_DIR_ENV, Save, run_boxed

Case = Tuple[int, str, Optional[List[str]]]  # a train case: (batch per GPU, label, config overrides or None)
# seconds a train case takes on a fresh H200 (2026-11-27), by its label's first word, at 256 per GPU and at 32: most
# of it is the first step (eager 28 s at 256 and 7 s at 32: cuDNN's benchmark, Triton's autotuning; compiled 78-88 s
# at either in the fourth run, 120 s at 256 and 94 s at 32 in the fifth, with the fused resampling convolutions:
# dynamo and inductor build 4 graphs), ~10 s of start-up and ~20 s of timed and profiled steps
CASE_SECONDS = {"eager": (45, 25), "compile": (150, 125), "cuda_graphs": (150, 125)}
# train.compile_tuning: each fused kernel timed once (a few hundred, ~25 ms each), then the few slower than
# compile_tuning.TUNE_ABOVE_MS tuned (~10 configs each, compiled one after another): a guess, not yet measured
TUNING_SECONDS = 60


def case_seconds(batch: int, label: str) -> int:
    """What a train case needs of the box on a GPU (``CASE_SECONDS``): the 256-per-GPU figure above 64 per GPU, the
    32 one at or below; ``TUNING_SECONDS`` more for a tuned case."""
    at_256, at_32 = CASE_SECONDS[label.split()[0]]
    return (at_256 if batch > 64 else at_32) + (TUNING_SECONDS if "tuned" in label.split() else 0)


FASTEST_LABELS = ("eager fastest layers", "cuda_graphs fastest layers")  # CUDA graphs: on a GPU only
TRAIN_KEYS = ("sec_per_step", "samples_per_s_per_device", "tflops_per_device", "mfu", "executed_flops_utilization",
              "gpu_busy", "host_bound", "aten_ops_per_iteration", "cuda_kernels_per_iteration",
              "kernel_device_ms_per_iteration",
              "first_step_seconds", "peak_memory_gib", "peak_reserved_gib", "phase_ms_per_step",
              "phase_host_ms_per_step", "kernel_ms_by_kind", "top_kernels_by_kind", "top_kernels", "top_ops",
              "top_op_shapes", "inductor_kernels", "host_wait_ms_per_iteration", "host_waits")


def train_cases(smoke: bool, wanted: Optional[List[str]] = None) -> Tuple[Path, List[str], List[Case]]:
    """(preset, overrides for all, [(batch per GPU, label, overrides)]): the most telling first. CUDA graphs at 256
    (where the MFU goal is measured: 54.0-54.1% on the H200, 2026-11-27), eager at 256 (the defaults without
    graphs), CUDA graphs at 32 (the operating point: host time), eager at 32, compile at 256 and at 32; then, if time
    is left, the layers stage's fastest pooling, upsampling, attention, RGB and resampling convolutions where the
    defaults run others (``FASTEST_LABELS``: eager, and under CUDA graphs), CUDA graphs with inductor's kernels
    tuned (train.compile_tuning), CUDA graphs at 32 with the SN weights as static inputs (model.sn_static_weights:
    no copy into the graphs per replay), and cuDNN's heuristics in place of its benchmarked algorithms
    (train.cudnn_benchmark). On a fresh H200 an eager case at 256 takes ~45 s and a compiled or CUDA-graph one up to
    ~150 s, 120 s of it the first step, so the stage (155 s plus what the stages before it left) runs the first one
    or two and skips any case that cannot finish (``case_seconds``): a second call, ``--stages train --cases ...
    --seconds ...``, runs the others. All channels-last (auto's choice on CUDA; NCHW ran 12% slower in both runs
    of the first H100 session).
    ``wanted``: the keys to run (default: ``--cases``, as the train stage's process gets them; [] for all)."""
    fastest, fastest_compiled = fastest_layers_overrides(), fastest_layers_overrides(compiled=True)
    if smoke:
        cases = [(8, "eager", [])] + ([(8, FASTEST_LABELS[0], fastest)] if fastest else [])
        return ROOT / "configs" / "demo.yaml", ["model.g_ch=8", "model.d_ch=8", "run.device=cpu"], \
            _pick_cases(cases, wanted)
    nhwc = ["model.memory_format=channels_last"]
    compiled = ["train.compile=default", *nhwc]
    graphs = ["train.cuda_graphs=true", *nhwc]
    cases = [(256, "cuda_graphs", graphs), (256, "eager", nhwc), (32, "cuda_graphs", graphs), (32, "eager", nhwc),
             (256, "compile", compiled), (32, "compile", compiled)] + \
        ([(256, FASTEST_LABELS[0], [*fastest, *nhwc])] if fastest else []) + \
        ([(256, FASTEST_LABELS[1], [*fastest_compiled, *graphs])] if fastest_compiled else []) + \
        [(256, "cuda_graphs tuned", ["train.compile_tuning=true", *graphs]),
         (32, "cuda_graphs static sn", ["model.sn_static_weights=true", *graphs]),
         (256, "eager no cudnn benchmark", ["train.cudnn_benchmark=false", *nhwc])]
    return ROOT / "configs" / "imagenet128_reacgan_b2048.yaml", ["train.precision=bf16"], _pick_cases(cases, wanted)


def case_key(batch: int, label: str) -> str:
    return f"{batch}:{label.replace(' ', '_')}"


def _pick_cases(cases: List[Case], wanted: Optional[List[str]]) -> List[Case]:
    """The cases ``wanted`` names (as BATCH:MODE, in its order; None: those ``--cases`` named), else all. A
    fastest-layers case named where the layers stage found nothing faster than the defaults (or left no result)
    comes back with overrides None, for the stage to report as skipped: it would only repeat another case, and the
    cases named after it still run (a call that named it must not lose them)."""
    wanted = os.environ.get(CASES_ENV, "").split() if wanted is None else wanted
    if not wanted:
        return cases
    by_key = {case_key(b, label): (b, label, flags) for b, label, flags in cases}
    fastest = {case_key(b, label): (b, label, None) for b in {b for b, _, _ in cases} for label in FASTEST_LABELS}
    unknown = [k for k in wanted if k not in by_key and k not in fastest]
    if unknown:
        raise ValueError(f"--cases {' '.join(unknown)}: not a train case here; the cases are {', '.join(by_key)}")
    return [by_key.get(k) or fastest[k] for k in wanted]


def fastest_layers_overrides(compiled: bool = False) -> List[str]:
    """Overrides that put the layers stage's fastest pooling, upsampling, attention, RGB and resampling
    convolutions in place of what the defaults run on the device ("auto"'s choices, "sdpa", "conv2d"), so a step
    case checks the op-level winners at the step level, eager and (``compiled``) under CUDA graphs, where the MFU
    goal is measured and inductor may fuse a formulation differently; [] when the defaults won or the stage did not
    run. Compiled, a winning pool_impl=nearest_grad is left out: it does not compile on CUDA
    (train.trainer.compile_mode)."""
    from hpc_gan.config import ModelConfig
    from hpc_gan.models.layers import auto_resample
    from hpc_gan.models.resample_conv import resolve
    stage_dir = os.environ.get(STAGE_DIR_ENV)
    path = Path(stage_dir) / "stage-layers.json" if stage_dir else None
    if path is None or not path.exists():
        return []
    stage = json.loads(path.read_text())
    device, resample_conv = stage.get("device", "cuda"), stage.get("resample_conv_best") or {}
    # (config key, fastest, what the defaults run there): a fastest that the defaults already run is named, harmlessly
    fastest = [(f"{k}_impl", v, auto_resample(k, device)) for k, v in stage.get("best", {}).items()] + \
        [("attn_impl", stage.get("attention_best"), ModelConfig.attn_impl)] + \
        [(f"{side}_rgb_conv_impl", v, getattr(ModelConfig, f"{side}_rgb_conv_impl"))
         for side, v in (stage.get("rgb_conv_best") or {}).items()] + \
        [(key, resample_conv.get(side), resolve(getattr(ModelConfig, key), kind, device))
         for key, side, kind in (("g_upconv_impl", "g", "up"), ("d_downconv_impl", "d", "down"))]
    fastest = [(k, v, default) for k, v, default in fastest
               if v is not None and not (compiled and (k, v) == ("pool_impl", "nearest_grad"))]
    if all(v == default for _, v, default in fastest):
        return []
    return [f"model.{k}={v}" for k, v, _ in fastest]


def stage_train(smoke: bool, deadline: float, save: Save) -> Dict[str, Any]:
    """Each case in a fresh process: torch.compile's caches live per process and are keyed by code, not by model
    instance, so a second trainer in one process would run the first one's compiled (or given-up) frames."""
    preset, extra, cases = train_cases(smoke)
    common = ["data.name=synthetic", "data.num_classes=10", "train.standing_stats=0", "run.tensorboard=false"]
    results: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch, label, flags in cases:
            if flags is None:  # a fastest-layers case with nothing faster to run (_pick_cases)
                results.append({"batch": batch, "mode": label, "status": "skip",
                                "why": "the layers stage found nothing faster than the defaults, or left no result: "
                                       "it would repeat the defaults' case"})
                continue
            left = deadline - time.time() - 5
            need = 20 if smoke else case_seconds(batch, label)
            if left < need:  # skipped, not started: a case cut off by the box reports nothing and spends the lease
                results.append({"batch": batch, "mode": label, "status": "skip",
                                "why": f"out of time (needs ~{need} s, {max(0, left):.0f} s left)"})
                continue
            started = time.time()
            out = Path(tmp) / "case.json"
            out.unlink(missing_ok=True)
            overrides = common + extra + flags + [f"train.batch_size={batch}", f"data.synthetic_size={2 * batch}"]
            # the cudagraphs log only where graphs are captured: elsewhere it names every op of every graph
            cudagraphs = any("cuda_graphs=true" in f for f in flags)
            env = dict(os.environ, TORCH_LOGS="recompiles,graph_breaks" + (",cudagraphs" if cudagraphs else ""))
            cmd = [sys.executable, "-m", "hpc_gan.gpucheck", "--train-case", str(preset), str(out),
                   "3" if smoke else "8", "1" if smoke else "3", *overrides]
            rc, err = run_boxed(cmd, env, left)
            row: Dict[str, Any] = {"batch": batch, "mode": label, "seconds": round(time.time() - started, 1)}
            if out.exists():  # whole, or what the case knew when its box ran out (its step time, say)
                row.update(json.loads(out.read_text()))
            if rc != 0:
                row.update(status="timeout" if rc is None else "fail")
            # what dynamo and the CUDA-graph trees said (recompiles, graph breaks, skipped graphs), and any error
            said = [x for x in err.splitlines() if any(k in x for k in ("recompil", "graph break", "Graph break",
                                                                        "cudagraph", "skipping", "Error", "error"))]
            if rc != 0:
                row["stderr"] = err[-2500:]
            elif said:
                row["stderr"] = "\n".join(said)[-2500:]
            results.append(row)
            save({"status": "ok", "runs": results})
    failed = any(r.get("status") in ("fail", "timeout") for r in results)
    return {"status": "fail" if failed else "ok", "runs": results}


def train_case(preset: str, out: str, steps: int, warmup: int, overrides: List[str]) -> int:
    """One training benchmark (the child process of stage_train): its numbers to ``out``."""
    from hpc_gan.config import load
    from hpc_gan.train.bench import bench_train
    import torch._dynamo

    def partial(known: Dict[str, Any]) -> None:  # what a case stopped by its box still reports
        Path(out).write_text(json.dumps(known, default=str))
    r = bench_train(load(Path(preset), overrides), steps=steps, warmup=warmup, progress=partial)
    row = {k: r[k] for k in TRAIN_KEYS}
    # graphs dynamo compiled in this process: 4 for a compiled ReACGAN step (G with and without grad, D in each
    # update), each once; more means recompiles
    row["compiled_graphs"] = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
    # graphs inductor would not capture under train.cuda_graphs (their reasons are in the case's stderr)
    row["cudagraph_skips"] = torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)
    Path(out).write_text(json.dumps(row, default=str))
    return 0
