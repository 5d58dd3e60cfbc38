"""The training step: every conditioning method trains without NaN, resume is bit-identical, EMA, standing stats,
truncation, and accumulation splits a batch without changing what is computed."""
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from hpc_gan.errors import UserError
from hpc_gan.eval.sampling import truncated_normal
from hpc_gan.train import checkpoint
from hpc_gan.train.ema import EMA, standing_stats
from hpc_gan.train.loop import train
from hpc_gan.train.trainer import Trainer


def params_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("cond,adv,extra", [
    ("d2d_ce", "hinge", []), ("2c", "nonsaturating", []), ("ac", "least_squares", []),
    ("mh", "hinge", ["loss.diffaug=color,translation,cutout"]), ("pd", "wasserstein", []),
    ("d2d_ce", "hinge", ["loss.cr_lambda=1.0", "loss.ortho_beta=1e-4", "loss.d2d_mode=studiogan"]),
])
def test_each_method_trains_without_nan(tiny_cfg, cond, adv, extra):
    cfg = tiny_cfg(f"loss.cond={cond}", f"loss.adv={adv}", *extra)
    tr = Trainer(cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in tr.g.module.state_dict().items()}
    for i in range(3):
        tr.train_step(diagnostics=i == 0)
    m = tr.pop_metrics()
    assert all(math.isfinite(v) for v in m.values()), m
    assert {"d_loss", "g_loss", "d_adv", "g_adv"} <= set(m)
    # sigma_0 and D's feature norm under every conditioning (the watchdog's sigma alarms need them; projection
    # once had none), the conditioning gradient where there is a conditioning loss
    assert {"diag_feature_norm", "diag_sigma_G_max", "diag_sigma_D_max"} <= set(m)
    if cond in ("d2d_ce", "2c", "ac", "mh"):
        assert {"d_cond", "g_cond", "diag_cond_grad_norm"} <= set(m)
    else:
        assert "diag_cond_grad_norm" not in m
    assert any(not torch.equal(before[k], v) for k, v in tr.g.module.state_dict().items())
    assert all(torch.isfinite(p).all() for p in tr.g.module.parameters())


def test_d_is_frozen_during_g_step(tiny_cfg):
    tr = Trainer(tiny_cfg(), torch.device("cpu"))
    d_before = {k: v.clone() for k, v in tr.d.module.named_parameters()}
    tr.g_step()
    assert all(torch.equal(d_before[k], v) for k, v in tr.d.module.named_parameters())
    assert all(p.requires_grad for p in tr.d.module.parameters())


def test_the_step_trains_every_module_and_freezes_d_for_g_alone(tiny_cfg):
    """The step sets training mode and freezes D from lists taken at start-up (not a module walk per step): a
    module left in eval mode is set back, and D's parameters stop requiring gradients for G's forward only."""
    tr = Trainer(tiny_cfg(), torch.device("cpu"))
    D = tr.d.module
    seen = []
    D.register_forward_pre_hook(lambda mod, args: seen.append(any(p.requires_grad for p in mod.parameters())))
    tr.g.module.eval()
    D.head.eval()
    tr.train_step()
    assert all(m.training for net in (tr.g.module, D) for m in net.modules())
    assert seen == [True] * tiny_cfg().train.n_dis + [False]  # D steps, then the G step
    assert all(p.requires_grad for p in D.parameters())


