"""What only a GPU can show: the training step never makes the host wait for the device outside logging steps.
Each test skips without CUDA; the GPU pack's tests stage (scripts/gpu-check.sh) runs this file on the GPU.

Two kinds of wait: an explicit synchronization (``.item()``, a copy to the host, ``bool(tensor)``), which torch's
sync debug mode turns into an error; and a host-to-GPU copy from pageable memory, which CUDA runs only after the
stream's queued work and which blocks the host until then. The debug mode does not see the second, so it is
checked by queueing a long spin kernel first and asking the stream, after the call, whether it is still busy."""
import pytest
import torch

from hpc_gan.data.loader import ArrayDataset
from hpc_gan.data.streams import RealStream
from hpc_gan.data.synthetic import make_synthetic
from hpc_gan.plan import StepPlan
from hpc_gan.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def spin_cycles(ms: float) -> int:
    """The cycles a spin kernel (torch.cuda._sleep) takes for about ``ms`` milliseconds (calibrated here, waiting for
    the device)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10 ** 7)
    end.record()
    end.synchronize()
    return int(10 ** 7 * ms / max(start.elapsed_time(end), 1e-3))


def queue_gpu_work(ms: float) -> None:
    """Queue about ``ms`` milliseconds of a spin kernel on the current stream."""
    torch.cuda._sleep(spin_cycles(ms))


def test_the_data_stream_does_not_wait_for_the_gpu():
    ds = ArrayDataset(*make_synthetic(64, 16, 10, seed=3))
    plan = StepPlan(16, seed=1)
    gpu = RealStream(ds, plan, hflip=True, device=CUDA)
    cpu = RealStream(ds, plan, hflip=True, device=torch.device("cpu"))
    for _ in range(3):  # pinned blocks allocated once
        gpu.next(), cpu.next()
    torch.cuda.synchronize()
    queue_gpu_work(1000)
    x, y = gpu.next()
    busy = not torch.cuda.current_stream().query()
    assert busy, "RealStream.next() waited for the GPU's queued work (a copy from pageable memory?)"
    xc, yc = cpu.next()
    # within one float32 step at 2: CUDA divides by a host scalar as a product with its reciprocal, which may lose
    # one bit against the CPU's division (failed as torch.equal on the H100, 2026-11-27)
    torch.testing.assert_close(x.cpu(), xc, rtol=0, atol=2.5e-7)
    assert torch.equal(y.cpu(), yc)


def test_a_training_step_does_not_synchronize(tiny_cfg):
    """bf16, the Triton SN and D2D-CE kernels: after two warm-up steps (autotuning, cuDNN plans, pinned blocks), a
    step that is not a logging step runs under torch's sync debug mode set to raise."""
    trainer = Trainer(tiny_cfg("run.device=cuda", "train.precision=bf16"), CUDA)
    for _ in range(2):
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("on", [False, True])
def test_cudnn_benchmark_follows_the_config(tiny_cfg, on):
    Trainer(tiny_cfg("run.device=cuda", f"train.cudnn_benchmark={str(on).lower()}"), CUDA)
    assert torch.backends.cudnn.benchmark is on


