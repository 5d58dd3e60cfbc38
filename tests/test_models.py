"""Shapes, parameter counts against the BigGAN paper, and D's output dict per conditioning method."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hpc_gan.config import load
from hpc_gan.errors import UserError
from hpc_gan.models import biggan, biggan_deep, build_models
from hpc_gan.models.layers import SelfAttention, SNConv2d, SNLinear

ROOT = Path(__file__).resolve().parents[1]


def count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("arch,res,ch,z,g_want,d_want", [
    ("biggan", 128, 96, 120, 70.4e6, 88.0e6),       # BigGAN paper, appendix B / Table 1
    ("biggan_deep", 128, 128, 128, 50.4e6, 34.6e6),  # BigGAN-deep, appendix B
])
def test_param_counts_match_the_paper(arch, res, ch, z, g_want, d_want):
    mod = biggan if arch == "biggan" else biggan_deep
    G = mod.Generator(res, ch, 1000, z, 128, 64)
    D = mod.Discriminator(res, ch, 1000, "pd", 128, 64)
    assert count(G) == pytest.approx(g_want, rel=0.01)
    assert count(D) == pytest.approx(d_want, rel=0.01)


@pytest.mark.parametrize("res,attn", [(16, 8), (32, 16), (64, 32), (128, 64), (256, 128)])
def test_shapes_at_every_resolution(res, attn):
    n_blocks = len(biggan.G_ARCH[res]["in"])
    G = biggan.Generator(res, 8, 5, 4 * (n_blocks + 1), 8, attn)
    D = biggan.Discriminator(res, 8, 5, "d2d_ce", 6, attn if res > 16 else 0)
    z, y = torch.randn(2, G.z_dim), torch.tensor([0, 4])
    x = G(z, y)
    assert x.shape == (2, 3, res, res) and x.abs().max() <= 1
    out = D(x, y)
    assert out["adv"].shape == (2,) and out["embed"].shape == (2, 6) and out["proxy"].shape == (2, 6)
    assert len(G.attn) == 1


@pytest.mark.parametrize("res", [128, 256])
def test_deep_shapes(res):
    G = biggan_deep.Generator(res, 4, 3, 8, 8, 64)
    D = biggan_deep.Discriminator(res, 4, 3, "ac", 6, 64)
    x = G(torch.randn(2, 8), torch.tensor([0, 2]))
    assert x.shape == (2, 3, res, res)
    assert D(x, torch.tensor([0, 2]))["cls_logits"].shape == (2, 3)


@pytest.mark.parametrize("cond,keys", [("d2d_ce", {"adv", "h", "embed", "proxy"}), ("2c", {"adv", "h", "embed", "proxy"}),
                                       ("ac", {"adv", "h", "cls_logits"}), ("mh", {"adv", "h", "cls_logits"}),
                                       ("pd", {"adv", "h"}), ("none", {"adv", "h"})])
def test_discriminator_dict(cond, keys):
    D = biggan.Discriminator(32, 4, 7, cond, 5)
    out = D(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 6]))
    assert set(out) == keys


def test_projection_is_folded_into_adv():
    D = biggan.Discriminator(16, 4, 3, "pd", 5)
    x = torch.randn(2, 3, 16, 16)
    a = D(x, torch.tensor([0, 0]))["adv"]
    b = D(x, torch.tensor([1, 1]))["adv"]
    h = D.features(x)
    want = D.head.adv(h).squeeze(1) + (D.head.class_embed(torch.tensor([1, 1])) * h).sum(1)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, want)


def test_bad_attention_resolution_is_a_clear_error():
    with pytest.raises(UserError, match="g_attn_res=48"):
        biggan.Generator(32, 4, 3, 16, 8, 48)


@pytest.mark.parametrize("arch,overrides,key", [
    ("biggan", ["model.g_ch=1", "model.g_attn_res=16"], "model.g_attn_res=16"),   # G's attention: 4 channels
    ("biggan", ["model.d_ch=2", "model.d_attn_res=8"], None),                       # D's: 8 channels, fine
    ("biggan", ["model.d_ch=1", "model.d_attn_res=8"], "model.d_attn_res=8"),      # 4 channels
    ("biggan_deep", ["model.g_ch=1"], "model.g_ch=1"),                               # bottlenecks of 0 channels
    ("biggan_deep", ["model.d_ch=1"], "model.d_ch=1"),
    ("biggan_deep", ["model.d_ch=2", "model.d_attn_res=64"], "model.d_attn_res=64"),
])
def test_networks_too_narrow_for_their_layers_are_a_clear_error(arch, overrides, key):
    """A channel multiplier that leaves a layer without channels (attention's query and key take 1/8, BigGAN-deep's
    bottlenecks 1/4) is a one-line error naming the key to change, not a reshape error from deep inside a layer."""
    res = "model.resolution=16" if arch == "biggan" else "model.resolution=128"
    cfg = load(ROOT / "configs" / "demo.yaml", [f"model.arch={arch}", res, "model.z_dim=60" if arch == "biggan" else
                                                 "model.z_dim=128", "model.g_attn_res=0", "model.d_attn_res=0",
                                                 "model.g_ch=8", "model.d_ch=8", *overrides])
    if key is None:
        build_models(cfg)
        return
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as e:
        build_models(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_spectral_norm_matches_power_iteration_and_torch_gradient(kind):
    """Each training forward is one step of Miyato et al.'s Algorithm 1 from the stored u (checked against float64),
    and the normalized weight and its gradient equal torch's spectral_norm holding the same u, v (u, v constants,
    sigma differentiated through W)."""
    torch.manual_seed(0)
    ours, plain = (SNConv2d(5, 7, 3), torch.nn.Conv2d(5, 7, 3)) if kind == "conv" else \
        (SNLinear(9, 4), torch.nn.Linear(9, 4))
    plain.weight.data.copy_(ours.weight.data)
    ref = torch.nn.utils.parametrizations.spectral_norm(plain, eps=ours.sn_eps).eval()  # eval: no own iteration
    param = ref.parametrizations.weight[0]
    w64 = ours.weight.detach().double().reshape(ours.weight.shape[0], -1)
    for _ in range(3):
        u_prev = ours.sn_u.double().clone()
        w_ours = ours.sn_weight()
        v = torch.nn.functional.normalize(w64.t() @ u_prev, dim=0)
        u = torch.nn.functional.normalize(w64 @ v, dim=0)
        torch.testing.assert_close(ours.sn_u.double(), u, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.sn_v.double(), v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.sn_sigma().double(), u @ w64 @ v, rtol=1e-5, atol=1e-6)
        param._u.copy_(ours.sn_u)
        param._v.copy_(ours.sn_v)
        w_ref = ref.weight
        torch.testing.assert_close(w_ours, w_ref)
    g = torch.randn_like(w_ours)
    (w_ours * g).sum().backward()
    (w_ref * g).sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.parametrizations.weight.original.grad)


def test_spectral_norm_converges_to_top_singular_value():
    torch.manual_seed(1)
    conv = SNConv2d(6, 5, 3)
    for _ in range(200):
        conv.sn_weight()
    w = conv.weight.detach().reshape(5, -1)
    assert conv.sn_sigma().item() == pytest.approx(torch.linalg.matrix_norm(w, ord=2).item(), rel=1e-4)
    assert torch.linalg.matrix_norm(conv.sn_weight().detach().reshape(5, -1), ord=2).item() == pytest.approx(1, rel=1e-4)


def test_spectral_norm_stays_fp32_under_autocast():
    torch.manual_seed(2)
    a = SNConv2d(6, 5, 3)
    b = SNConv2d(6, 5, 3)
    b.load_state_dict(a.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wa = a.sn_weight()
    wb = b.sn_weight()
    assert wa.dtype == torch.float32
    torch.testing.assert_close(wa, wb, rtol=0, atol=0)
    torch.testing.assert_close(a.sn_u, b.sn_u, rtol=0, atol=0)


def test_named_batch_splits_d_output_by_part():
    """D on the concatenation of named parts, split back, equals D on each part alone (eval mode: D is then a
    per-sample function)."""
    from hpc_gan.models.heads import NamedBatch
    torch.manual_seed(0)
    D = biggan.Discriminator(16, 4, 5, "d2d_ce", 8).eval()
    parts = {name: (torch.randn(n, 3, 16, 16), torch.randint(0, 5, (n,)))
             for name, n in (("real", 3), ("fake", 3), ("consistency", 2))}
    batch = NamedBatch(**parts)
    split = batch.split(D(batch.images, batch.labels))
    assert list(split) == ["real", "fake", "consistency"]
    for name, (x, y) in parts.items():
        alone = D(x, y)
        assert split[name].keys() == alone.keys()
        for key in alone:
            torch.testing.assert_close(split[name][key], alone[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["sdpa", "sdpa_narrow"])
@pytest.mark.parametrize("ch,h,w", [(16, 8, 8), (24, 6, 10), (8, 4, 2), (192, 4, 4)])
def test_sdpa_attention_equals_the_explicit_map(ch, h, w, impl):
    """SelfAttention through scaled_dot_product_attention(scale=1.0), queries and keys padded to v's width or to a
    multiple of 8 (wider than v at ch 8; none at G's ch 192: 24), against the explicit softmax(theta^T phi) map,
    outputs and gradients, on fresh random inputs (odd shapes included)."""
    from functools import partial
    seed = int(torch.randint(0, 2 ** 31, (1,)))
    torch.manual_seed(seed)
    which_conv = partial(SNConv2d, kernel_size=3, padding=1)
    fast = SelfAttention(ch, which_conv, impl).eval()
    ref = SelfAttention(ch, which_conv, "explicit").eval()
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        for m in (fast, ref):
            m.gamma.fill_(0.7)  # 0 at init would hide the attention branch
    x = torch.randn(3, ch, h, w, requires_grad=True)
    a, b = fast(x), ref(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, [x, *fast.parameters()], g)
    gb = torch.autograd.grad(b, [x, *ref.parameters()], g)
    for u, v in zip(ga, gb):  # summation orders differ (flash attention's online softmax): ~1e-6 of the scale
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5 * float(v.abs().max()), msg=f"seed {seed}")


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
@pytest.mark.parametrize("sn", [True, False])
@pytest.mark.parametrize("ch,h,w", [(16, 8, 8), (24, 6, 10)])
def test_attention_scale_in_the_weight_equals_the_scaled_output(ch, h, w, sn, impl):
    """model.attn_gamma=weight (gamma folded into o's weight) against BigGAN's gamma * o(a) (the reference), in
    float64 on fresh random inputs, in training mode (the SN's power iteration runs in both, from the same u):
    the output and the gradients of the input and of every parameter, gamma's included, to 1e-12; an unknown choice
    is refused."""
    import copy
    from functools import partial

    from hpc_gan.models.layers import set_attn_gamma
    which_conv = partial(SNConv2d if sn else torch.nn.Conv2d, kernel_size=3, padding=1)
    fast = SelfAttention(ch, which_conv, impl).double().train()
    with torch.no_grad():
        fast.gamma.fill_(float(torch.rand(())) + 0.1)
    ref = copy.deepcopy(fast)
    set_attn_gamma(ref, "output")
    assert (fast.gamma_in, ref.gamma_in) == ("weight", "output")
    x = torch.randn(3, ch, h, w, dtype=torch.float64, requires_grad=True)
    a, b = fast(x), ref(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    g = torch.randn_like(a)
    for u, v in zip(torch.autograd.grad(a, [x, *fast.parameters()], g),
                    torch.autograd.grad(b, [x, *ref.parameters()], g)):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="attn_gamma='input' is not one of"):
        set_attn_gamma(ref, "input")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(2, 5, 8, 8), (3, 4, 7, 10), (1, 6, 9, 5)])
def test_pool_with_upsampled_gradient_is_avg_pool2d_bit_for_bit(dtype, fmt, shape):
    """model.pool_impl=nearest_grad (the backward as an upsampling of grad / 4) against torch's avg_pool2d: values
    and gradients bitwise equal on fresh random inputs, odd sizes (a trailing row / column gets no gradient) and
    both memory formats; the gradient keeps the input's memory format."""
    from hpc_gan.models.layers import make_pool
    x = torch.randn(*shape).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    fast, ref = make_pool("nearest_grad")(x), make_pool("avg_pool2d")(x)
    assert torch.equal(fast, ref)
    g = torch.randn_like(ref)
    gf, = torch.autograd.grad(fast, x, g)
    gr, = torch.autograd.grad(ref, x, g)
    assert torch.equal(gf, gr) and gf.dtype == dtype
    if fmt == torch.channels_last and shape[-1] % 2 == 0 and shape[-2] % 2 == 0:
        assert gf.is_contiguous(memory_format=torch.channels_last)


class OpCount(TorchDispatchMode):
    """The aten ops that launch a kernel (views left out) dispatched inside the block: ``.names``, ``.kernels``."""
    VIEWS = {"permute", "view", "unsqueeze", "squeeze", "expand", "narrow", "slice", "_unsafe_view", "alias", "detach",
             "t"}

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.VIEWS:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self):
        return len(self.names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(2, 5, 8, 8), (3, 4, 7, 10), (1, 6, 9, 5), (2, 1, 4, 6)])
def test_reshaped_pool_and_expanded_upsampling_match_torch(dtype, fmt, shape):
    """model.pool_impl=reshape and model.upsample_impl=expand against avg_pool2d and F.interpolate on fresh random
    inputs, odd sizes, one channel, both memory formats: the upsampled values bit for bit, the pooled values and
    both gradients within float rounding (sums of four in another order); outputs and gradients keep the input's
    memory format, and each direction is one kernel (the narrowing of a pooled odd size excepted)."""
    from hpc_gan.models.layers import make_pool, make_upsample
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    even = shape[-1] % 2 == 0 and shape[-2] % 2 == 0
    x = torch.randn(*shape).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    for fast, ref, exact in ((make_pool("reshape"), make_pool("avg_pool2d"), False),
                             (make_upsample("expand"), make_upsample("interpolate"), True)):
        with OpCount() as ops:
            got = fast(x)
        want = ref(x)
        assert torch.equal(got, want) if exact else torch.allclose(got, want, **tol), (got - want).abs().max()
        g = torch.randn_like(want)
        with OpCount() as back:
            gf, = torch.autograd.grad(got, x, g)
        gr, = torch.autograd.grad(want, x, g)
        torch.testing.assert_close(gf, gr, **(tol if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)))
        if fmt == torch.channels_last and (even or exact):
            assert got.is_contiguous(memory_format=fmt) and gf.is_contiguous(memory_format=fmt)
        if even or exact:
            assert ops.kernels == 1 and back.kernels == 1, (ops.names, back.names)


