"""Adversarial losses, conditioning losses, orthogonal regularization and augmentations against hand-written
formulas."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hpc_gan.augment.diffaug import Draws, consistency_augment, cutout, diff_augment, translation
from hpc_gan.losses import cond_loss, d_adv_loss, g_adv_loss, gradient_penalty, orthogonal_reg
from hpc_gan.losses.conditioning import contrastive_2c, multi_hinge

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.3, 1.5])


@pytest.mark.parametrize("kind,d_want,g_want", [
    ("hinge", (0 + 0.5 + 2) / 3 + (0 + 1.3 + 2.5) / 3, -(-2 + 0.3 + 1.5) / 3),
    ("nonsaturating", sum(math.log1p(math.exp(-r)) for r in [2, .5, -1]) / 3
     + sum(math.log1p(math.exp(f)) for f in [-2, .3, 1.5]) / 3,
     sum(math.log1p(math.exp(-f)) for f in [-2, .3, 1.5]) / 3),
    ("least_squares", 0.5 * (1 + 0.25 + 4) / 3 + 0.5 * (4 + 0.09 + 2.25) / 3, 0.5 * (9 + 0.49 + 0.25) / 3),
    ("wasserstein", (-2 + 0.3 + 1.5) / 3 - (2 + 0.5 - 1) / 3, -(-2 + 0.3 + 1.5) / 3),
])
def test_adversarial_losses(kind, d_want, g_want):
    assert d_adv_loss(kind, REAL, FAKE).item() == pytest.approx(d_want, rel=1e-6)
    assert g_adv_loss(kind, FAKE).item() == pytest.approx(g_want, rel=1e-6)


def test_gradient_penalty_of_a_linear_critic():
    """D(x) = <w, x> has gradient w everywhere: GP = (|w| - 1)^2."""
    w = torch.randn(3 * 4 * 4)
    gp = gradient_penalty(lambda x: x.flatten(1) @ w, torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4),
                          torch.rand(5, 1, 1, 1))
    assert gp.item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "sdpa_narrow"])
def test_gradient_penalty_differentiates_through_fused_attention(impl):
    """A critic with self-attention through scaled_dot_product_attention: the penalty and its gradients w.r.t. the
    critic's weights (a double backward, which torch's fused attention kernels lack) equal those of the explicit
    attention map with the same weights, on fresh random inputs."""
    from functools import partial

    from hpc_gan.models.layers import SelfAttention, SNConv2d
    seed = int(torch.randint(0, 2 ** 31, (1,)))
    torch.manual_seed(seed)
    which_conv = partial(SNConv2d, kernel_size=3, padding=1)
    fast, ref = SelfAttention(16, which_conv, impl).eval(), SelfAttention(16, which_conv, "explicit").eval()
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        for m in (fast, ref):
            m.gamma.fill_(0.7)  # 0 at init would hide the attention branch
    w = torch.randn(16 * 6 * 10)
    real, fake, alpha = torch.randn(3, 16, 6, 10), torch.randn(3, 16, 6, 10), torch.rand(3, 1, 1, 1)
    gps = [gradient_penalty(lambda x, m=m: m(x).flatten(1) @ w, real, fake, alpha) for m in (fast, ref)]
    torch.testing.assert_close(gps[0], gps[1], rtol=1e-5, atol=1e-6, msg=f"seed {seed}")
    grads = [torch.autograd.grad(gp, list(m.parameters()), allow_unused=True) for gp, m in zip(gps, (fast, ref))]
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()), msg=f"seed {seed}")


def test_orthogonal_reg_matches_formula():
    ws = [torch.randn(4, 3, 3, 3), torch.randn(6, 5)]
    want = 0.0
    for w in ws:
        m = w.reshape(w.shape[0], -1).double()
        gram = m @ m.t()
        want += sum(gram[i, j].item() ** 2 for i in range(len(m)) for j in range(len(m)) if i != j)
    assert orthogonal_reg(ws, 1e-4).item() == pytest.approx(1e-4 * want, rel=1e-5)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    assert orthogonal_reg([q * 3.0], 1.0).item() == pytest.approx(0.0, abs=1e-4)  # norms are free


def test_contrastive_2c_against_loops():
    g = torch.Generator().manual_seed(4)
    e, p, y = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g), torch.tensor([0, 1, 0, 2, 1, 0])
    f, v = F.normalize(e.double(), dim=1), F.normalize(p.double(), dim=1)
    t, total = 0.3, 0.0
    for i in range(6):
        pos = math.exp(f[i] @ v[i] / t)
        same = sum(math.exp(f[i] @ f[k] / t) for k in range(6) if k != i and y[k] == y[i])
        alls = sum(math.exp(f[i] @ f[k] / t) for k in range(6) if k != i)
        total += -math.log((pos + same) / (pos + alls))
    assert contrastive_2c(e, p, y, t).item() == pytest.approx(total / 6, rel=1e-5)


def test_multi_hinge_and_dispatch():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 0.2, 0.1]])
    y = torch.tensor([0, 2])
    # row 0: max(0, 1 + 1 - 3) = 0; row 1: max(0, 1 + 0.2 - 0.1) = 1.1
    assert multi_hinge(logits, y).item() == pytest.approx(0.55)
    cfg = SimpleNamespace(temperature=0.5, m_p=0.9, m_n=None, d2d_mode="paper", backend="auto")
    out = {"adv": torch.zeros(2), "cls_logits": logits}
    assert cond_loss("ac", out, y, cfg).item() == pytest.approx(F.cross_entropy(logits, y).item())
    assert cond_loss("pd", out, y, cfg).item() == 0.0


def draws(seed, n, offset=0, total=None):
    return Draws(torch.Generator().manual_seed(seed), offset, n, total or n + offset)


@pytest.mark.parametrize("offset,n,total", [(-1, 4, 10), (7, 4, 10), (0, 11, 10)])
def test_draws_refuse_rows_outside_the_global_batch(offset, n, total):
    with pytest.raises(ValueError, match="outside a global batch of 10"):
        Draws(torch.Generator(), offset, n, total)


def test_augmentations_shapes_determinism_and_gradients():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    a = diff_augment(x, ["color", "translation", "cutout"], draws(1, 4))
    b = diff_augment(x, ["color", "translation", "cutout"], draws(1, 4))
    assert a.shape == x.shape and torch.equal(a, b)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # cutout zeroes at most an 8x8 square of a 16x16 image, clipped at the border
    zeros = (cutout(torch.ones(8, 1, 16, 16), draws(2, 8)) == 0).flatten(1).sum(1)
    assert (zeros > 0).all() and (zeros <= 64).all()
    # translation by at most 2 px keeps at least a 14x14 block of an image of ones
    t = translation(torch.ones(16, 1, 16, 16), draws(3, 16))
    assert (t.flatten(1).sum(1) <= 256).all() and (t.flatten(1).sum(1) >= 14 * 14).all()
    assert consistency_augment(x.detach(), draws(0, 4)).shape == x.shape


def test_augmentation_of_a_sample_does_not_depend_on_the_split():
    """Rows 3..6 of a global batch of 10 are augmented the same whether they come alone or with the others."""
    x = torch.randn(10, 3, 8, 8)
    policies = ["color", "translation", "cutout"]
    whole = diff_augment(x, policies, draws(7, 10))
    part = diff_augment(x[3:7], policies, draws(7, 4, offset=3, total=10))
    assert torch.equal(whole[3:7], part)
    assert torch.equal(consistency_augment(x, draws(5, 10))[3:7],
                       consistency_augment(x[3:7], draws(5, 4, offset=3, total=10)))


def test_orthogonal_gradient_added_directly_equals_autograd():
    """add_orthogonal_grad_ (BigGAN-PyTorch's way: 4 beta (W W^T * (1 - I)) W into .grad) against autograd through
    orthogonal_reg, in float64, conv- and linear-shaped weights, and onto existing gradients."""
    from hpc_gan.losses import add_orthogonal_grad_, orthogonal_reg
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    shapes = [(6, 4, 3, 3), (5, 7), (9, 2), (1, 3)]
    ws = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    start = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    value = orthogonal_reg(ws, 1e-2)
    auto = torch.autograd.grad(value, ws)
    direct = [w.detach().clone().requires_grad_() for w in ws]
    for w, s in zip(direct, start):
        w.grad = s.clone()
    got = add_orthogonal_grad_(direct, 1e-2)
    torch.testing.assert_close(got, value.detach())
    for w, a, s in zip(direct, auto, start):
        torch.testing.assert_close(w.grad, s + a)


@pytest.mark.parametrize("gram_max", [None, 0], ids=["gram", "tall_form"])
@pytest.mark.parametrize("world", [1, 2, 3, 7, 40])
def test_orthogonal_gradient_sharded_over_ranks_sums_to_autograd(world, gram_max, monkeypatch):
    """loss.ortho_impl=sharded: ortho_shards cuts the weights' rows into ``world`` runs of near-equal cost, every row
    in exactly one (more ranks than rows included: some get none); each rank's seed_orthogonal_grad_ at scale
    ``world`` onto its own copy of the weights, averaged over ranks as DDP's all-reduce does, equals autograd's
    gradient of orthogonal_reg in float64, and the ranks' values averaged equal its value. Both forms of a tall
    weight's rows (out > fan_in): through the Gram matrix, and (``GRAM_MAX`` 0) through its fan_in x fan_in W^T W."""
    from hpc_gan.losses import ortho_shards, orthogonal_reg, regularizers, seed_orthogonal_grad_
    if gram_max is not None:
        monkeypatch.setattr(regularizers, "GRAM_MAX", gram_max)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    shapes = [(6, 4, 3, 3), (5, 7), (9, 2), (1, 3), (12, 5)]
    ws = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    value = orthogonal_reg(ws, 1e-2)
    auto = torch.autograd.grad(value, ws)
    views = [(w.shape[0], w[0].numel()) for w in ws]
    shards = ortho_shards(views, world)
    rows = sorted((i, r) for shard in shards for i, r0, r1 in shard for r in range(r0, r1))
    assert rows == [(i, r) for i, (o, _) in enumerate(views) for r in range(o)]  # each row once
    assert any(regularizers.uses_tall_form(o, k) for o, k in views) == (gram_max == 0)  # the form under test
    row_cost = [k * k if regularizers.uses_tall_form(o, k) else o * k for o, k in views]
    costs = [sum((r1 - r0) * row_cost[i] for i, r0, r1 in shard) for shard in shards]
    assert all(abs(c - sum(costs) / world) <= max(row_cost) for c in costs)  # equal within one row
    grads, values = [torch.zeros_like(w) for w in ws], []
    for shard in shards:
        copies = [w.detach().clone().requires_grad_() for w in ws]  # this rank's G
        values.append(seed_orthogonal_grad_(copies, 1e-2, shard, world))
        for total, w in zip(grads, copies):
            if w.grad is not None:
                total += w.grad / world
    torch.testing.assert_close(torch.stack(values).mean(), value.detach())
    for got, want in zip(grads, auto):
        torch.testing.assert_close(got, want)