def test_resume_is_bit_identical(tiny_cfg, tmp_path):
    """4 steps straight vs 2 steps, a new process-like Trainer from the checkpoint, 2 more steps."""
    straight = tiny_cfg(f"run.dir={tmp_path / 'a'}", "loss.diffaug=color,translation")
    train(straight, log=lambda s: None)
    interrupted = tiny_cfg(f"run.dir={tmp_path / 'b'}", "loss.diffaug=color,translation", "train.steps=2")
    train(interrupted, log=lambda s: None)
    resumed = tiny_cfg(f"run.dir={tmp_path / 'b'}", "loss.diffaug=color,translation")
    summary = train(resumed, resume="auto", log=lambda s: None)
    assert summary["start_step"] == 2 and summary["step"] == 4
    a = checkpoint.load_consolidated(tmp_path / "a")
    b = checkpoint.load_consolidated(tmp_path / "b")
    assert a["step"] == b["step"] == 4
    for key in ("G", "D", "G_ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    assert a["data"] == b["data"]


def test_the_vml_guard_covers_every_function_torch_sends_to_mkl():
    """hpc_gan.mkl_vml settles MKL's kernel choice for the functions the installed torch sends to VML (its header
    lists them); one left out could still race on its first threaded call and break bitwise resume."""
    from hpc_gan.mkl_vml import VML_OPS

    header = Path(torch.__file__).parent / "include" / "ATen" / "cpu" / "vml.h"
    if not header.is_file():
        pytest.skip(reason=f"this torch ships no {header} to read the VML list from")
    sent = set(re.findall(r"^IMPLEMENT_VML_MKL\((\w+),", header.read_text(), flags=re.M))  # commented-out: skipped
    assert len(sent) >= 10, f"no IMPLEMENT_VML_MKL lines read from {header}: has its format changed?"
    assert sent <= set(VML_OPS), f"not warmed: {sorted(sent - set(VML_OPS))}"
    missing = [name for name in VML_OPS if not callable(getattr(torch, name, None))]
    assert not missing, f"not torch functions: {missing}"


def test_checkpoints_are_atomic_and_pruned(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.steps=6", "train.keep_checkpoints=2")
    train(cfg, log=lambda s: None)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step-00000004", "step-00000006"]
    assert not list(root.glob(".tmp-*"))
    # a crash mid-save leaves only a temp dir, which is never picked for resume
    (root / ".tmp-step-00000008-999").mkdir()
    assert checkpoint.latest(root).name == "step-00000006"
    state = checkpoint.load_consolidated(tmp_path / "run")
    assert {"G", "D", "G_ema", "step"} <= set(state) and state["step"] == 6


@pytest.mark.parametrize("extra", [[], ["loss.diffaug=color,translation,cutout", "loss.cr_lambda=1.0"]])
def test_micro_batches_accumulate_to_the_same_update(tiny_cfg, extra):
    """A D update from 2 micro-batches of 4 equals one from a batch of 8, augmentation included. G runs with BN
    running statistics here: in training its BN uses micro-batch statistics, which no split can preserve (the
    cross-replica BN of the distributed trainer addresses ranks); D has no coupling across samples for ac."""
    # adam_eps=1: Adam's first update is then linear in the gradient, not lr x sign(g), which would blow the
    # rounding differences of near-zero gradients up to +-lr (as in tests/test_dist.py)
    cfg_full = tiny_cfg("loss.cond=ac", "train.adam_eps=1.0", *extra)
    cfg_acc = tiny_cfg("loss.cond=ac", "train.adam_eps=1.0", "train.micro_batch=4", *extra)
    a, b = Trainer(cfg_full, torch.device("cpu")), Trainer(cfg_acc, torch.device("cpu"))
    assert b.plan.accum == 2
    b.g.module.load_state_dict(a.g.module.state_dict())
    b.d.module.load_state_dict(a.d.module.state_dict())
    a.g.module.eval(), b.g.module.eval()  # BN from running stats: G's output independent of the split
    a.d.module.train(), b.d.module.train()
    a.d_step(0)
    b.d_step(0)
    for (n, pa), pb in zip(a.d.module.named_parameters(), b.d.module.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


def test_ema_follows_formula():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9, start=2)
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(1)  # before start: copy
    torch.testing.assert_close(ema.model.weight, w0 + 1)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(2)
    torch.testing.assert_close(ema.model.weight, 0.9 * (w0 + 1) + 0.1 * (w0 + 2))


def test_standing_stats_are_the_mean_over_passes():
    bn = torch.nn.BatchNorm2d(3)
    net = torch.nn.Sequential(bn).eval()
    batches = [torch.randn(4, 3, 2, 2) * (i + 1) + i for i in range(5)]
    standing_stats(net, 5, lambda i: (batches[i],))
    want_mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    want_var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, want_mean)
    torch.testing.assert_close(bn.running_var, want_var)
    assert not net.training and bn.momentum == 0.1


def test_truncation_resamples_large_values():
    z = truncated_normal(500, 20, 0.5, torch.Generator().manual_seed(0))
    assert z.abs().max() <= 0.5 and z.std() > 0.2
    assert truncated_normal(10, 4, 0.0, torch.Generator().manual_seed(0)).abs().max() > 0


def test_run_dir_layout(tiny_cfg, tmp_path):
    import json
    train(tiny_cfg(), log=lambda s: None)
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run"]["preset"] == "demo" and saved["model"]["g_ch"] == 8  # the recipe, and what was overridden
    assert (run / "samples" / "step-00000004.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "d_loss" in r] == [2, 4]
    assert all("samples_per_s" in r for r in records if "d_loss" in r)


def test_mixed_precision_path_keeps_fp32_state(tiny_cfg):
    """The bf16 autocast path (GPU-only in configs) run on the CPU's autocast: losses, weights, SN vectors and the
    EMA stay fp32 and finite."""
    tr = Trainer(tiny_cfg("loss.ortho_beta=1e-4"), torch.device("cpu"))
    tr.amp_dtype = torch.bfloat16
    for _ in range(2):
        tr.train_step()
    m = tr.pop_metrics()
    assert all(math.isfinite(v) for v in m.values())
    for net in (tr.g.module, tr.d.module, tr.ema.model):
        assert all(t.dtype == torch.float32 for t in net.state_dict().values() if t.is_floating_point())


def test_periodic_actions_run_at_their_own_intervals_and_are_timed(tiny_cfg, tmp_path):
    import json
    summary = train(tiny_cfg("train.steps=6", "train.log_every=2", "train.sample_every=3",
                             "train.checkpoint_every=4", "train.keep_checkpoints=0"), log=lambda s: None)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "d_loss" in r] == [2, 4, 6]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000003.png", "step-00000006.png"]
    assert [p.name for p in checkpoint.complete_checkpoints(run / "checkpoints")] == ["step-00000004",
                                                                                      "step-00000006"]
    assert {"train", "log", "sample", "checkpoint"} <= set(summary["phase_seconds"])
    assert summary["sec_per_step"] > 0 and summary["steps_run"] == 6


@pytest.mark.parametrize("knob,fast,ref", [
    ("train.optimizer_impl", "fused", "torch"), ("train.optimizer_impl", "foreach", "torch"),
    ("loss.ortho_impl", "grad", "autograd"), ("loss.ortho_impl", "sharded", "autograd"),
    ("model.sn_backend", "foreach", "torch"), ("model.g_upconv_impl", "transposed", "separate"),
    ("model.attn_impl", "sdpa", "explicit"), ("model.attn_impl", "sdpa_narrow", "explicit"),
    ("model.memory_format", "channels_last", "contiguous"),
    ("model.pool_impl", "nearest_grad", "avg_pool2d"), ("model.pool_impl", "reshape", "avg_pool2d"),
    ("model.upsample_impl", "expand", "interpolate"), ("model.d_rgb_conv_impl", "unfold_mm", "conv2d"),
    ("model.g_rgb_conv_impl", "pad_out", "conv2d"), ("model.g_upconv_impl", "fused", "separate"),
    ("model.d_downconv_impl", "fused", "separate"), ("model.attn_gamma", "weight", "output")])
def test_fast_paths_train_like_their_reference(tiny_cfg, knob, fast, ref):
    """Three full steps with a fast path and with its reference twin give the same networks (adam_eps=1 keeps
    float-rounding differences from being blown up to +-lr by Adam; the non-saturating loss has no kink: under
    the hinge, a rounding difference at a sample's margin switches its whole gradient on or off, which no
    tolerance covers and which happened to upsample_impl=expand at one thread)."""
    base = ["loss.adv=nonsaturating", "loss.ortho_beta=1e-3", "model.g_attn_res=8", "model.d_attn_res=8", "train.adam_eps=1.0",
            "train.g_lr=0.01", "train.d_lr=0.01"]
    nets = {}
    for impl in (fast, ref):
        tr = Trainer(tiny_cfg(*base, f"{knob}={impl}"), torch.device("cpu"))
        for _ in range(3):
            tr.train_step()
        nets[impl] = (tr.g.module.state_dict(), tr.d.module.state_dict(), tr.ema.model.state_dict())
    for a, b in zip(nets[fast], nets[ref]):
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, k=k: f"{knob}={fast}: {k}: {m}")