def test_pool_and_upsample_choices_are_the_configs():
    """The config's choices and the implementations are the same lists (config cannot import the models)."""
    import typing

    from hpc_gan.config import PoolImpl, UpsampleImpl
    from hpc_gan.models.layers import POOLS, UPSAMPLES
    assert set(typing.get_args(PoolImpl)) == {*POOLS, "auto"}
    assert set(typing.get_args(UpsampleImpl)) == {*UPSAMPLES, "auto"}


def test_auto_resampling_runs_the_choice_measured_fastest_on_the_tensors_device():
    """"auto" picks per call from the tensor's device (models are built on the CPU, then moved): on CUDA the
    view-based forms (the H100's layers stage), elsewhere nearest_grad and interpolate. Bad names fail listing the
    choices."""
    from hpc_gan.models.layers import auto_resample, make_pool, make_upsample
    assert (auto_resample("pool", "cuda"), auto_resample("upsample", "cuda")) == ("reshape", "expand")
    assert (auto_resample("pool", "cpu"), auto_resample("upsample", "meta")) == ("nearest_grad", "interpolate")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    assert type(make_pool("auto")(x).grad_fn).__name__ == "_AvgPool2x2Backward"  # nearest_grad's
    assert type(make_upsample("auto")(x).grad_fn).__name__ == "UpsampleNearest2DBackward0"  # interpolate's
    assert make_pool("auto")(x.detach().to("meta")).shape == (2, 3, 3, 3)
    with pytest.raises(ValueError, match=r"pool_impl='mean' is not one of \['avg_pool2d', 'nearest_grad', "
                                         r"'reshape', 'auto'\]"):
        make_pool("mean")


