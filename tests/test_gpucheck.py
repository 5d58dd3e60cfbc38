"""The GPU check pack (scripts/gpu-check.sh, hpc_gan.gpucheck) on this CPU: every stage in smoke mode, the train
cases it picks and skips, its time boxes, and its report and goals table read off the GPU runs' own reports
(docs/gpu-runs)."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hpc_gan.gpucheck.common import CASES_ENV, STAGE_DIR_ENV, run_boxed
from hpc_gan.gpucheck.report import goal_rows, write_report
from hpc_gan.gpucheck.runner import STAGES, main
from hpc_gan.gpucheck.train_cases import CASE_SECONDS, case_key, stage_train, train_cases
from procenv import child_env

ROOT = Path(__file__).resolve().parents[1]



def test_the_gpu_check_pack_runs_every_stage_in_smoke_mode(tmp_path):
    """scripts/gpu-check.sh --smoke: every stage at toy sizes on the CPU (kernels in Triton's interpreter), each
    reported in report.json and report.md, so the pack a GPU session runs cannot rot."""
    from hpc_gan.models.layers import auto_resample
    from hpc_gan.models.resample_conv import resolve
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=child_env(drop=("TRITON_INTERPRET",)), cwd=ROOT,
                          timeout=900)
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["env", "accuracy", "kernels", "sn", "layers", "tests", "determinism", "dali",
                            "deepspeed", "train"]
    assert all(s["status"] in ("ok", "skip") for s in stages.values()), (proc.stdout, stages)
    assert proc.returncode == 0 and report["smoke"] is True
    assert stages["accuracy"]["worst_fp32_rel_error"] < 1e-4 and stages["determinism"]["bitwise_equal"]
    assert {r["mode"] for r in stages["accuracy"]["d2d_ce"]} == {"matrix", "fused"}  # both D2D-CE forwards
    assert {r["variant"] for r in stages["kernels"]["rows"]} >= {"triton", "triton_fused", "eager"}
    tiles = stages["sn"]["tiles"]  # the SN tiling sweep ran every candidate, with the same sigma
    assert len(tiles) == 2 and all(t["ms"] > 0 and t["sigma_max_rel_diff"] < 1e-5 for t in tiles), tiles
    assert stages["train"]["runs"][0]["sec_per_step"] > 0 and stages["train"]["runs"][0]["compiled_graphs"] == 0
    layers = stages["layers"]  # every implementation timed at every shape D and G resample at
    assert {(r["op"], r["impl"]) for r in layers["rows"]} == {("pool", "nearest_grad"), ("pool", "reshape"),
                                                            ("pool", "avg_pool2d"), ("upsample", "interpolate"),
                                                            ("upsample", "expand")}
    assert all(v > 0 for per in layers["ms_per_iteration"].values() for v in per.values())
    # every attention implementation at G's block and at D's (its D-step and G-step batches)
    assert sorted((r["net"], r["impl"], r["shape"][0]) for r in layers["attention_rows"]) == sorted(
        (net, impl, b) for impl in ("sdpa", "sdpa_narrow", "explicit") for net, b in (("G", 4), ("D", 8), ("D", 4)))
    assert set(layers["attention_ms_per_iteration"]) == {"sdpa", "sdpa_narrow", "explicit"}
    # where the layers stage's fastest are not what the defaults run on the CPU, one training case runs them
    wanted = [k for k in ("pool", "upsample") if layers["best"][k] != auto_resample(k, "cpu")] + \
        (["attention"] if layers["attention_best"] != "sdpa" else []) + \
        [side for side, v in layers["rgb_conv_best"].items() if v != "conv2d"] + \
        [side for side, v in layers["resample_conv_best"].items()
         if v != resolve("auto", {"g": "up", "d": "down"}[side], "cpu")]
    # D's image convolutions (3x3, 1x1 shortcut) and G's output convolution under every formulation of their side
    assert {(r["conv"][0], r["impl"]) for r in layers["rgb_conv_rows"]} == {
        ("D", "conv2d"), ("D", "nchw"), ("D", "unfold_mm"), ("G", "conv2d"), ("G", "nchw"), ("G", "pad_out")}
    assert set(layers["rgb_conv_best"]) == {"d", "g"}
    # G's upsampling convolutions (separate, fused, transposed) and D's pooled ones (separate, fused), checked
    # against each other as timed
    assert {(r["conv"][0], r["impl"]) for r in layers["resample_conv_rows"]} == {
        ("G", "separate"), ("G", "fused"), ("G", "transposed"), ("D", "separate"), ("D", "fused")}
    assert set(layers["resample_conv_best"]) == {"d", "g"}
    assert max(r["rel_error"] for r in layers["resample_conv_rows"]) < 1e-5
    modes = [r["mode"] for r in stages["train"]["runs"]]
    assert modes == ["eager"] + (["eager fastest layers"] if wanted else []), (modes, layers["best"])
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]  # stage files stay out of DIR
    md = (out / "report.md").read_text()
    assert all(f"| {name} |" in md for name in stages)
    assert "Speed goals" in md and "| not host-bound at 32 per GPU" in md
    assert "| shape | wall | device | fused, device |" in md  # D2D-CE's two modes side by side
    assert "- attention, ms per iteration at batch 4" in md and "(br/bc/ch/warps/stages/rch)" in md
    assert "- RGB convolution D 3->" in md and "- RGB convolution G " in md
    assert "- resampling convolution G " in md and "- resampling convolutions, fastest over each network's" in md
    # where the host's time goes in one D2D-CE call: every piece timed (no direct launch in the interpreter)
    host = stages["kernels"]["host_costs"]
    assert all(host[k] > 0 for k in ("forward_backward_us", "forward_us", "jit_launch_us", "torch_mm_us",
                                     "autograd_function_us"))
    assert host["direct_launch_us"] is None and host["forward_backward_direct_us"] is None  # measured after the shapes
    assert "- D2D-CE host time per call at 8x64x32 float32, us: forward + backward " in md
    # and by function (here the interpreter's own Python fills it), the largest first
    spent = [us for _, calls, us in host["profile"] if calls > 0]
    assert len(spent) == len(host["profile"]) > 0 and spent == sorted(spent, reverse=True)
    assert "  - its forward + backward by function, self host us per call" in md


def test_the_gpu_check_runs_the_train_cases_asked_for(monkeypatch, capsys):
    """--cases picks the train stage's cases and their order (a second call on a warm node measures what the first
    call's box left out); a case or stage that does not exist is one line naming the valid ones."""
    monkeypatch.setenv(CASES_ENV, "32:cuda_graphs 256:compile")
    _, _, cases = train_cases(smoke=False)
    assert [(b, label) for b, label, _ in cases] == [(32, "cuda_graphs"), (256, "compile")]
    assert "train.cuda_graphs=true" in cases[0][2] and "train.compile=default" in cases[1][2]
    monkeypatch.delenv(CASES_ENV)
    _, _, cases = train_cases(smoke=False)
    assert [case_key(b, label) for b, label, _ in cases][:4] == ["256:cuda_graphs", "256:eager",
                                                                          "32:cuda_graphs", "32:eager"]
    for argv, said in ((["--smoke", "--cases", "256:turbo"], "--cases 256:turbo: no such train case here; the cases "
                                                                "are 8:eager 8:eager_fastest_layers"),
                       (["--smoke", "--stages", "train", "bench"], "--stages bench: no such stage; the stages are env"),
                       (["--smoke", "--stages", "env", "train", "--cases", "8:eager_fastest_layers"],
                        "--cases 8:eager_fastest_layers runs what the layers stage found fastest: add layers")):
        with pytest.raises(SystemExit):
            main(argv)
        assert said in capsys.readouterr().err


def test_the_fastest_layers_run_eager_and_under_cuda_graphs(tmp_path, monkeypatch):
    """The layers stage's winners run in two step cases on a GPU: eager, and under CUDA graphs (where the MFU goal
    is measured, and where inductor may fuse a formulation differently). A winning pool_impl=nearest_grad stays out
    of the compiled case, which would refuse it; with nothing else to change, that case is not run."""
    monkeypatch.setenv(STAGE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(CASES_ENV, raising=False)
    stage = tmp_path / "stage-layers.json"

    def cases(best, attention="sdpa", rgb=None):
        stage.write_text(json.dumps({"device": "cuda", "best": best, "attention_best": attention,
                                     "rgb_conv_best": rgb or {"d": "conv2d", "g": "conv2d"}}))
        _, _, found = train_cases(smoke=False)
        return {label: flags for batch, label, flags in found if "fastest" in label}

    got = cases({"pool": "nearest_grad", "upsample": "expand"}, rgb={"d": "unfold_mm", "g": "conv2d"})
    eager, graphs = got["eager fastest layers"], got["cuda_graphs fastest layers"]
    assert "model.pool_impl=nearest_grad" in eager and "model.d_rgb_conv_impl=unfold_mm" in eager
    assert "model.pool_impl=nearest_grad" not in graphs and "model.pool_impl=reshape" not in graphs
    assert {"model.d_rgb_conv_impl=unfold_mm", "train.cuda_graphs=true"} <= set(graphs)
    assert list(cases({"pool": "nearest_grad", "upsample": "expand"})) == ["eager fastest layers"]
    assert cases({"pool": "reshape", "upsample": "expand"}) == {}  # the defaults won: nothing more to run
    # the defaults won, then no layers stage result at all: asked for, the case is skipped, saying why, and the
    # cases named after it still run (here: each skipped for time, so nothing starts)
    monkeypatch.setenv(CASES_ENV, "256:cuda_graphs_fastest_layers 256:eager")
    for _ in range(2):
        _, _, found = train_cases(smoke=False)
        assert found[0] == (256, "cuda_graphs fastest layers", None) and found[1][:2] == (256, "eager")
        first, then = stage_train(False, time.time() + 20, lambda partial: None)["runs"]
        assert first["status"] == "skip" and "found nothing faster than the defaults" in first["why"]
        assert then["mode"] == "eager" and "out of time" in then["why"]
        stage.unlink(missing_ok=True)
    with pytest.raises(ValueError, match="256:turbo: not a train case here"):
        train_cases(smoke=False, wanted=["256:turbo"])
    # the next lease's second call (docs/benchmarks.md) names cases that all exist on a GPU
    planned = ["256:cuda_graphs_fastest_layers", "256:cuda_graphs_tuned", "32:cuda_graphs"]
    assert [case_key(b, label) for b, label, _ in train_cases(smoke=False, wanted=planned)[2]] == planned


def test_the_host_profile_names_the_functions_a_backward_spends_its_time_in():
    """kernels.host_bench.host_profile: self host time per function and call of the profiled function, Python frames
    by file and line, what a custom backward calls included (on a GPU that backward runs on autograd's device
    thread, which cProfile would not see): the helper's 3 ms sleep, once per call."""
    from kernels.host_bench import host_profile

    def slow_part(g):
        time.sleep(0.003)
        return 2 * g

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            return slow_part(g)
    x = torch.randn(5, requires_grad=True)
    done = threading.Event()  # another thread, waiting all along: profiled too, as the suite's own leftovers were
    waiter = threading.Thread(target=done.wait, daemon=True)
    waiter.start()
    try:
        got = host_profile(lambda: Twice.apply(x).sum().backward(), torch.device("cpu"), reps=4, top=40)
    finally:
        done.set()
        waiter.join()
    (calls, us), = [(calls, us) for name, calls, us in got if name == "<built-in function sleep>"]
    assert calls == 1 and 2900 < us < 30_000, got
    frames = [name for name, _, _ in got if "test_gpucheck.py(" in name]
    assert any(name.endswith(": slow_part") for name in frames), got
    assert not any(" at 0x" in name for name, _, _ in got), got  # built-ins by name, whatever their address


def test_the_gpu_check_gives_the_last_stage_what_seconds_leaves(tmp_path, capsys):
    """--seconds is the whole call's time: a second call on a warm machine gives the train stage all of it; a stage
    with nothing left is reported as skipped, not run."""
    assert main(["--smoke", "--stages", "env", "--seconds", "45", "--out", str(tmp_path / "a")]) == 0
    assert "gpu-check: env (at most 45 s)" in capsys.readouterr().out
    assert main(["--smoke", "--stages", "env", "--seconds", "0.4", "--out", str(tmp_path / "b")]) == 0
    (stage,) = json.loads((tmp_path / "b" / "report.json").read_text())["stages"]
    assert stage["status"] == "skip" and "out of time" in stage["why"]


def test_the_gpu_check_fits_one_call_of_eight_minutes():
    """The stages' GPU boxes add up to 480 s (issue 15: one call of at most 8 minutes on one GPU; what a stage leaves
    goes to the next, so the call ends within the sum), and each train case's estimate fits the train box alone."""
    boxes = {name: gpu_s for name, _, gpu_s, _ in STAGES}
    assert sum(boxes.values()) == 480, boxes
    assert max(max(v) for v in CASE_SECONDS.values()) < boxes["train"]


def test_the_train_stage_skips_a_case_that_cannot_finish(monkeypatch):
    """A train case is started only where what is left of the box holds it (train_cases.case_seconds): the H200's
    first call, 2026-11-27, started the CUDA-graph case at 32 with ~70 s left, and its ~100 s of compiling were cut
    off with nothing to report. Here 20 s are left: every GPU case is skipped, none is started, and each says why
    (an eager case at 32 needs less than one at 256)."""
    monkeypatch.delenv(CASES_ENV, raising=False)
    monkeypatch.delenv(STAGE_DIR_ENV, raising=False)
    t0 = time.time()
    runs = stage_train(False, t0 + 25, lambda partial: None)["runs"]
    assert time.time() - t0 < 10  # nothing ran
    assert [r["status"] for r in runs] == ["skip"] * len(runs) and len(runs) == 9
    why = {case_key(r["batch"], r["mode"]): r["why"] for r in runs}
    assert "needs ~45 s" in why["256:eager"] and "needs ~125 s" in why["32:cuda_graphs"], why
    assert "needs ~25 s" in why["32:eager"] and "needs ~210 s" in why["256:cuda_graphs_tuned"], why
    assert "needs ~125 s" in why["32:cuda_graphs_static_sn"], why


def test_a_boxed_stage_stopped_by_its_box_keeps_what_it_said():
    """A case killed by its time box still returns its stderr (which graph it was compiling, say): the H200's
    CUDA-graph case at 32 came back as a bare timeout (2026-11-27)."""
    said = "import sys, time; print('compiling graph 2', file=sys.stderr, flush=True); time.sleep(60)"
    rc, err = run_boxed([sys.executable, "-c", said], dict(os.environ), 3)
    assert rc is None and "compiling graph 2" in err


def test_the_gpu_check_reads_its_goals_off_the_h200_run():
    """The goals table from the H200's second call (docs/gpu-runs/2026-11-27-h200-run2.json, the train cases the
    first call's box left out): CUDA graphs keep the GPU busy at 32 and at 256 per GPU; MFU at 256 is short of 45%.
    And from the fifth run's first call (2026-11-28-h200-call1.json), which met it."""
    report = json.loads((ROOT / "docs" / "gpu-runs" / "2026-11-27-h200-run2.json").read_text())
    rows = {goal: (measured, verdict) for goal, measured, verdict in goal_rows(report)}
    assert rows["not host-bound at 32 per GPU with compile or CUDA graphs (GPU busy, best case)"] == ("101% busy", "met")
    assert rows["not host-bound at 256 per GPU with compile or CUDA graphs (GPU busy, best case)"] == ("97% busy", "met")
    assert rows["train step MFU >= 45% at 256 per GPU (best case)"] == ("41.8%", "missed")
    # the fifth run (H200, the fused resampling convolutions by default): the goal met, the kernels' device goals too
    report = json.loads((ROOT / "docs" / "gpu-runs" / "2026-11-28-h200-call1.json").read_text())
    rows = {goal: (measured, verdict) for goal, measured, verdict in goal_rows(report)}
    assert rows["train step MFU >= 45% at 256 per GPU (best case)"] == ("54.0%", "met")
    assert rows["D2D-CE fwd+bwd >= best torch path at every shape (device)"] == ("1.03x (slowest shape)", "met")


def test_the_report_says_what_the_longest_inductor_kernels_compute(tmp_path):
    """A compiled case's longest inductor kernels get a line each in report.md: time, calls, and the sizes, hints
    and aten ops of their definitions (the sources stay in report.json); a kernel whose source was not found says
    so. On the H200's CUDA-graph case at 32 (run 4), given the definitions a GPU run would find."""
    report = json.loads((ROOT / "docs" / "gpu-runs" / "2026-11-27-h200-run4.json").read_text())
    run = next(r for s in report["stages"] for r in s.get("runs", []) if r.get("mode") == "cuda_graphs")
    found = {"sizes": {"xnumel": 24576, "r0_numel": 16384}, "hints": ["reduction_hint=ReductionHint.OUTER"],
             "aten": "aten.mul, aten.sum", "origin": "", "source": "def k(): pass", "file": "cab.py"}
    run["inductor_kernels"] = [{"name": "triton_red_fused_mul_sum_19", "ms": 5.8514, "calls": 1,
                                "definitions": [found]},
                               {"name": "triton_poi_fused_relu_4", "ms": 1.5, "calls": 2, "definitions": []}]
    write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    assert ("  - inductor kernel triton_red_fused_mul_sum_19: 5.85 ms in 1 calls (xnumel 24576, r0_numel 16384; "
            "reduction_hint=ReductionHint.OUTER; aten aten.mul, aten.sum)") in md
    assert "  - inductor kernel triton_poi_fused_relu_4: 1.50 ms in 2 calls (source not found)" in md
    assert "def k(): pass" not in md and "def k(): pass" in (tmp_path / "report.json").read_text()


def test_every_shape_is_not_met_while_shapes_are_unmeasured():
    """The H200's third call (docs/gpu-runs/2026-11-27-h200-run3.json): the kernels stage's box left 5 of 16 D2D-CE
    shapes out, so "at every shape" is partly measured, not met, though the 11 measured are all faster on the device;
    the 3x goal at 256 x 2048 x 2048 bf16 and both SN goals are met."""
    report = json.loads((ROOT / "docs" / "gpu-runs" / "2026-11-27-h200-run3.json").read_text())
    rows = {goal: (measured, verdict) for goal, measured, verdict in goal_rows(report)}
    assert rows["D2D-CE fwd+bwd >= best torch path at every shape (device)"] == (
        "1.04x (slowest of 11; 5 not measured)", "partly measured")
    assert rows["D2D-CE fwd+bwd >= best torch path at every shape (wall)"] == ("0.78x (slowest shape)", "missed")
    assert rows["D2D-CE >= 3x best torch at 256x2048x2048 bfloat16 (device)"] == ("3.38x", "met")
    assert rows["SN within 1.5x of the bandwidth floor (device time)"] == ("1.13x", "met")
    assert rows["SN, all layers, per forward: >= 5x the per-layer loop"] == ("5.72x", "met")


def test_the_gpu_check_reads_its_goals_off_the_first_h100_run():
    """The report's goals table, from the first H100 run's own report (docs/gpu-runs): every speed goal missed or
    not measured there, with the numbers docs/benchmarks.md quotes."""
    report = json.loads((ROOT / "docs" / "gpu-runs" / "2026-11-26-h100-run2.json").read_text())
    rows = {goal: (measured, verdict) for goal, measured, verdict in goal_rows(report)}
    assert rows["D2D-CE >= 3x best torch at 256x2048x2048 bfloat16 (wall)"] == ("0.41x", "missed")
    assert rows["train step MFU >= 45% at 256 per GPU (best case)"] == ("18.6%", "missed")
    assert rows["SN, all layers, per forward: >= 5x the per-layer loop"] == ("n/a", "not measured")
    assert not any(verdict == "met" for _, verdict in rows.values())


def test_the_report_keeps_a_failed_host_probe(tmp_path):
    """The kernels stage's host probe is guarded: its failure is reported beside the stage's other results, the JIT
    part's in place of its line, the direct launches' at its end."""
    from hpc_gan.gpucheck.stages import guarded

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
    assert guarded(broken) == {"error": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    us = dict.fromkeys(("forward_backward_us", "forward_us", "jit_launch_us", "torch_mm_us", "torch_empty_us",
                        "autograd_function_us"), 10.0)
    for host, said in (({"error": "RuntimeError: boom"}, "- D2D-CE host probe: {'error': 'RuntimeError: boom'}"),
                       ({"shape": [32, 2048, 512], "dtype": "bfloat16", **us, "direct_error": "TypeError: args"},
                        "torch.empty 10.0, an autograd function and its backward 10.0; direct_error: TypeError: args")):
        report = {"started": "now", "command": "gpu-check", "stages": [
            {"name": "kernels", "status": "ok", "seconds": 1.0, "rows": [], "host_costs": host}]}
        write_report(tmp_path, report)
        assert said in (tmp_path / "report.md").read_text()