def test_compiled_steps_equal_eager_and_resume(tiny_cfg, tmp_path):
    """train.compile=default (inductor's C++ backend on the CPU): 3 steps equal eager within 1e-3 relative; a
    compiled run checkpoints and resumes to the same weights as a compiled run that never stopped."""
    eager = Trainer(tiny_cfg("train.adam_eps=1.0"), torch.device("cpu"))
    compiled = Trainer(tiny_cfg("train.adam_eps=1.0", "train.compile=default"), torch.device("cpu"))
    assert compiled.compile_mode == "default" and eager.compile_mode is None
    for _ in range(3):
        eager.train_step()
        compiled.train_step()
    for a, b in ((eager.g.module, compiled.g.module), (eager.d.module, compiled.d.module)):
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-5, msg=k)
    common = ["train.compile=default", "train.checkpoint_every=2"]
    train(tiny_cfg(*common, f"run.dir={tmp_path / 'a'}"), log=lambda s: None)
    train(tiny_cfg(*common, f"run.dir={tmp_path / 'b'}", "train.steps=2"), log=lambda s: None)
    summary = train(tiny_cfg(*common, f"run.dir={tmp_path / 'b'}"), resume="auto", log=lambda s: None)
    assert summary["start_step"] == 2 and summary["first_step_seconds"] > 0
    a, b = checkpoint.load_consolidated(tmp_path / "a"), checkpoint.load_consolidated(tmp_path / "b")
    for net in ("G", "D", "G_ema"):
        for k, v in a[net].items():
            torch.testing.assert_close(b[net][k], v, rtol=1e-5, atol=1e-7, msg=f"{net}.{k}")