def test_g_block_shortcut_conv_before_the_upsampling_is_the_same_function():
    """GBlock runs its 1x1 shortcut conv before the nearest upsampling (a quarter of the pixels): the same function
    as BigGAN's upsample-then-conv, outputs and gradients, and its upsampling stays in the activations' dtype under
    autocast (CUDA's autocast would run it in fp32)."""

    from hpc_gan.models.layers import upsample2x
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    G = biggan.Generator(32, 8, 10, 40, 16)
    block = G.blocks[0].eval()
    x = torch.randn(3, block.conv_sc.in_channels, 4, 4, requires_grad=True)
    cond = torch.randn(3, block.bn1.gain.in_features)
    h = block.conv2(F.relu(block.bn2(block.conv1(F.interpolate(F.relu(block.bn1(x, cond)), scale_factor=2.0)),
                                     cond)))
    want = h + block.conv_sc(F.interpolate(x, scale_factor=2.0))
    got = block(x, cond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0],
                               rtol=1e-5, atol=1e-6)
    xb = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        up = upsample2x(xb)
    assert up.dtype == torch.bfloat16 and torch.equal(up, F.interpolate(xb.float(), scale_factor=2.0).bfloat16())


def test_resample_bench_records_the_shapes_biggan_resamples_at():
    """The layers stage's shapes, recorded from a forward on the meta device, against BigGAN-128's block tables: per
    G block its input and its shortcut conv's output upsampled; per downsampling D block its output pooled and the
    shortcut's (the RGB image in the first, non-pre-activation block)."""
    from pathlib import Path

    from hpc_gan.config import load
    from hpc_gan.models.resample_bench import resample_shapes
    cfg = load(Path(__file__).parents[1] / "configs" / "imagenet128_reacgan_b2048.yaml",
               ["model.g_ch=8", "model.d_ch=8", "model.embed_dim=8"])
    n, g_ch, d_ch = 3, 8, 8
    got = resample_shapes(cfg, n)
    g, d = biggan.G_ARCH[128], biggan.D_ARCH[128]
    want_up = [(n, c * g_ch, 4 << i, 4 << i) for i in range(len(g["in"])) for c in (g["in"][i], g["out"][i])]
    want_pool, res = [], 128
    for i, (cout, down) in enumerate(zip(d["out"], d["down"])):
        if down:
            want_pool += [(n, cout * d_ch, res, res), (n, 3 if i == 0 else cout * d_ch, res, res)]
            res //= 2
    assert sorted(got["upsample"]) == sorted(want_up) and sorted(got["pool"]) == sorted(want_pool)


