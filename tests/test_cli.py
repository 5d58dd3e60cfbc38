"""The hpc-gan command end to end, in subprocesses, as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["run.tensorboard=false", "model.g_ch=8", "model.d_ch=8", "model.embed_dim=16", "data.synthetic_size=300",
        "train.batch_size=8", "train.log_every=2", "train.sample_every=3", "train.checkpoint_every=3",
        "train.standing_stats=2"]


def hpc_gan(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "hpc_gan.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"hpc-gan {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_demo_config_trains_end_to_end(tmp_path):
    run = tmp_path / "demo"
    out = hpc_gan("train", "--config", "configs/demo.yaml", f"run.dir={run}", "train.steps=3", *TINY).stdout
    assert "step 2/3" in out and "step 3/3" in out and "img/s" in out and "eta" in out
    assert "class accuracy of samples" in out and "within-class diversity" in out  # at step 0 and at the end
    assert (run / "checkpoints" / "step-00000003" / "state.pt").is_file()
    assert (run / "samples" / "step-00000003.png").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("sample_class_accuracy" in r and "sample_class_diversity" in r for r in records)
    assert any("summary" in r for r in records)

    # the same command again refuses to overwrite; --resume auto continues to a raised step count
    again = hpc_gan("train", "--config", "configs/demo.yaml", f"run.dir={run}", "train.steps=3", *TINY, check=False)
    assert again.returncode == 2 and "--resume auto" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    more = hpc_gan("train", "--config", "configs/demo.yaml", f"run.dir={run}", "train.steps=4", *TINY,
                   "--resume", "auto").stdout
    assert "resumed from" in more and "step 4/4" in more

    sheet = tmp_path / "sheet.png"
    out = hpc_gan("sample", "--run", str(run), "--n", "12", "--truncation", "0.5", "--classes", "1", "3",
                  "--out", str(sheet)).stdout
    assert "2 classes x 6 samples" in out and sheet.read_bytes()[:4] == b"\x89PNG"


def test_dry_run_prints_the_resolved_config():
    out = hpc_gan("train", "--config", "configs/demo.yaml", "--dry-run", "train.steps=7").stdout
    assert "steps: 7" in out and "nothing is trained" in out


@pytest.mark.parametrize("args,needle", [
    (["train", "--config", "configs/demo.yaml", "train.stepz=1"], "unknown key train.stepz"),
    (["train", "--config", "configs/nope.yaml"], "does not exist"),
    (["sample", "--run", "/nonexistent/run"], "no complete checkpoint"),
    (["train", "--config", "configs/demo.yaml", "train.precision=bf16", "run.device=cpu"], "needs a CUDA device"),
])
def test_bad_input_is_one_line(args, needle, tmp_path):
    if args[0] == "train":
        args = [*args, f"run.dir={tmp_path / 'run'}"]
    proc = hpc_gan(*args, check=False)
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("argv,needle", [
    (["plan", "--config", "configs/demo.yaml", "--gpus", "0"], "argument --gpus: must be > 0, got 0"),
    (["plan", "--gpus", "8", "--gpus-per-node", "0"], "argument --gpus-per-node: must be > 0, got 0"),
    (["plan", "--gpus", "8", "--mfu", "1.5"], "argument --mfu: must be > 0 and <= 1, got 1.5"),
    (["plan", "--gpus", "8", "--bus-efficiency", "0"], "argument --bus-efficiency: must be > 0 and <= 1, got 0"),
    (["plan", "--gpus", "8", "--alpha-inter-us", "-1"], "argument --alpha-inter-us: must be >= 0, got -1"),
    (["sample", "--run", "r", "--n", "-3"], "argument --n: must be > 0, got -3"),
    (["sample", "--run", "r", "--truncation", "x"], "argument --truncation: expected a number, got 'x'"),
    (["sample", "--run", "r", "--standing-stats", "1.5"], "argument --standing-stats: expected an integer, got '1.5'"),
    (["bench", "--steps", "0"], "argument --steps: must be > 0, got 0"),
    (["bench", "--warmup", "0"], "argument --warmup: must be > 0, got 0"),
    (["prepare-data", "--resolution", "64", "--shard-size", "0"], "argument --shard-size: must be > 0, got 0"),
])
def test_numeric_options_out_of_range_are_refused(argv, needle, capsys):
    """Out-of-range numbers end in argparse's usage and one error line naming the option (before, --gpus 0 and
    --mfu 0 were a ZeroDivisionError, --n -3 a sheet of one sample per class, --warmup 0 a TypeError)."""
    from hpc_gan.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(needle)


def test_the_config_sweep_runs_and_reports():
    """scripts/config_sweep.py (random configs through the real command; docs/failures.md) stays runnable: three
    configs of a fixed seed run to their end or to one-line errors."""
    proc = subprocess.run([sys.executable, "scripts/config_sweep.py", "--n", "3", "--seed", "5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "3 configs: " in proc.stdout and "0 tracebacks" in proc.stdout, \
        proc.stdout + proc.stderr


def test_info_json():
    info = json.loads(hpc_gan("info", "--config", "configs/demo.yaml").stdout)
    assert {"g_params", "d_params", "gflops_per_sample_iteration"} <= set(info)
    assert info["g_params"] > 0 and info["gflops_per_sample_iteration"] > 0


# Parameter counts of the authors' models, counted by running StudioGAN's own big_resnet.py (D2DCE head,
# attention at the configs' attn_g_loc / attn_d_loc; docs/presets.md): hpc-gan's presets must build the same nets.
STUDIOGAN_PARAMS = {
    "cifar10_reacgan": (9_416_196, 2_517_186),             # CIFAR10/ReACGAN.yaml, g/d_conv_dim 96
    "imagenet128_reacgan_b2048": (70_433_988, 91_642_146),  # ImageNet/ReACGAN-2048.yaml, d_embed_dim 2048
}


@pytest.mark.parametrize("preset", sorted(STUDIOGAN_PARAMS))
def test_info_counts_the_authors_parameters(preset):
    info = json.loads(hpc_gan("info", "--config", f"configs/{preset}.yaml").stdout)
    assert (info["g_params"], info["d_params"]) == STUDIOGAN_PARAMS[preset]
    if preset == "imagenet128_reacgan_b2048":  # BigGAN-128 at ch 96, 2 D steps: ~515 GFLOP / sample / iteration
        assert info["gflops_per_sample_iteration"] == pytest.approx(515, rel=0.1)


def test_flops_are_the_models_not_the_padded_kernels():
    """SDPA attention pads queries and keys with zeros to the values' width, g_rgb_conv_impl=pad_out G's output
    channels to 8, and the fused resampling convolutions do 4/9 of the separate ops' products; MFU counts the
    model's FLOPs, so the count is the same whichever runs (it was 1.5% higher with SDPA at BigGAN-128)."""
    from hpc_gan.config import load
    from hpc_gan.info import model_info
    counts = {o: model_info(load(ROOT / "configs" / "cifar10_reacgan.yaml", [o]))["gflops_per_sample_iteration"]
              for o in ("model.attn_impl=sdpa", "model.attn_impl=explicit", "model.g_rgb_conv_impl=pad_out",
                        "model.d_rgb_conv_impl=unfold_mm", "model.g_upconv_impl=fused",
                        "model.d_downconv_impl=fused", "model.g_upconv_impl=separate", "model.attn_gamma=output")}
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_executed_flops_count_what_the_formulations_compute(device):
    """model_info(executed_on=...): the FLOPs that the config's formulations execute on that device, "auto"
    resolved for it (the fused resampling convolutions on both: fewer than the model's; SDPA's padded heads: more),
    for the bench's executed-FLOPs utilization beside MFU. The reference formulations execute the model's count
    exactly; the fused ones at BigGAN-128 execute 334.0 of 504.7 GFLOP per sample (docs/benchmarks.md)."""
    from hpc_gan.config import load
    from hpc_gan.info import model_info
    reference = ["model.attn_impl=explicit", "model.g_upconv_impl=separate", "model.d_downconv_impl=separate"]
    cifar = ROOT / "configs" / "cifar10_reacgan.yaml"
    same = model_info(load(cifar, reference), executed_on=device)
    assert same["executed_gflops_per_sample_iteration"] == pytest.approx(same["gflops_per_sample_iteration"],
                                                                         rel=1e-12)
    fused = model_info(load(cifar, ["model.attn_impl=explicit"]), executed_on=device)
    padded = model_info(load(cifar, reference[1:]), executed_on=device)
    assert fused["gflops_per_sample_iteration"] == same["gflops_per_sample_iteration"]
    assert fused["executed_gflops_per_sample_iteration"] < 0.75 * same["gflops_per_sample_iteration"]
    assert padded["executed_gflops_per_sample_iteration"] > same["gflops_per_sample_iteration"]
    assert "executed_gflops_per_sample_iteration" not in model_info(load(cifar))
    if device == "cuda":
        big = model_info(load(ROOT / "configs" / "imagenet128_reacgan_b2048.yaml", ["model.attn_impl=explicit"]),
                         executed_on=device)
        assert big["executed_gflops_per_sample_iteration"] == pytest.approx(334.0, abs=0.1)


def test_an_internal_bug_shows_its_traceback():
    """Only UserError is a one-line error; anything else is a bug and keeps its traceback (exit 1)."""
    code = ("import sys, hpc_gan.cli as cli\n"
            "def broken(args):\n    raise KeyError('internal')\n"
            "cli._info = broken\n"
            "sys.exit(cli.main(['info', '--config', 'configs/demo.yaml']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'internal'" in proc.stderr