@pytest.mark.parametrize("resampling", [(), ("model.pool_impl=reshape", "model.upsample_impl=expand")],
                         ids=["cpu_auto", "cuda_auto"])
def test_compiled_forwards_have_static_shapes(tiny_cfg, resampling):
    """G and D, with the whole-network SN, are one code object to dynamo (FusedSpectralNorm._forward). Compiled with
    dynamic shapes left automatic, D's first call looked like a shape change of G's, and every later graph was built
    with symbolic sizes (87 size symbols here; at BigGAN-128 inductor crashed on them). Each of the step's four
    forwards (G without and with grad, D in the D and the G step) is compiled once, with static shapes, and whole:
    no graph break, with the pooling and upsampling that auto runs on the CPU and on CUDA."""
    import logging

    class Symbols(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.sizes: list = []

        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if msg.startswith("create_symbol") and (".size()" in msg or ".stride()" in msg):
                self.sizes.append(msg[:160])

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    handler = Symbols()
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    torch._logging.set_logs(dynamic=logging.INFO)
    logger.addHandler(handler)
    try:
        trainer = Trainer(tiny_cfg("train.compile=default", *resampling), torch.device("cpu"))
        for _ in range(2):
            trainer.train_step()
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()
    assert not handler.sizes, handler.sizes[:3]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()


def compiled_input_marks(D, calls: int) -> list:
    """Compile D's forward with a dynamo backend that records each graph's tensor inputs as (shape, static mark),
    run ``calls`` training forwards and backwards of a 16 px batch, and return the records (one per graph)."""
    seen = []

    def backend(gm, example_inputs):
        seen.append([(tuple(t.shape), getattr(t, "_dynamo_static_input_type", None)) for t in example_inputs
                     if isinstance(t, torch.Tensor)])
        return gm

    D.forward = torch.compile(D.forward, backend=backend)
    for _ in range(calls):
        D(torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,)))["adv"].sum().backward()
    return seen


def test_sn_weights_enter_a_compiled_forward_as_ordinary_inputs():
    """CUDA graphs (train.cuda_graphs) take a compiled graph's static inputs to keep their addresses. The
    whole-network SN hands the layers new W / sigma tensors every forward, so they must not be static: dynamo marks
    tensors it finds on modules as static, which made torch's CUDA-graph trees re-record every step (and fail an
    assertion doing so, on an H100). Checked here with a dynamo backend that reads each graph input's static mark."""
    from hpc_gan.models.biggan import Discriminator
    from hpc_gan.models.sn_fused import attach_fused_sn

    torch._dynamo.reset()
    D = Discriminator(16, 4, 10, "d2d_ce", 16)
    fused = attach_fused_sn(D, "foreach")
    n_weights = len(fused.layers)
    seen = compiled_input_marks(D, 2)
    assert len(seen) == 1, f"recompiled: {len(seen)} graphs"
    weight_shapes = sorted(tuple(m.weight.shape) for m in fused.layers)
    plain = sorted(shape for shape, static in seen[0] if static is None)
    static = [shape for shape, mark in seen[0] if mark is not None]
    assert all(shape in plain for shape in weight_shapes) and len(plain) >= n_weights + 2, (plain, weight_shapes)
    assert static and not set(static) & set(weight_shapes), static  # biases, u / v buffers: static, as they should be
    torch._dynamo.reset()