@pytest.mark.parametrize("n, cin, cout, hw, k", [(2, 3, 5, (9, 7), 3), (3, 5, 3, (6, 6), 3), (2, 3, 4, (5, 8), 1)])
def test_rgb_conv_formulations_equal_the_convolution(n, cin, cout, hw, k):
    """Every formulation of model.d_rgb_conv_impl and model.g_rgb_conv_impl (NCHW, im2col + one batched product,
    zero-padded output channels) computes F.conv2d, forward and all three gradients, in float64 on fresh
    channels-last inputs at odd sizes (3 input channels, 3 output channels, neither, 1x1)."""
    from hpc_gan.models.rgb_conv import D_RGB_CONVS, G_RGB_CONVS
    x = torch.randn(n, cin, *hw, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(cout, cin, k, k, dtype=torch.float64), torch.randn(cout, dtype=torch.float64)
    g = torch.randn(n, cout, *hw, dtype=torch.float64)
    ref = [t.detach().requires_grad_() for t in (x, w, b)]
    want = F.conv2d(ref[0], ref[1], ref[2], padding=k // 2)
    want_grads = torch.autograd.grad(want, ref, g)
    for name, fn in {**D_RGB_CONVS, **G_RGB_CONVS}.items():
        ins = [t.detach().requires_grad_() for t in (x, w, b)]
        got = fn(*ins, k // 2)
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12, msg=name)
        for a, c in zip(torch.autograd.grad(got, ins, g), want_grads):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12, msg=name)


def build_twins(cfg, **other: str) -> dict:
    """G and D of cfg's model ("ref") and of the same model with the ``other`` settings ("other"), the same
    weights, channels-last."""
    import dataclasses

    from hpc_gan.models.build import build_discriminator, build_generator
    n, nets = cfg.data.num_classes, {}
    for key, m in (("ref", cfg.model), ("other", dataclasses.replace(cfg.model, **other))):
        torch.manual_seed(0)
        G, D = build_generator(m, n), build_discriminator(m, n, cfg.loss.cond)
        nets[key] = [net.to(memory_format=torch.channels_last) for net in (G, D)]
    return nets


def assert_twins_compute_the_same(cfg, nets: dict, fp32_atol: float = 1e-5) -> None:
    """build_twins' two G, D pairs: the same outputs and every parameter's gradient in fp32 (within 1e-4 relative,
    ``fp32_atol`` absolute); under bf16 autocast,
    each within 1.5x (plus 2%) of the reference's own distance to the float64 truth, in norm (bf16 rounds in
    other places in another order: compared with each other, tiny nets' batch norms amplify that past any fixed
    elementwise tolerance)."""
    import copy
    n = cfg.data.num_classes
    z, y = torch.randn(4, cfg.model.z_dim), torch.randint(0, n, (4,))

    def run(G, D, autocast: bool, dtype=torch.float32) -> list:
        G.zero_grad(), D.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            x = G(z.to(dtype), y)
            out = D(x, y)
        (out["adv"].sum() + x.square().mean()).backward()
        return [x, out["adv"]] + [p.grad for net in (G, D) for p in net.parameters() if p.grad is not None]

    got = {key: run(G, D, False) for key, (G, D) in nets.items()}
    assert len(got["ref"]) == len(got["other"])
    for a, b in zip(got["other"], got["ref"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=fp32_atol)
    truth = run(*(copy.deepcopy(net).double() for net in nets["ref"]), False, torch.float64)
    got = {key: run(G, D, True) for key, (G, D) in nets.items()}
    # a floor under each tensor's norm: the gradients of conv biases that a batch norm follows are 0 in exact
    # arithmetic, and rounding noise in bf16
    floor = 1e-2 * torch.stack([t.norm() for t in truth]).median()
    for i, (a, b, t) in enumerate(zip(got["other"], got["ref"], truth)):
        err = {k: ((v.double() - t).norm() / torch.maximum(t.norm(), floor)).item() for k, v in (("other", a),
                                                                                             ("ref", b))}
        assert err["other"] <= 1.5 * err["ref"] + 2e-2, (i, err)


@pytest.mark.parametrize("d_impl, g_impl", [("unfold_mm", "pad_out"), ("nchw", "nchw")])
def test_models_with_other_rgb_convolutions_compute_the_same(d_impl, g_impl):
    """model.d_rgb_conv_impl / g_rgb_conv_impl reach exactly the convolutions on RGB (D's first block's two, G's
    last), and G and D built with them equal the reference's outputs and every parameter's gradient, in fp32 and
    under bf16 autocast (D's im2col columns made in autocast's dtype), channels-last."""
    from pathlib import Path

    from hpc_gan.config import load
    from hpc_gan.models.rgb_conv import rgb_convs
    cfg = load(Path(__file__).parents[1] / "configs" / "demo.yaml")
    nets = build_twins(cfg, d_rgb_conv_impl=d_impl, g_rgb_conv_impl=g_impl)
    G, D = nets["other"]
    assert [c.conv_fn is not None for c in rgb_convs(D, "in")] == [True, True] and len(rgb_convs(G, "out")) == 1
    assert sum(getattr(c, "conv_fn", None) is not None for c in D.modules()) == 2
    assert sum(getattr(c, "conv_fn", None) is not None for c in G.modules()) == 1
    assert_twins_compute_the_same(cfg, nets)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "as_compiled"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("n, cin, cout, hw", [(2, 5, 7, (4, 6)), (1, 3, 4, (5, 3)), (3, 8, 8, (1, 1)),
                                              (2, 4, 6, (7, 5))])
def test_fused_resampling_convolutions_equal_the_separate_ops(n, cin, cout, hw, fmt, traced, monkeypatch):
    """In float64 on fresh inputs (odd sizes: pooling drops a trailing row / column; 1 x 1 upsampled): upsample_conv
    and upsample_conv_transposed are conv3x3(nearest 2x upsampling) and conv_avgpool is 2x2 average pooling of
    conv3x3, values and the input's, weight's and bias's gradients, each output in its input's layout; and they
    multiply-add 4/9 as often (the upsampling's 2x2 grid is one pixel wider: (H+1)(W+1) / HW more; the transposed
    form's is not; the pooling's fused form skips the row and column that pooling drops). Both interleavings of the
    phases: eager's (a strided view, its own backward) and the slices torch.compile is given (run here eagerly; the
    compiled steps' tests compile them)."""
    from torch.utils.flop_counter import FlopCounterMode

    from hpc_gan.models.resample_conv import conv_avgpool, upsample_conv, upsample_conv_transposed
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: traced)
    x = torch.randn(n, cin, *hw, dtype=torch.float64).contiguous(memory_format=fmt)
    w, b = torch.randn(cout, cin, 3, 3, dtype=torch.float64), torch.randn(cout, dtype=torch.float64)
    upsampled = lambda x, w, b: F.conv2d(F.interpolate(x, scale_factor=2.0), w, b, padding=1)  # noqa: E731
    pairs = [(upsample_conv, upsampled, 16 * (hw[0] + 1) * (hw[1] + 1) / (36 * hw[0] * hw[1])),
             (upsample_conv_transposed, upsampled, 16 / 36)]
    if min(hw) >= 2:
        pairs.append((conv_avgpool, lambda x, w, b: F.avg_pool2d(F.conv2d(x, w, b, padding=1), 2),
                      16 * (hw[0] // 2) * (hw[1] // 2) / (9 * hw[0] * hw[1])))  # 4/9 at even sizes
    for fused, separate, ratio in pairs:
        ins = [t.detach().requires_grad_() for t in (x, w, b)]
        ref = [t.detach().requires_grad_() for t in (x, w, b)]
        with FlopCounterMode(display=False) as flops:
            got = fused(*ins)
        with FlopCounterMode(display=False) as ref_flops:
            want = separate(*ref)
        assert got.shape == want.shape and flops.get_total_flops() == pytest.approx(
            ratio * ref_flops.get_total_flops()), fused.__name__
        assert got.is_contiguous(memory_format=fmt) or min(hw) == 1, fused.__name__  # 1 x 1: both layouts
        g = torch.randn_like(want)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=fused.__name__)
        for a, c in zip(torch.autograd.grad(got, ins, g), torch.autograd.grad(want, ref, g)):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12, msg=fused.__name__)


@pytest.mark.parametrize("arch", ["biggan", "biggan_deep"])
def test_models_with_fused_resampling_convolutions_compute_the_same(arch):
    """model.g_upconv_impl / d_downconv_impl=fused, and g_upconv_impl=transposed, against separate: G and D (BigGAN;
    BigGAN-deep's G, whose D pools after a ReLU) give the same outputs and every parameter's gradient, in fp32 and
    under bf16 autocast (D's pre-activation shortcuts pool before their 1x1 conv there)."""
    from pathlib import Path

    from hpc_gan.config import load
    over = [] if arch == "biggan" else ["model.arch=biggan_deep", "model.resolution=128", "model.g_ch=4",
                                       "model.d_ch=4", "model.z_dim=32", "model.shared_dim=16",
                                       "model.g_attn_res=0", "model.d_attn_res=0"]
    cfg = load(Path(__file__).parents[1] / "configs" / "demo.yaml",
               over + ["model.g_upconv_impl=separate", "model.d_downconv_impl=separate"])
    assert_twins_compute_the_same(cfg, build_twins(cfg, g_upconv_impl="fused", d_downconv_impl="fused"))
    # oneDNN's transposed convolution sums in another order: one pixel of BigGAN-deep's 128 x 128 fp32 output came
    # 1.9e-5 from the separate ops', where its distance to float64 equals the fused form's (G's output: 8.5e-6 and
    # 8.5e-6 in norm, the separate ops' own 8.2e-6)
    assert_twins_compute_the_same(cfg, build_twins(cfg, g_upconv_impl="transposed"), fp32_atol=3e-5)


def test_auto_picks_each_sides_resampling_convolution_on_its_own(monkeypatch):
    """``resample_conv.AUTO`` is per side: with D's "auto" turned back to the separate ops on this device, G still
    runs its fused upsampling convolutions and D its separate ones (each net's executed FLOPs equal those of the
    explicit setting), so a GPU run that finds one side's fused form slower can drop that side alone."""
    from pathlib import Path

    from torch.utils.flop_counter import FlopCounterMode

    from hpc_gan.config import load
    from hpc_gan.models import resample_conv
    from hpc_gan.models.build import build_discriminator, build_generator
    cfg = load(Path(__file__).parents[1] / "configs" / "demo.yaml")
    n = cfg.data.num_classes
    z, y = torch.randn(2, cfg.model.z_dim), torch.randint(0, n, (2,))

    def flops(g_impl: str, d_impl: str) -> tuple:
        import dataclasses
        m = dataclasses.replace(cfg.model, g_upconv_impl=g_impl, d_downconv_impl=d_impl)
        G, D = build_generator(m, n), build_discriminator(m, n, cfg.loss.cond)
        with FlopCounterMode(display=False) as g_count:
            x = G(z, y)
        with FlopCounterMode(display=False) as d_count:
            D(x.detach(), y)
        return g_count.get_total_flops(), d_count.get_total_flops()

    (g_sep, d_sep), (g_fused, d_fused) = flops("separate", "separate"), flops("fused", "fused")
    assert g_fused < g_sep and d_fused < d_sep  # the two settings differ on both sides, so the check below can fail
    monkeypatch.setitem(resample_conv.AUTO, "down", {"cpu": "separate"})
    assert flops("auto", "auto") == (g_fused, d_sep)
    monkeypatch.setitem(resample_conv.AUTO, "down", {"cpu": "fused"})
    monkeypatch.setitem(resample_conv.AUTO, "up", {"cpu": "separate"})
    assert flops("auto", "auto") == (g_sep, d_fused)


@pytest.mark.parametrize("benchmark", [False, True])
def test_the_formulation_bench_times_with_cudnn_on_and_its_benchmark_as_the_trainer_sets_it(benchmark):
    """``torch.backends.cudnn.flags(benchmark=...)`` also turns cuDNN off (its ``enabled`` defaults to False): the
    H200's fifth run timed the resampling and RGB convolutions so, ~10x the step's own times, with the wrong
    winners. Every timing sees cuDNN on and its benchmark flag as given, and the flags come back as they were."""
    from hpc_gan.models.formulation_bench import bench_formulations
    seen = []

    def time_ms(fn):
        fn()
        seen.append((torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark))
        return 1.0
    plan = [("g", "conv", (1, 2, 5, 5), (3, 2, 3, 3), 1, [(2, False, False), (1, True, True)])]
    table = {"g": {"conv2d": lambda x, w, b, p: F.conv2d(x, w, b, padding=p)}}
    before = (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark)
    got = bench_formulations("t", plan, table, torch.device("cpu"), torch.float32, time_ms, 10.0, float("inf"),
                             benchmark)
    assert seen == [(True, benchmark)] * 2
    assert (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark) == before
    assert got["best"] == {"g": "conv2d"} and got["ms_per_iteration"]["conv"]["conv2d"] == 3.0


def test_rgb_conv_bench_finds_biggans_rgb_convolutions_and_times_them():
    """The RGB bench records, on the meta device, D's first block's two convolutions that read the image (3x3 at
    full size, the 1x1 shortcut after the pool) and G's output convolution, and on this CPU times each formulation
    of its side with the backward each step asks: D's on the joined real + fake batch with weight gradients (D
    steps) and on one batch with the input's (G step), G's forward alone (D steps) and with both (G step). Every
    label gets a per-iteration total for each formulation and a floor, and each side a fastest."""
    from pathlib import Path

    from hpc_gan.config import load
    from hpc_gan.models.rgb_conv_bench import bench_rgb_convs
    cfg = load(Path(__file__).parents[1] / "configs" / "imagenet128_reacgan_b2048.yaml",
               ["model.g_ch=8", "model.d_ch=8", "model.embed_dim=8"])
    d_out, g_in = 8 * biggan.D_ARCH[128]["out"][0], 8 * biggan.G_ARCH[128]["out"][-1]
    got = bench_rgb_convs(cfg, 1, torch.device("cpu"), torch.float32, lambda fn: (fn(), 1.0)[1], 10.0)
    calls = {(r["conv"], r["impl"], tuple(r["input"]), r["input_grad"], r["weight_grad"]): r["calls_per_iteration"]
             for r in got["rows"]}
    n_dis, k3, g = cfg.train.n_dis, f"D 3->{d_out} k3 at 128", f"G {g_in}->3 k3 at 128"
    assert calls[(k3, "conv2d", (2, 3, 128, 128), False, True)] == n_dis
    assert calls[(k3, "unfold_mm", (1, 3, 128, 128), True, False)] == 1
    assert calls[(g, "pad_out", (1, g_in, 128, 128), False, False)] == n_dis
    assert calls[(g, "nchw", (1, g_in, 128, 128), True, True)] == 1
    assert set(got["ms_per_iteration"]) == {k3, f"D 3->{d_out} k1 at 64", g} and set(got["best"]) == {"d", "g"}
    # each timed call took "1 ms": the totals count the calls per iteration
    assert {k: v for k, v in got["ms_per_iteration"][g].items() if k != "floor_ms"} == {
        "conv2d": n_dis + 1, "nchw": n_dis + 1, "pad_out": n_dis + 1}
    assert set(got["ms_per_iteration"][k3]) == {"floor_ms", "conv2d", "nchw", "unfold_mm"}
    assert all(0 < v["floor_ms"] for v in got["ms_per_iteration"].values())
    assert max(r["rel_error"] for r in got["rows"]) < 1e-5
