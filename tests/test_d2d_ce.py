"""kernels.d2d_ce against an independent float64 re-derivation of ReACGAN's Eq. 6, its Properties 2-4, and
gradcheck."""
import math

import numpy as np
import pytest
import torch

from kernels import d2d_ce


def eq6_rows(embed, proxy, labels, t, m_p, m_n):
    """Per-row losses of Eq. 6, written out with loops in float64 numpy."""
    e = embed.detach().double().numpy()
    p = proxy.detach().double().numpy()
    y = labels.numpy()
    f = e / np.linalg.norm(e, axis=1, keepdims=True)
    v = p / np.linalg.norm(p, axis=1, keepdims=True)
    rows = []
    for i in range(len(y)):
        pos = math.exp(min(f[i] @ v[i] - m_p, 0.0) / t)
        neg = sum(math.exp(max(f[i] @ f[j] - m_n, 0.0) / t) for j in range(len(y)) if y[j] != y[i])
        rows.append(-math.log(pos / (pos + neg)))
    return rows


def eq6_reference(embed, proxy, labels, t, m_p, m_n):
    return float(np.mean(eq6_rows(embed, proxy, labels, t, m_p, m_n)))


def studiogan_reference(embed, proxy, labels, t, m_p):
    """PyTorch-StudioGAN's D2D-CE, re-derived in float64: negatives scaled by exp(-max_{j!=i}(s_ij - m_n)/t)."""
    e = embed.double().numpy()
    p = proxy.double().numpy()
    y = labels.numpy()
    f = e / np.linalg.norm(e, axis=1, keepdims=True)
    v = p / np.linalg.norm(p, axis=1, keepdims=True)
    n, m_n = len(y), 1.0 - m_p
    total = 0.0
    for i in range(n):
        sims = [(f[i] @ f[j] - m_n) / t for j in range(n) if j != i]
        shift = max(sims)
        pos_attr = max((m_p - f[i] @ v[i]) / t, 0.0)
        neg = sum(math.exp(max(sims[k], 0.0) - shift) for k, j in enumerate(j for j in range(n) if j != i)
                  if y[j] != y[i])
        total += pos_attr + math.log(math.exp(-pos_attr) + neg)
    return total / n


def _inputs(n, d, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g), torch.randn(n, d, generator=g),
            torch.randint(0, classes, (n,), generator=g))


@pytest.mark.parametrize("n,d,classes,t,m_p", [(7, 5, 3, 0.5, 0.98), (13, 16, 4, 0.25, 0.9), (2, 3, 2, 1.0, 0.5),
                                               (9, 4, 1, 0.5, 0.98)])
def test_matches_float64_eq6(n, d, classes, t, m_p):
    seed = int(torch.randint(0, 2 ** 31, (1,)))
    embed, proxy, labels = _inputs(n, d, classes, seed)
    got = d2d_ce(embed, proxy, labels, t, m_p).item()
    want = eq6_reference(embed, proxy, labels, t, m_p, 1.0 - m_p)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6), f"seed {seed}"


def test_explicit_negative_margin_and_rows_without_negatives():
    embed, proxy, _ = _inputs(6, 8, 2, 3)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    got = d2d_ce(embed, proxy, labels, 0.3, 0.7, m_n=0.2).item()
    assert got == pytest.approx(eq6_reference(embed, proxy, labels, 0.3, 0.7, 0.2), rel=1e-5)
    # one class only: no negatives anywhere, every row's loss is -log(pos/pos) = 0
    assert d2d_ce(embed, proxy, torch.zeros(6, dtype=torch.long), 0.3, 0.7).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("n,classes", [(8, 3), (11, 5), (5, 1)])
def test_studiogan_mode(n, classes):
    embed, proxy, labels = _inputs(n, 6, classes, n)
    got = d2d_ce(embed, proxy, labels, 0.5, 0.9, mode="studiogan").item()
    assert got == pytest.approx(studiogan_reference(embed, proxy, labels, 0.5, 0.9), rel=1e-5, abs=1e-6)
    assert got != pytest.approx(d2d_ce(embed, proxy, labels, 0.5, 0.9).item(), rel=1e-3) or classes == 1


def test_property4_global_minimum_and_zero_gradients():
    """Easy positives (s_i >= m_p) and easy negatives (s_ij <= m_n): loss = (1/N) sum log(1 + |N(i)|), no gradient."""
    labels = torch.tensor([0, 1, 1, 2, 0, 3])
    embed = torch.eye(6, 8, dtype=torch.float64).requires_grad_(True)   # orthogonal: s_ij = 0 <= m_n
    proxy = (torch.eye(6, 8, dtype=torch.float64) * 3.0).requires_grad_(True)  # same direction: s_i = 1 >= m_p
    loss = d2d_ce(embed, proxy, labels, 0.5, 0.9)
    n_neg = [(labels != labels[i]).sum().item() for i in range(6)]
    assert loss.item() == pytest.approx(sum(math.log(1 + k) for k in n_neg) / 6, rel=1e-12)
    loss.backward()
    assert embed.grad.abs().max().item() < 1e-12
    assert proxy.grad.abs().max().item() < 1e-12