def test_static_sn_weights_enter_a_compiled_forward_as_static_inputs():
    """model.sn_static_weights: W / sigma written into one buffer that stays where it is and handed on marked static,
    so CUDA graphs read them in place instead of copying ~65 of them in at every replay. The same backend as above
    (it reads each graph input's static mark); the triton backend in the interpreter."""
    from hpc_gan.models.biggan import Discriminator
    from hpc_gan.models.sn_fused import attach_fused_sn

    torch._dynamo.reset()
    D = Discriminator(16, 4, 10, "d2d_ce", 16)
    fused = attach_fused_sn(D, "triton", static=True)
    ptrs = []
    D.register_forward_pre_hook(lambda mod, args, kwargs: ptrs.append([w.data_ptr() for w in kwargs["sn_weights"]]),
                                with_kwargs=True)  # after the SN hook: it sees the weights the forward gets
    seen = compiled_input_marks(D, 3)
    assert len(seen) == 1, f"recompiled: {len(seen)} graphs"
    marks = dict(seen[0])
    assert all(marks.get(tuple(m.weight.shape)) == "unguarded" for m in fused.layers), seen[0]
    assert ptrs[0] == ptrs[1] == ptrs[2]  # the same addresses every forward
    torch._dynamo.reset()


def test_static_sn_weights_train_like_new_buffers(tiny_cfg):
    """Writing W / sigma into the same buffer every forward changes no value: three steps bitwise equal to the
    triton backend's new buffer per forward (and a second forward before the backward fails loudly: the gradient
    penalty's is refused in the config)."""
    base = ["model.sn_backend=triton", "loss.backend=torch", "model.g_attn_res=8", "model.d_attn_res=8"]
    nets = []
    for static in (True, False):
        tr = Trainer(tiny_cfg(*base, f"model.sn_static_weights={str(static).lower()}"), torch.device("cpu"))
        for _ in range(3):
            tr.train_step()
        nets.append([net.state_dict() for net in (tr.g.module, tr.d.module, tr.ema.model)])
    for a, b in zip(*nets):
        assert all(torch.equal(a[k], b[k]) for k in b), [k for k in b if not torch.equal(a[k], b[k])]
    D = tr.d.module
    tr.fused_sn[1].static = True  # the D of the run with new buffers, switched over: a second forward first
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    first = D(x, y)["adv"].sum()
    D(x, y)
    with pytest.raises(RuntimeError, match="modified (by an )?inplace"):  # autograd's version check, either form
        first.backward()
    with pytest.raises(UserError, match="sn_static_weights"):
        tiny_cfg("model.sn_static_weights=true", "loss.adv=wasserstein")
    with pytest.raises(UserError, match="sn_static_weights=true writes into the triton"):
        Trainer(tiny_cfg("model.sn_static_weights=true", "model.sn_backend=foreach"), torch.device("cpu"))


def test_cuda_graphs_are_refused_on_the_cpu(tiny_cfg):
    from hpc_gan.errors import UserError
    with pytest.raises(UserError, match="train.cuda_graphs=true needs a CUDA device"):
        Trainer(tiny_cfg("train.cuda_graphs=true"), torch.device("cpu"))