def test_the_profiled_step_names_the_ops_behind_its_kernels(tiny_cfg):
    """hpc-gan bench's profile: the kernels' device time is also told per aten op (the H100 reports' generic
    elementwise kernels could not be traced to their op), each kernel once (the H200's fourth run summed the kernels
    and the GPU-side ranges too: 2.46 ms of ops for 2.29 of kernels), and per op and input shapes; a kernel's name
    keeps its functor."""
    from kernels.bench import profile_cuda
    trainer = Trainer(tiny_cfg("run.device=cuda", "train.precision=bf16"), CUDA)
    trainer.train_step()
    prof = profile_cuda(trainer.train_step, top=100_000)  # every kernel, op and shape: the sums below are whole
    ops = dict((name, ms) for name, ms, _ in prof["top_ops"])
    assert any(name.startswith("aten::") for name in ops), ops
    assert 0 < sum(ops.values()) <= prof["device_ms"] * 1.01
    # and by op and input shapes: which convolution a slow kernel serves
    convs = [(shapes, ms) for name, shapes, ms, _ in prof["top_op_shapes"] if "convolution" in name]
    assert convs and all(shapes.startswith("[[") for shapes, _ in convs), prof["top_op_shapes"]
    # each entry is rounded to 4 decimals: the two sums may differ by half a unit per entry (the H200's fifth run:
    # 2.7398 against 2.74)
    rounding = 5e-5 * (len(prof["top_op_shapes"]) + len(ops))
    assert sum(ms for _, _, ms, _ in prof["top_op_shapes"]) == pytest.approx(sum(ops.values()), abs=rounding)
    assert not any(name.startswith(("void ", "at::native::")) for name, _, _ in prof["top"]), prof["top"]
    # kernels only: record_function's ranges on the GPU timeline overlap them (the H200's report counted the
    # optimizer's range as a kernel, and its GPU busy came out above 100%)
    names = [name for name, _, _ in prof["top"]]
    assert not any(name.startswith(("Optimizer.", "## ")) for name in names), names
    assert abs(sum(prof["kinds"].values()) - prof["device_ms"]) < 1e-3 and "optimizer" in prof["kinds"]


def test_the_profile_says_where_the_host_waits_for_the_device():
    """profile_cuda's host waits (the train cases' ``host_waits``): a ``.item()`` after ~20 ms of queued work is a
    wait of about that long under the op that made it; the same work without it waits for nothing (the profiler's
    own final synchronize is not counted)."""
    from kernels.bench import profile_cuda
    x, cycles = torch.ones(1, device=CUDA), spin_cycles(20)

    def fn() -> float:
        torch.cuda._sleep(cycles)
        return (x * 2).item()
    fn()
    prof = profile_cuda(fn)
    owners = {owner for _, owner, _, _ in prof["host_waits"]}
    assert prof["host_wait_ms"] > 10 and owners & {"aten::item", "aten::_local_scalar_dense"}, prof["host_waits"]
    calm = profile_cuda(lambda: torch.cuda._sleep(cycles))
    assert calm["host_wait_ms"] < 1, calm["host_waits"]