def test_property2_easy_positive_has_no_gradient():
    embed, proxy, labels = _inputs(6, 5, 3, 11)
    embed, proxy = embed.double(), proxy.double()
    proxy[0] = embed[0] * 2.0                                   # s_0 = 1 >= m_p: easy positive
    proxy.requires_grad_(True)
    d2d_ce(embed, proxy, labels, 0.5, 0.9).backward()
    assert proxy.grad[0].abs().max().item() < 1e-12
    assert proxy.grad[1:].abs().max().item() > 1e-6             # hard positives do move


def test_property3_easy_negatives_do_not_change_the_loss():
    """Moving negatives around below the margin m_n changes nothing: their derivative is zero."""
    labels = torch.tensor([0, 1, 2])
    proxy = torch.eye(3, 4, dtype=torch.float64)
    a = torch.eye(3, 4, dtype=torch.float64)
    b = a.clone()
    b[1, 3] = 0.1                                               # s_01 stays 0; s_12 stays 0; norms change a bit
    b[2, 0] = 0.05                                              # s_02 = 0.05 / |b2| <= m_n = 0.1
    la = d2d_ce(a, proxy, labels, 0.5, 0.9).item()
    assert d2d_ce(b, proxy, labels, 0.5, 0.9, m_n=0.1).item() == pytest.approx(la, rel=1e-3)
    # above the margin the same move is felt
    b[2, 0] = 0.9
    assert d2d_ce(b, proxy, labels, 0.5, 0.9, m_n=0.1).item() > la + 1e-3


def test_gradcheck_float64():
    embed, proxy, labels = _inputs(7, 4, 3, 5)
    embed = embed.double().requires_grad_(True)
    proxy = proxy.double().requires_grad_(True)
    # margins away from the hinge kinks: gradcheck needs a locally smooth function
    assert torch.autograd.gradcheck(lambda e, p: d2d_ce(e, p, labels, 0.5, 0.5, m_n=-1.0), (embed, proxy))


def test_studiogan_gradient_treats_the_shift_as_constant():
    """StudioGAN detaches the row max: the gradient is that of the loss with the shift held fixed."""
    embed, proxy, labels = _inputs(7, 4, 3, 8)
    embed = embed.double().requires_grad_(True)
    proxy = proxy.double().requires_grad_(True)
    t, m_p = 0.5, 0.8
    m_n = 1 - m_p
    with torch.no_grad():
        f = torch.nn.functional.normalize(embed, dim=1)
        sims = (f @ f.t() - m_n) / t
        shift = sims.masked_fill(torch.eye(7, dtype=torch.bool), -1e9).max(1).values

    def fixed_shift(e, p):
        f = torch.nn.functional.normalize(e, dim=1)
        v = torch.nn.functional.normalize(p, dim=1)
        sim = (f @ f.t() - m_n) / t
        pos_attr = torch.relu((m_p - (f * v).sum(1)) / t)
        neg = ((labels[:, None] != labels[None, :]) * torch.exp(torch.relu(sim) - shift[:, None])).sum(1)
        return (pos_attr + torch.log(torch.exp(-pos_attr) + neg)).mean()

    assert torch.autograd.gradcheck(fixed_shift, (embed, proxy))
    got = torch.autograd.grad(d2d_ce(embed, proxy, labels, t, m_p, mode="studiogan"), (embed, proxy))
    want = torch.autograd.grad(fixed_shift(embed, proxy), (embed, proxy))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_global_negatives_columns():
    """This rank's rows against the gathered batch's columns equal those rows of the full-batch loss, and the
    gradient reaches the gathered columns."""
    embed, proxy, labels = _inputs(10, 6, 3, 21)
    cols = embed.clone().requires_grad_(True)
    local = d2d_ce(embed[4:8], proxy[4:8], labels[4:8], 0.5, 0.9, negatives=(cols, labels), row_offset=4)
    want = np.mean(eq6_rows(embed, proxy, labels, 0.5, 0.9, 0.1)[4:8])
    assert local.item() == pytest.approx(want, rel=1e-5)
    local.backward()
    assert cols.grad[:4].abs().sum() > 0 and cols.grad[8:].abs().sum() > 0


def test_bad_inputs():
    embed, proxy, labels = _inputs(4, 3, 2, 0)
    with pytest.raises(ValueError, match="mode"):
        d2d_ce(embed, proxy, labels, 0.5, 0.9, mode="nope")
    with pytest.raises(ValueError, match="temperature"):
        d2d_ce(embed, proxy, labels, 0.0, 0.9)
    with pytest.raises(ValueError, match="labels"):
        d2d_ce(embed, proxy, labels[:3], 0.5, 0.9)