def test_compile_tuning_is_wired_to_inductor_and_refused_where_it_tunes_nothing(tiny_cfg, monkeypatch):
    """train.compile_tuning turns on inductor's coordinate-descent tuning for the compiled forwards, for the kernels
    slower than compile_tuning.TUNE_ABOVE_MS (its effect is the GPU pack's 256:cuda_graphs_tuned case; that only
    the slow ones are tuned, tests/test_gpu.py); without a compile it has nothing to tune, and on the CPU inductor's
    C++ kernels have no launch configs: one line each, before anything is built."""
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    from hpc_gan.errors import UserError
    from hpc_gan.train import compile_tuning
    from hpc_gan.train.trainer import compile_forwards, compile_mode
    # restored after the test: the filter wraps a method of inductor's, process-wide
    monkeypatch.setattr(CachingAutotuner, "coordinate_descent_tuning", CachingAutotuner.coordinate_descent_tuning)
    with pytest.raises(UserError, match="train.compile_tuning=true tunes the kernels torch.compile generates; set "
                                        "train.cuda_graphs=true or train.compile=default"):
        tiny_cfg("train.compile_tuning=true")
    cfg = tiny_cfg("train.compile_tuning=true", "train.cuda_graphs=true")
    assert compile_mode(cfg, torch.device("cuda")) == "reduce-overhead"
    with pytest.raises(UserError, match="run on CUDA; leave it false on the CPU"):
        Trainer(tiny_cfg("train.compile_tuning=true", "train.compile=default"), torch.device("cpu"))
    net = torch.nn.Linear(2, 2)
    with inductor_config.patch(coordinate_descent_tuning=False):  # restored after: a process-wide setting
        compile_forwards((net,), "default")
        assert inductor_config.coordinate_descent_tuning is False
        compile_forwards((net,), "default", tuning=True)
        assert inductor_config.coordinate_descent_tuning is True
        assert CachingAutotuner.coordinate_descent_tuning.slow_kernels_only == compile_tuning.TUNE_ABOVE_MS
        assert compile_tuning.enable(5.0) and CachingAutotuner.coordinate_descent_tuning.slow_kernels_only == 5.0
    assert inductor_config.coordinate_descent_tuning is False


@pytest.mark.parametrize("flag", ["train.compile=default", "train.cuda_graphs=true"])
def test_nearest_grad_pooling_is_refused_where_it_does_not_compile(tiny_cfg, flag):
    """On CUDA (H100, torch 2.11) dynamo broke D's graph at nearest_grad's autograd.Function and recompiled its
    frame per pooled shape until the recompile limit stopped the run: one line instead, naming the choice that
    compiles. The CPU compiles it (auto's choice there: the compiled-step tests above), and auto runs reshape on
    CUDA."""
    from hpc_gan.errors import UserError
    from hpc_gan.train.trainer import compile_mode
    cfg = tiny_cfg(flag, "model.pool_impl=nearest_grad")
    with pytest.raises(UserError, match="model.pool_impl=nearest_grad does not compile on CUDA .* use "
                                        "model.pool_impl=auto"):
        compile_mode(cfg, torch.device("cuda"))
    assert compile_mode(tiny_cfg(flag), torch.device("cuda")) in ("default", "reduce-overhead")
    if flag == "train.compile=default":
        assert compile_mode(cfg, torch.device("cpu")) == "default"


def test_a_benchmark_reports_its_step_time_before_the_profiled_step(tiny_cfg):
    """bench_train tells ``progress`` the first step's time after the warm-up, and the step time, MFU and phases
    after the timed steps, the same numbers it returns: a GPU-pack case stopped by its box in the profiled step
    (the second H100 run's compiled case) still reports them."""
    from hpc_gan.train.bench import bench_train
    seen = []
    r = bench_train(tiny_cfg(), steps=2, warmup=1, progress=lambda known: seen.append(dict(known)),
                    peak_tflops=1.0)
    assert [sorted(k) for k in seen][0] == ["first_step_seconds"] and len(seen) == 2
    assert {k: r[k] for k in seen[1]} == seen[1] and seen[1]["sec_per_step"] > 0 and seen[1]["mfu"] > 0
    # beside MFU, the utilization of the FLOPs the formulations execute (the fused resampling convolutions: fewer)
    ratio = r["executed_gflops_per_sample_iteration"] / r["gflops_per_sample_iteration"]
    assert r["executed_flops_utilization"] == pytest.approx(r["mfu"] * ratio) and 0 < ratio < 1