def test_a_profiled_inductor_kernel_has_its_source_found():
    """The compiled step's longest inductor kernels are reported with their sizes (hpc_gan.train.inductor_sources):
    a CUDA compile's profiled Triton kernel is found by its profile name in this process's output code, with the
    element count it states."""
    from kernels.bench import kernel_kind, profile_cuda
    from hpc_gan.train.inductor_sources import kernel_sources
    x = torch.randn(8, 96, 32, 32, device=CUDA, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    gain = torch.randn(8, 96, device=CUDA, dtype=torch.bfloat16)
    fn = torch.compile(lambda x, g: torch.relu(x * g[:, :, None, None]).sum((2, 3)))
    fn(x, gain)
    prof = profile_cuda(lambda: fn(x, gain))
    names = [name for name, _, _ in prof["top_by_kind"].get("inductor Triton", [])]
    assert names and all(kernel_kind(n) == "inductor Triton" for n in names), prof["top"]
    found = kernel_sources(names)
    assert set(found) == set(names), (names, list(found))
    defs = [d for per_name in found.values() for d in per_name]
    assert all("@triton.jit" in d["source"] for d in defs) and any(d["sizes"] for d in defs), found


@pytest.mark.parametrize("ch", [192, 96])  # BigGAN-128's attention widths: G's (q, k 24) and D's (12 -> 16)
def test_narrow_attention_runs_the_memory_efficient_kernel(ch):
    """model.attn_impl=sdpa_narrow on CUDA: queries and keys padded only to a multiple of 8, beside v's c/2, run on
    the memory-efficient kernel (forced here, so that a fallback to SDPA's math path raises rather than being timed
    by the layers stage), forward and backward, and equal the explicit map computed in fp32."""
    from functools import partial

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hpc_gan.models.layers import SelfAttention
    torch.manual_seed(0)
    fast = SelfAttention(ch, partial(torch.nn.Conv2d), "sdpa_narrow").to(CUDA, torch.bfloat16)
    ref = SelfAttention(ch, partial(torch.nn.Conv2d), "explicit").to(CUDA)
    ref.load_state_dict({k: v.float() for k, v in fast.state_dict().items()})
    with torch.no_grad():
        fast.gamma.fill_(1.0)
        ref.gamma.fill_(1.0)
    x = torch.randn(2, ch, 16, 16, device=CUDA).contiguous(memory_format=torch.channels_last)
    xb = x.bfloat16().requires_grad_()
    xf = xb.detach().float().requires_grad_()
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        out = fast(xb)
        (grad,) = torch.autograd.grad(out.float().square().sum(), xb)
    want = ref(xf)
    (want_grad,) = torch.autograd.grad(want.square().sum(), xf)
    # bf16 against fp32: ~0.2% (output) and ~1.3% (input gradient) on the CPU's bf16 path; a wrong padding is O(1)
    for got, exp, what in ((out, want, "output"), (grad, want_grad, "input gradient")):
        got, exp = got.detach().float(), exp.detach()
        err = float((got - exp).norm() / exp.norm())
        assert err < 5e-2, f"sdpa_narrow {what} at {ch} channels: {err:.3g} from the fp32 explicit map"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rgb_conv_formulations_equal_the_convolution_on_cuda(dtype):
    """model.d_rgb_conv_impl / g_rgb_conv_impl on CUDA (cuDNN's NCHW kernels, im2col + cuBLAS, padded outputs), at
    D's 3 -> 96 and G's 96 -> 3 on channels-last inputs: outputs and all three gradients within rounding of the
    float64 convolution (fp32 within TF32's rounding, which cuDNN's fp32 convolutions use by default; bf16 within
    its own; a wrong formulation is O(1) off), channels-last out where the models expect it."""
    import torch.nn.functional as F

    from hpc_gan.models.rgb_conv import D_RGB_CONVS, G_RGB_CONVS
    torch.manual_seed(0)
    for cin, cout, table in ((3, 96, D_RGB_CONVS), (96, 3, G_RGB_CONVS)):
        x = torch.randn(4, cin, 40, 36, device=CUDA).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(cout, cin, 3, 3, device=CUDA) / (cin * 9) ** 0.5, torch.randn(cout, device=CUDA)
        g = torch.randn(4, cout, 40, 36, device=CUDA)
        ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
        want = F.conv2d(*ref, padding=1)
        want_grads = torch.autograd.grad(want, ref, g.double())
        for name, fn in table.items():
            ins = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
            got = fn(*ins, 1)
            grads = torch.autograd.grad(got, ins, g.to(dtype))
            for a, e, what in ((got, want, "output"), *zip(grads, want_grads, ("x grad", "w grad", "b grad"))):
                err = float((a.double() - e).norm() / e.norm())
                assert err < (3e-2 if dtype == torch.bfloat16 else 5e-3), f"{name} {cin}->{cout} {what}: {err:.3g}"
            if name != "pad_out":  # pad_out's output is a view of its 8 channels
                assert got.is_contiguous(memory_format=torch.channels_last), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_resampling_convolutions_equal_the_separate_ops_on_cuda(dtype):
    """model.g_upconv_impl=fused / transposed and d_downconv_impl=fused on cuDNN (a 2x2 convolution over the four
    phases; a 4x4 transposed one with stride 2; a 4x4 one with stride 2), at G's 192 -> 96 upsampling convolution
    and D's 96 -> 96 pooled one, channels-last: outputs and all three gradients within rounding of the separate ops
    in float64, channels-last out."""
    import torch.nn.functional as F

    from hpc_gan.models.resample_conv import conv_avgpool, upsample_conv, upsample_conv_transposed
    torch.manual_seed(0)
    upsampled = lambda x, w, b: F.conv2d(F.interpolate(x, scale_factor=2.0), w, b, padding=1)  # noqa: E731
    cases = ((upsample_conv, 192, 96, (20, 18), upsampled), (upsample_conv_transposed, 192, 96, (20, 18), upsampled),
             (conv_avgpool, 96, 96, (40, 36), lambda x, w, b: F.avg_pool2d(F.conv2d(x, w, b, padding=1), 2)))
    for fused, cin, cout, hw, separate in cases:
        x = torch.randn(4, cin, *hw, device=CUDA).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(cout, cin, 3, 3, device=CUDA) / (cin * 9) ** 0.5, torch.randn(cout, device=CUDA)
        ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
        want = separate(*ref)
        g = torch.randn_like(want)
        want_grads = torch.autograd.grad(want, ref, g)
        ins = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
        got = fused(*ins)
        grads = torch.autograd.grad(got, ins, g.to(dtype))
        for a, e, what in ((got, want, "output"), *zip(grads, want_grads, ("x grad", "w grad", "b grad"))):
            err = float((a.double() - e).norm() / e.norm())
            assert err < (3e-2 if dtype == torch.bfloat16 else 5e-3), f"{fused.__name__} {what}: {err:.3g}"
        assert got.is_contiguous(memory_format=torch.channels_last), fused.__name__


@pytest.mark.parametrize("threshold_ms,tuned", [(0.0, True), (1e9, False)])
def test_compile_tuning_tunes_only_the_kernels_slower_than_its_threshold(threshold_ms, tuned, monkeypatch):
    """train.compile_tuning (hpc_gan.train.compile_tuning): inductor's coordinate-descent tuning runs for a fused
    kernel slower than the threshold and not for one faster, and the compiled function still computes the same. A
    kernel left untuned is marked decided: a second call asks no more."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    from hpc_gan.train import compile_tuning
    original = CachingAutotuner.coordinate_descent_tuning
    asked: list = []

    def counting(self, launcher, *args, **kwargs):  # inductor's own tuning, counted; the filter wraps this
        asked.append(self.inductor_meta.get("kernel_name"))
        return original(self, launcher, *args, **kwargs)
    monkeypatch.setattr(CachingAutotuner, "coordinate_descent_tuning", counting)
    torch._dynamo.reset()  # the lambda below is one code object for both cases: compile it afresh
    x = torch.randn(64, 96, 64, 64, device=CUDA, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    g = torch.randn(64, 96, device=CUDA, dtype=torch.bfloat16)
    want = (x.float() * g.float()[:, :, None, None]).sum((2, 3))
    # no tuned config from an earlier compile; and tuning off again after the test (enable() turns it on for the
    # process, and a later compile in this worker would tune every kernel)
    with inductor_config.patch(force_disable_caches=True, coordinate_descent_tuning=False):
        assert compile_tuning.enable(threshold_ms)
        fn = torch.compile(lambda x, g: (x * g[:, :, None, None]).sum((2, 3)))
        got = fn(x, g)
        calls = len(asked)
        fn(x, g)
        assert len(asked) == calls  # decided once, tuned or not
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=0.5)
    assert (calls > 0) == tuned, asked


def test_static_sn_weights_keep_aligned_addresses_and_values_on_cuda(tiny_cfg):
    """model.sn_static_weights on the GPU, bf16: every W / sigma view starts 16-byte aligned (inductor leaves an
    unaligned static input out of the static set, to be copied again) and keeps its address step after step, and
    three steps equal the plain path's bitwise (the same kernels, another output buffer)."""
    nets, ptrs = [], []
    for static in (True, False):
        trainer = Trainer(tiny_cfg("run.device=cuda", "train.precision=bf16", "model.g_attn_res=8",
                                   "model.d_attn_res=8", f"model.sn_static_weights={str(static).lower()}"), CUDA)
        if static:
            for net in (trainer.g.module, trainer.d.module):
                net.register_forward_pre_hook(
                    lambda mod, args, kwargs: ptrs.append([w.data_ptr() for w in kwargs["sn_weights"]]),
                    with_kwargs=True)
        for _ in range(3):
            trainer.train_step()
        nets.append([net.state_dict() for net in (trainer.g.module, trainer.d.module)])
    assert all(p % 16 == 0 for call in ptrs for p in call)
    by_net = {len(call): call for call in ptrs}  # G's and D's layer counts differ in the tiny nets
    assert all(call == by_net[len(call)] for call in ptrs)
    for a, b in zip(*nets):
        assert all(torch.equal(a[k], b[k]) for k in b), [k for k in b if not torch.equal(a[k], b[k])]