def test_inductor_sources_tell_what_a_compiled_kernel_computes(tmp_path):
    """A profile names inductor's kernels by their ops only; kernel_sources finds a kernel's generated source in the
    output code this process compiled (here a real CPU compile: a per-sample, per-channel gain summed over the
    pixels of a channels-last tensor, CBN's gain gradient in form), and reads the sizes, autotuning hints and aten
    ops that inductor's Triton output code states (written out below in that form)."""
    from hpc_gan.train.inductor_sources import describe, kernel_definitions, kernel_sources, loaded_output_code
    x = torch.randn(4, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    gain = torch.randn(4, 16)
    fn = torch.compile(lambda x, g: (x * g[:, :, None, None]).sum((2, 3)))
    assert torch.allclose(fn(x, gain), (x * gain[:, :, None, None]).sum((2, 3)), atol=1e-5)
    found = {name: d for name, d in kernel_sources().items() if name.startswith("cpp_fused") and "mul" in name}
    assert found, [p.name for p in loaded_output_code()]
    (d,) = next(iter(found.values()))[:1]
    assert "kernel(" in d["source"] and d["file"].endswith(".py") and "#include" in d["source"]
    assert kernel_sources(["triton_poi_fused_not_compiled_here_0"]) == {}
    text = "\n".join([
        "import torch", "",
        "# kernel path: /tmp/torchinductor_u/ab/cab.py",
        "# Topologically Sorted Source Nodes: [], Original ATen: [aten.mul, aten.sum]",
        "# Source node to ATen node mapping:",
        "triton_red_fused_mul_sum_19 = async_compile.triton('triton_red_fused_mul_sum_19', '''",
        "import triton", "import triton.language as tl",
        "from torch._inductor.runtime import triton_helpers, triton_heuristics",
        "triton_helpers.set_driver_to_gpu()", "",
        "@triton_heuristics.reduction(", "    size_hints={'x': 32768, 'r0_': 16384},",
        "    reduction_hint=ReductionHint.OUTER,", ")", "@triton.jit",
        "def triton_red_fused_mul_sum_19(in_ptr0, out_ptr0, xnumel, r0_numel, XBLOCK, R0_BLOCK):",
        "    xnumel = 24576", "    r0_numel = 16384",
        "''', device_str='cuda')", "",
        "triton_poi_fused_relu_3 = async_compile.triton('triton_poi_fused_relu_3', '''",
        "def triton_poi_fused_relu_3(in_ptr0, xnumel, XBLOCK):", "    xnumel = 512", "''', device_str='cuda')"])
    defs = kernel_definitions(text)
    assert sorted(defs) == ["triton_poi_fused_relu_3", "triton_red_fused_mul_sum_19"]
    red = defs["triton_red_fused_mul_sum_19"]
    assert red["sizes"] == {"xnumel": 24576, "r0_numel": 16384} and red["aten"] == "aten.mul, aten.sum"
    assert describe(red) == ("xnumel 24576, r0_numel 16384; size_hints={'x':32768,'r0_':16384}, "
                             "reduction_hint=ReductionHint.OUTER; aten aten.mul, aten.sum")
    assert not red["source"].startswith("import") and red["origin"].startswith("# kernel path")
    assert defs["triton_poi_fused_relu_3"]["origin"] == "" and defs["triton_poi_fused_relu_3"]["sizes"] == {
        "xnumel": 512}
    path = tmp_path / "output_code.py"
    path.write_text(text)
    two = kernel_sources(["triton_poi_fused_relu_3"], files=[path, path], max_chars=40)  # one entry per file
    assert [len(d["source"]) <= 40 for d in two["triton_poi_fused_relu_3"]] == [True, True]



def test_a_training_step_makes_no_tensor_from_host_numbers(tiny_cfg):
    """The CPU's stand-in for tests/test_gpu.py's sync check. A tensor made from Python numbers inside the step
    (``t[i] = 0.0``, ``torch.tensor([...])``) is, on CUDA, a copy from pageable host memory that synchronizes every
    step (the H200 caught one in the non-finite guard, 2026-11-27). Every device dispatches it as ``lift_fresh``.
    The data stream's are allowed: it assembles a batch's indices on the host by design, then copies pinned."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    class HostNumbers(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.found = 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            if func.overloadpacket.__name__ == "lift_fresh":
                stack = traceback.extract_stack()
                if not any("/hpc_gan/data/" in f.filename for f in stack):
                    self.found.append("".join(traceback.format_list(stack[-6:-1])))
            return func(*args, **(kwargs or {}))

    trainer = Trainer(tiny_cfg(), torch.device("cpu"))
    for _ in range(2):
        trainer.train_step()
    with HostNumbers() as seen:
        trainer.train_step()
    assert seen.ops > 1000  # the mode saw the step
    assert not seen.found, seen.found[0]
