"""The Triton kernels against their torch references (which test_d2d_ce / test_models check against float64 and
torch's own spectral_norm): fresh random inputs every run, odd shapes, both D2D-CE modes, global negatives, rows
without negatives, and the fused spectral norm inside a real model. On CPU through TRITON_INTERPRET=1 (fp32)."""
import copy
import importlib.util
import inspect
import math
import re
from pathlib import Path

import pytest
import torch

from hpc_gan.models import biggan
from hpc_gan.models.sn_fused import FusedSpectralNorm, sn_sigmas
from kernels import d2d_ce, normalized_similarity, sn_power_iteration, spectral_normalize

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e .[triton])")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = Path(__file__).resolve().parents[1]


def fresh_seed():
    return int(torch.randint(0, 2 ** 31, (1,)))


def close(a, b, what, seed, tol=2e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what} (seed {seed}): {m}")


def d2d_case(n, d, classes, seed, n_global=None, offset=0):
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(n, d, generator=g)
    proxy = torch.randn(n, d, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    if n_global is None:
        return embed, proxy, labels, None
    others = torch.randn(n_global - n, d, generator=g)
    other_labels = torch.randint(0, classes, (n_global - n,), generator=g)
    cols = torch.cat([others[:offset], embed, others[offset:]])  # this rank's rows sit at [offset, offset + n)
    col_labels = torch.cat([other_labels[:offset], labels, other_labels[offset:]])
    return embed, proxy, labels, (cols, col_labels)


def run_d2d(backend, embed, proxy, labels, negatives, offset, mode, t, m_p):
    leaves = [x.clone().to(DEV).requires_grad_() for x in (embed, proxy)]
    neg = None
    if negatives is not None:
        leaves.append(negatives[0].clone().to(DEV).requires_grad_())
        neg = (leaves[2], negatives[1].to(DEV))
    loss = d2d_ce(leaves[0], leaves[1], labels.to(DEV), t, m_p, mode=mode, backend=backend, negatives=neg,
                  row_offset=offset)
    return loss, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("mode", ["paper", "studiogan"])
@pytest.mark.parametrize("n,d,classes,n_global,offset", [
    (7, 5, 3, None, 0), (37, 33, 4, None, 0), (33, 70, 10, None, 0),     # odd sizes across tile edges
    (11, 17, 3, 45, 22), (5, 9, 2, 67, 62),                               # global negatives, rows at an offset
    (9, 20, 1, None, 0), (6, 8, 1, 19, 7)])                               # one class: no row has negatives
def test_triton_d2d_ce_matches_torch(mode, n, d, classes, n_global, offset):
    seed = fresh_seed()
    embed, proxy, labels, negatives = d2d_case(n, d, classes, seed, n_global, offset)
    t, m_p = 0.5, 0.9
    ref_loss, ref_grads = run_d2d("torch", embed, proxy, labels, negatives, offset, mode, t, m_p)
    loss, grads = run_d2d("triton", embed, proxy, labels, negatives, offset, mode, t, m_p)
    close(loss, ref_loss, "loss", seed)
    for name, a, b in zip(("embed", "proxy", "negatives"), grads, ref_grads):
        close(a, b, f"grad {name}", seed)
    if classes == 1:
        assert loss.item() == 0.0


def test_triton_d2d_ce_some_rows_without_negatives_and_small_temperature():
    seed = fresh_seed()
    embed, proxy, _, _ = d2d_case(10, 12, 2, seed)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])  # rows of class 0 have two negatives, class 1 has eight
    labels = labels[torch.randperm(10, generator=torch.Generator().manual_seed(seed))]
    for t in (0.05, 1.0):
        ref = run_d2d("torch", embed, proxy, labels, None, 0, "paper", t, 0.98)
        got = run_d2d("triton", embed, proxy, labels, None, 0, "paper", t, 0.98)
        close(got[0], ref[0], f"loss t={t}", seed, tol=1e-4)
        for a, b in zip(got[1], ref[1]):
            close(a, b, f"grads t={t}", seed, tol=1e-4)


def test_gathered_negatives_get_the_full_gradient():
    """The gradient w.r.t. the gathered columns is the gradient of this rank's loss, not divided by a world size:
    summed over ranks it gives the global batch's gradient."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    n, world, d = 6, 3, 8
    embed_all = torch.randn(n * world, d, generator=g).to(DEV).requires_grad_()
    proxy_all = torch.randn(n * world, d, generator=g).to(DEV)
    labels_all = torch.randint(0, 4, (n * world,), generator=g).to(DEV)
    full = d2d_ce(embed_all, proxy_all, labels_all, 0.5, 0.9, backend="torch") * world
    want = torch.autograd.grad(full, embed_all)[0]
    cols = embed_all.detach().clone().requires_grad_()
    total = 0
    for r in range(world):
        sl = slice(r * n, (r + 1) * n)
        rows = cols[sl]  # the rank's own rows are its slice of the gathered tensor, as after a gather
        total = total + d2d_ce(rows, proxy_all[sl], labels_all[sl], 0.5, 0.9, backend="triton",
                               negatives=(cols, labels_all), row_offset=r * n)
    got = torch.autograd.grad(total, cols)[0]
    close(got, want, "summed per-rank gradient", seed)


@pytest.mark.parametrize("tmode", ["matrix", "fused", "stream"])
@pytest.mark.parametrize("wanted", [(True, True, True), (True, False, False), (False, True, False),
                                    (False, False, True)])
def test_each_input_gradient_alone_in_every_mode(tmode, wanted):
    """Gradients of any subset of (embed, proxy, columns), in the self case (columns = rows, both sides summed in one
    finishing pass) and with gathered columns, equal the torch reference's."""
    seed = fresh_seed()
    for n_global in (None, 57):
        embed, proxy, labels, negatives = d2d_case(19, 21, 4, seed, n_global, 0 if n_global is None else 30)
        offset = 0 if n_global is None else 30
        got = {}
        for backend in ("torch", "triton"):
            leaves = [x.clone().to(DEV).requires_grad_(w) for x, w in zip((embed, proxy), wanted)]
            neg = None
            if negatives is not None:
                leaves.append(negatives[0].clone().to(DEV).requires_grad_(wanted[2]))
                neg = (leaves[2], negatives[1].to(DEV))
            loss = d2d_ce(leaves[0], leaves[1], labels.to(DEV), 0.3, 0.8, mode="studiogan", backend=backend,
                          negatives=neg, row_offset=offset, triton_mode=tmode)
            want = [x for x in leaves if x.requires_grad]
            got[backend] = (loss, torch.autograd.grad(loss, want) if want else ())
        close(got["triton"][0], got["torch"][0], f"loss ({tmode}, {wanted}, {n_global})", seed)
        for a, b in zip(got["triton"][1], got["torch"][1]):
            close(a, b, f"grads ({tmode}, {wanted}, {n_global})", seed)


def test_d2d_ce_products_ignore_the_callers_autocast():
    """The "matrix" mode's cuBLAS product runs outside autocast: fp32 inputs give the same loss and gradients inside
    a bf16 autocast region as outside it (under autocast the product alone would be rounded to bf16)."""
    seed = fresh_seed()
    embed, proxy, labels, negatives = d2d_case(12, 24, 3, seed, 40, 5)
    runs = []
    for ctx in (torch.autocast(DEV.type, dtype=torch.bfloat16), torch.autocast(DEV.type, enabled=False)):
        leaves = [x.clone().to(DEV).requires_grad_() for x in (embed, proxy, negatives[0])]
        with ctx:  # the backward too, as a loop calling backward() inside the region would
            loss = d2d_ce(leaves[0], leaves[1], labels.to(DEV), 0.5, 0.9, backend="triton",
                          negatives=(leaves[2], negatives[1].to(DEV)), row_offset=5, triton_mode="matrix")
            runs.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    for a, b in zip(*runs):
        assert torch.equal(a, b), f"autocast changed the Triton D2D-CE (seed {seed})"


# ---- launch counts in Triton's interpreter: Triton launches, and the aten ops that would be device kernels ---------
# what the interpreter itself dispatches to move arguments in and out; allocations and views launch nothing
HOST_SIDE = {"empty", "empty_like", "new_empty", "set_", "copy_", "select", "t", "detach", "view", "slice",
             "_unsafe_view", "alias", "reshape", "lift_fresh", "as_strided", "split", "split_with_sizes"}


@pytest.fixture
def interpreter_launches(monkeypatch):
    """The names of the Triton kernels launched through the interpreter, in order (the list is cleared by tests)."""
    from triton.runtime.interpreter import InterpretedFunction
    launches = []
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: launches.append(self.fn.__name__) or
                        run(self, *a, **k))
    return launches


def device_ops():
    """A dispatch mode that records the aten ops outside HOST_SIDE (``.ops``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in HOST_SIDE:
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))
    return Ops()


@pytest.mark.skipif(DEV.type == "cuda", reason="counts interpreter launches; on a GPU the check pack profiles them")
@pytest.mark.parametrize("gathered", [False, True])
@pytest.mark.parametrize("mode", ["auto", "fused"])
def test_d2d_ce_runs_in_a_few_launches(gathered, mode, interpreter_launches):
    """The whole loss, forward and backward, is a handful of device launches: 4-5 Triton kernels, torch.mm for the
    products (the forward's in "matrix" mode, which "auto" takes at these sizes, and the backward's two) and the
    mean. The glue around the kernels (normalizations, positive term, log-add-exp, casts, the chain rule) cost 94
    launches per call on an H100 before it moved into the kernels."""
    launches = interpreter_launches
    embed, proxy, labels, negatives = d2d_case(24, 40, 5, fresh_seed(), 100 if gathered else None, 10)
    leaves = [x.clone().requires_grad_() for x in (embed, proxy) + ((negatives[0],) if gathered else ())]
    neg = (leaves[2], negatives[1]) if gathered else None
    kw = dict(backend="triton", negatives=neg, row_offset=10 if gathered else 0, triton_mode=mode)
    d2d_ce(leaves[0], leaves[1], labels, 0.5, 0.9, **kw)
    launches.clear()  # the first call autotunes
    with device_ops() as ops:
        loss = d2d_ce(leaves[0], leaves[1], labels, 0.5, 0.9, **kw)
        torch.autograd.grad(loss, leaves)
    forward = ["inv_norms_kernel", "d2d_rows_kernel"] if mode == "auto" else ["neg_lse_split_kernel",
                                                                              "d2d_combine_kernel"]
    # ones_like: autograd's seed gradient
    assert sorted(ops.ops) == ["mean"] + ["mm"] * (3 if mode == "auto" else 2) + ["ones_like"], ops.ops
    assert launches == forward + ["d2d_grad_matrix_kernel"] + ["d2d_finish_kernel"] * (2 if gathered else 1), \
        launches


@pytest.mark.skipif(DEV.type == "cuda", reason="counts interpreter launches; on a GPU the check pack profiles them")
def test_spectral_normalize_runs_in_a_few_launches(interpreter_launches):
    """A whole network's W / sigma: 3 Triton launches forward and 2 backward, whatever the number of layers; the
    backward reads the layers' gradients where they are (their concatenation was 11% of the job on the H200).
    (Slices of one output buffer, taken outside the autograd function, had made autograd build a zero-filled
    whole-size gradient per layer and sum them.)"""
    launches = interpreter_launches
    ws, us = sn_case(fresh_seed())
    spectral_normalize(ws, us, 1, 1e-12, "triton")  # the first call builds the tile plan
    launches.clear()
    with device_ops() as fwd:
        normalized = spectral_normalize(ws, us, 1, 1e-12, "triton")[0]
    assert launches == ["sn_v_kernel", "sn_u_kernel", "sn_scale_kernel"] and not fwd.ops, (launches, fwd.ops)
    launches.clear()
    grads = [torch.ones_like(x) for x in normalized[:-1]]  # one layer's output unused
    with device_ops() as bwd:
        torch.autograd.backward(normalized[:-1], grads)
    assert launches == ["sn_dot_kernel", "sn_normalize_grad_kernel"], launches
    assert bwd.ops == ["zeros"], bwd.ops  # the unused layer's gradient


def test_spectral_normalize_is_one_autograd_node_whose_inputs_are_the_weights():
    """W / sigma leaves the fused function in each weight's own shape (conv weights 4-D), and the u vectors ride
    outside autograd's inputs: the whole network's job is one autograd node whose inputs are the weights alone, no
    view node per layer. A view node per layer and the u vectors as inputs had been half the job's host time at
    BigGAN-128's 65 layers (scripts/host_probe.py sn: 2.26 -> 1.1 ms on the development CPU)."""
    g = torch.Generator().manual_seed(fresh_seed())
    shapes = [(6, 5, 3, 3), (4, 9), (3, 2, 1, 1)]
    ws = [torch.randn(*s, generator=g).to(DEV).requires_grad_() for s in shapes]
    us = [torch.nn.functional.normalize(torch.randn(s[0], generator=g), dim=0).to(DEV) for s in shapes]
    normalized = spectral_normalize(ws, us, 1, 1e-12, "triton")[0]
    assert [x.shape for x in normalized] == [w.shape for w in ws]
    nodes = {x.grad_fn for x in normalized}
    assert len(nodes) == 1, [type(n).__name__ for n in nodes]
    node = nodes.pop()
    assert type(node).__name__ == "_FusedNormalizeBackward", type(node).__name__
    inputs = [fn.variable for fn, _ in node.next_functions if fn is not None]
    assert len(inputs) == len(ws) and all(a is b for a, b in zip(inputs, ws)), "the weights, and nothing else"


@pytest.mark.parametrize("counter", ["count", "v_count"])
def test_kernel_debug_mode_catches_a_missed_last_program(counter, monkeypatch):
    """HPC_GAN_KERNEL_DEBUG=1: a matrix whose last program never runs (its arrival counter corrupted for real: the
    u pass's, or the v pass's of the matrices split into row chunks) is an error naming it, not a sigma read from
    an uninitialized buffer; without the corruption the same call passes."""
    from kernels.spectral_norm_triton import Tiles, fused_power_iteration, plan_for
    ws, us = sn_case(fresh_seed())
    ws = [w.detach() for w in ws]
    tiles = Tiles(32, 32, 64, rch=64)  # the interpreter's, on a GPU too: matrices of 70 and 150 rows split
    monkeypatch.setenv("HPC_GAN_KERNEL_DEBUG", "1")
    fused_power_iteration(ws, us, 1, 1e-12, tiles)
    plan = plan_for(ws, tiles)
    assert int(plan.v_nchunk.max()) > 1
    getattr(plan, counter).fill_(1000)  # no program's arrival is ever the last
    try:
        with pytest.raises(RuntimeError, match=r"no last program ran for matrices \[.*\(150, 36\)"):
            fused_power_iteration(ws, us, 1, 1e-12, tiles)
    finally:
        getattr(plan, counter).zero_()
    fused_power_iteration(ws, us, 1, 1e-12, tiles)


@pytest.mark.parametrize("n,m,d", [(13, 5, 7), (1, 40, 33), (32, 32, 32)])
def test_normalized_similarity_matches_torch(n, m, d):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    out = {}
    for backend in ("torch", "triton"):
        a_, b_ = a.clone().to(DEV).requires_grad_(), b.clone().to(DEV).requires_grad_()
        s = normalized_similarity(a_, b_, backend=backend)
        grad_out = torch.randn(n, m, generator=torch.Generator().manual_seed(seed + 1)).to(DEV)
        out[backend] = (s, *torch.autograd.grad(s, (a_, b_), grad_out))
    for name, x, y in zip(("S", "dA", "dB"), out["triton"], out["torch"]):
        close(x, y, name, seed)


@pytest.mark.skipif(DEV.type == "cuda", reason="checks the CPU interpreter's fp32-only refusal; with CUDA the "
                                               "tests run on GPU tensors, where it does not apply")
def test_triton_backend_refuses_what_the_interpreter_cannot_run():
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="fp32 only.*float64"):
        d2d_ce(x, x, torch.tensor([0, 1, 0, 1]), 0.5, 0.9, backend="triton")
    assert d2d_ce(x.float(), x.float(), torch.tensor([0, 1, 0, 1]), 0.5, 0.9, backend="auto").requires_grad is False


# rows past the interpreter's 64-row v-pass chunk (70, 150: 2 and 3 chunks; 150 x 36 also two column tiles)
SN_SHAPES = [(5, 7), (33, 3), (1, 40), (17, 17), (70, 9), (4, 130), (150, 36)]


def sn_case(seed):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(*s, generator=g).to(DEV).requires_grad_() for s in SN_SHAPES]
    us = [torch.nn.functional.normalize(torch.randn(s[0], generator=g), dim=0).to(DEV) for s in SN_SHAPES]
    return ws, us


@pytest.mark.parametrize("backend", ["triton", "foreach"])
@pytest.mark.parametrize("n_iters", [1, 3])
def test_sn_power_iteration_matches_torch_loop(n_iters, backend):
    seed = fresh_seed()
    ws, us = sn_case(seed)
    us_before = [u.clone() for u in us]
    ref = sn_power_iteration(ws, us, n_iters, backend="torch")
    got = sn_power_iteration(ws, us, n_iters, backend=backend)
    close(got[0], ref[0], "sigma", seed)
    for i, (a, b) in enumerate(zip(got[1], ref[1])):
        close(a, b, f"u of matrix {i}", seed)
    for i, (a, b) in enumerate(zip(got[2], ref[2])):
        close(a, b, f"v of matrix {i}", seed)
    assert all(torch.equal(u, b) for u, b in zip(us, us_before)), "inputs must not be modified"
    weights = torch.randn(len(ws), generator=torch.Generator().manual_seed(seed)).to(DEV)
    g_ref = torch.autograd.grad((ref[0] * weights).sum(), ws)
    g_got = torch.autograd.grad((got[0] * weights).sum(), ws)
    for i, (a, b) in enumerate(zip(g_got, g_ref)):
        close(a, b, f"d sigma / d W of matrix {i}", seed)


@pytest.mark.parametrize("tiles", [(16, 32, 64, 4, 1), (8, 16, 16, 2, 3, 16), (4, 8, 24, 1, 1, 8)])
def test_sn_kernels_agree_under_other_tilings(tiles):
    """The tilings the check pack's sweep times (kernels.bench.bench_sn_tiles) give the torch loop's W / sigma, u,
    v and gradients: rows and columns per tile smaller and larger than the matrices, one-tile u-pass chunks, no
    v-pass row chunks (2048 rows) and many (8 or 16 rows). A u-pass chunk that is not a multiple of the column
    tile, or a v-pass chunk not a multiple of the row tile, is refused."""
    from kernels.spectral_norm_triton import Tiles, fused_normalize
    seed = fresh_seed()
    ws, us = sn_case(seed)
    ref_ws = [w.detach().clone().requires_grad_() for w in ws]
    upstream = [torch.randn(*s, generator=torch.Generator().manual_seed(seed + i)).to(DEV)
                for i, s in enumerate(SN_SHAPES)]
    got, gu, gv, sig = fused_normalize(ws, us, 1, 1e-12, torch.float32, Tiles(*tiles))
    want, wu, wv, wsig = spectral_normalize(ref_ws, us, 1, 1e-12, "torch")
    torch.autograd.backward(got, upstream)
    torch.autograd.backward(want, upstream)
    close(sig, wsig, "sigma", seed)
    for i in range(len(SN_SHAPES)):
        close(got[i], want[i], f"W / sigma of matrix {i}", seed)
        close(gu[i], wu[i], f"u of matrix {i}", seed)
        close(gv[i], wv[i], f"v of matrix {i}", seed)
        close(ws[i].grad, ref_ws[i].grad, f"gradient of matrix {i}", seed)
    with pytest.raises(ValueError, match="multiple of bc"):
        fused_normalize(ws, us, 1, 1e-12, torch.float32, Tiles(8, 16, 24))
    with pytest.raises(ValueError, match="rch of br"):
        fused_normalize(ws, us, 1, 1e-12, torch.float32, Tiles(8, 16, 16, rch=12))


def test_spectral_normalize_matches_float64_autograd():
    """The whole-network W / sigma (foreach, and triton + a division) against autograd through a float64 loop:
    values and gradients, conv-shaped (4-D) weights included; a weight without upstream gradient gets a zero one."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5, 3, 3), (4, 9), (13, 6, 1, 1), (3, 3), (1, 40)]
    ws = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    us = [torch.nn.functional.normalize(torch.randn(s[0], generator=g, dtype=torch.float64), dim=0) for s in shapes]
    gs = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    w64 = [w.clone().requires_grad_() for w in ws]
    u, v = list(us), []
    with torch.no_grad():
        for i, w in enumerate(w64):
            m = w.reshape(w.shape[0], -1)
            v.append(torch.nn.functional.normalize(m.t() @ u[i], dim=0))
            u[i] = torch.nn.functional.normalize(m @ v[i], dim=0)
    want = [w / torch.dot(ui, w.reshape(w.shape[0], -1) @ vi) for w, ui, vi in zip(w64, u, v)]
    sum((a * b).sum() for a, b in zip(want[:-1], gs)).backward()
    for backend in ("foreach", "triton"):
        wf = [w.float().to(DEV).requires_grad_() for w in ws]
        got, gu, gv, sig = spectral_normalize(wf, [x.float().to(DEV) for x in us], 1, 1e-12, backend)
        sum((a * b.float().to(DEV)).sum() for a, b in zip(got[:-1], gs)).backward()
        for i in range(len(shapes)):
            close(got[i], want[i].float().to(DEV), f"{backend}: W / sigma of weight {i}", seed)
            close(gu[i], u[i].float().to(DEV), f"{backend}: u of weight {i}", seed)
            want_g = torch.zeros_like(wf[i]) if w64[i].grad is None else w64[i].grad.float().to(DEV)
            close(wf[i].grad, want_g, f"{backend}: gradient of weight {i}", seed)


@pytest.mark.parametrize("backend", ["triton", "foreach"])
def test_spectral_normalize_writes_the_layers_compute_dtype(backend):
    """out_dtype=bf16 (what layers under bf16 autocast compute in): W / sigma rounded once to bf16, as autocast's
    cast of the fp32 result would (within one bf16 step: sigma's last bits differ from the loop's, and Triton's CPU
    interpreter truncates to bf16 where a GPU rounds to nearest), and fp32 gradients for the fp32 weights equal to
    the loop's."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5, 3, 3), (4, 9), (33, 70)]
    ws = [torch.randn(*s, generator=g).to(DEV) for s in shapes]
    us = [torch.nn.functional.normalize(torch.randn(s[0], generator=g), dim=0).to(DEV) for s in shapes]
    outs = {}
    for which in (backend, "torch"):
        leaves = [w.clone().requires_grad_() for w in ws]
        got = spectral_normalize(leaves, us, 1, 1e-12, which, out_dtype=torch.bfloat16)[0]
        assert all(x.dtype == torch.bfloat16 and x.shape == w.shape for x, w in zip(got, ws))
        grads = torch.autograd.grad(got, leaves, [torch.ones_like(x) for x in got])
        outs[which] = (got, grads)
    for a, b in zip(outs[backend][0], outs["torch"][0]):
        close(a.float(), b.float(), f"{backend}: bf16 W / sigma", seed, tol=8e-3)
    for a, b in zip(outs[backend][1], outs["torch"][1]):
        assert a.dtype == torch.float32
        close(a, b, f"{backend}: gradient", seed, tol=1e-4)


def test_spectral_normalize_reads_weights_at_any_alignment():
    """The SN kernels load rows as 4-wide vectors where a weight's pointer is 16-byte aligned and its rows hold a
    multiple of 4; weights that are views at an odd offset into one buffer (as in a flat parameter store) take the
    scalar build (on a GPU a wrong hint is a misaligned-address fault), and so do incoming gradients at an odd
    offset (the backward reads them where they are). Values and gradients against the loop."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 12), (5, 4, 3, 3), (16, 36), (3, 7)]
    sizes = [math.prod(s) for s in shapes]
    outs = {}
    for which in ("triton", "torch"):
        store = torch.randn(1 + sum(sizes), generator=torch.Generator().manual_seed(seed)).to(DEV)
        store.requires_grad_()
        starts = [1 + sum(sizes[:i]) for i in range(len(sizes))]  # 4 bytes past an aligned start
        ws = [store[a:a + n].view(*s) for a, n, s in zip(starts, sizes, shapes)]
        us = [torch.nn.functional.normalize(torch.randn(s[0], generator=g), dim=0).to(DEV) for s in shapes]
        g.manual_seed(seed)
        got = spectral_normalize(ws, us, 1, 1e-12, which)[0]
        upstream = torch.randn(1 + sum(sizes), generator=torch.Generator().manual_seed(seed + 1)).to(DEV)
        gouts = [upstream[a:a + n].view(*s) for a, n, s in zip(starts, sizes, shapes)]
        (grad,) = torch.autograd.grad(got, store, gouts)
        outs[which] = (got, grad)
    for i, (a, b) in enumerate(zip(outs["triton"][0], outs["torch"][0])):
        close(a, b, f"W / sigma of weight {i}", seed)
    close(outs["triton"][1], outs["torch"][1], "gradient of the store", seed, tol=1e-4)


def test_sn_power_iteration_converges_to_the_spectral_norm():
    """Random orthogonal factors around a spectrum with a clear gap (sigma_2 / sigma_1 <= 0.7), so 40 iterations
    reach 1e-5; torch.linalg.matrix_norm(ord=2) is the independent answer."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    ws = []
    for r, c in SN_SHAPES:
        k = min(r, c)
        q1 = torch.linalg.qr(torch.randn(r, k, generator=g))[0]
        q2 = torch.linalg.qr(torch.randn(c, k, generator=g))[0]
        s = torch.rand(k, generator=g) * 0.7 * 3.0
        s[0] = 3.0 + torch.rand((), generator=g)
        ws.append((q1 * s) @ q2.t())
    us = [torch.nn.functional.normalize(torch.randn(r, generator=g), dim=0) for r, _ in SN_SHAPES]
    sigmas, _, _ = sn_power_iteration([w.to(DEV) for w in ws], [u.to(DEV) for u in us], 40, backend="triton")
    want = torch.stack([torch.linalg.matrix_norm(w.double(), ord=2) for w in ws]).float().to(DEV)
    close(sigmas, want, "sigma after 40 iterations", seed, tol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "foreach"])
def test_fused_sn_hands_autocast_layers_their_compute_dtype(backend):
    """Under bf16 autocast, convs and linears get W / sigma in bf16 (no cast per layer and forward), the embedding
    (D's proxies) keeps fp32, as autocast itself would; D's outputs match the per-layer reference's under autocast."""
    from hpc_gan.models.layers import spectral_norm_layers
    seed = fresh_seed()
    torch.manual_seed(seed)
    ref = biggan.Discriminator(16, 4, 3, "d2d_ce", 8, 8).to(DEV).train()
    fused = biggan.Discriminator(16, 4, 3, "d2d_ce", 8, 8).to(DEV).train()
    fused.load_state_dict(ref.state_dict())
    FusedSpectralNorm(fused, backend=backend)
    seen = {}
    for m in spectral_norm_layers(fused):
        m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(type(mod).__name__ + str(id(mod)),
                                                                        (type(mod).__name__, mod.fused_weight.dtype)))
    ref32 = copy.deepcopy(ref)  # before any forward: a training-mode forward advances u
    x, y = torch.randn(4, 3, 16, 16).to(DEV), torch.randint(0, 3, (4,)).to(DEV)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        outs = [net(x, y) for net in (ref, fused)]
    exact = ref32(x, y)
    dtypes = set(seen.values())
    assert dtypes == {("SNConv2d", torch.bfloat16), ("SNLinear", torch.bfloat16), ("SNEmbedding", torch.float32)}, \
        dtypes
    # Both paths err from the fp32 outputs by bf16 rounding, amplified by however much this random D's outputs
    # cancel: the reference's own error under autocast measures that. Triton's CPU interpreter truncates fp32 ->
    # bf16 where a GPU rounds to nearest, a bias on every weight: over 60 seeds the interpreted path's error was up
    # to 4.4x the reference's plus 1-3%; a fixed 5% bound failed one run in ~10 against the autocast reference
    # (13%: that seed's outputs cancel, the reference itself was 3.8% off)
    for key in ("adv", "embed"):
        want = exact[key].detach().float()
        ref_err, fused_err = (float((o[key].detach().float() - want).norm() / want.norm()) for o in outs)
        bound = 6 * ref_err + 3e-2
        assert fused_err < bound, f"D {key} under autocast: {fused_err:.4f} from fp32, bound {bound:.4f} (seed {seed})"


@pytest.mark.parametrize("backend", ["triton", "foreach"])
def test_model_with_fused_sn_equals_reference(backend):
    """Tiny BigGAN G and D: training-mode forwards with the fused SN give the reference's outputs, u, v buffers,
    sigmas and gradients; eval mode leaves the fused path alone."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    nets = {"G": biggan.Generator(16, 4, 3, 24, 8, 8), "D": biggan.Discriminator(16, 4, 3, "d2d_ce", 8, 8)}
    for name, ref in nets.items():
        ref = ref.to(DEV).train()
        fused = biggan.Generator(16, 4, 3, 24, 8, 8) if name == "G" else \
            biggan.Discriminator(16, 4, 3, "d2d_ce", 8, 8)
        fused = fused.to(DEV).train()
        fused.load_state_dict(ref.state_dict())
        FusedSpectralNorm(fused, backend=backend)
        g = torch.Generator().manual_seed(seed)
        for step in range(2):
            if name == "G":
                inputs = (torch.randn(4, 24, generator=g).to(DEV), torch.randint(0, 3, (4,), generator=g).to(DEV))
            else:
                inputs = (torch.randn(4, 3, 16, 16, generator=g).to(DEV),
                          torch.randint(0, 3, (4,), generator=g).to(DEV))
            outs = [net(*inputs) for net in (ref, fused)]
            outs = [o["adv"].sum() + o["embed"].sum() if isinstance(o, dict) else o.square().mean() for o in outs]
            close(outs[1], outs[0], f"{name} output, step {step}", seed, tol=1e-4)
            # a layer unused by this output: None in the reference, zeros in the fused path (sigma's grad is 0)
            grads = [torch.autograd.grad(o, list(net.parameters()), allow_unused=True)
                     for o, net in zip(outs, (ref, fused))]
            for (pname, p), a, b in zip(ref.named_parameters(), grads[1], grads[0]):
                zero = torch.zeros_like(p)
                close(zero if a is None else a, zero if b is None else b, f"{name} grad {pname}, step {step}",
                      seed, tol=1e-4)
        for (bname, a), b in zip(ref.named_buffers(), fused.buffers()):
            close(b, a, f"{name} buffer {bname}", seed, tol=1e-4)
        assert set(sn_sigmas(fused)) == set(sn_sigmas(ref)) and len(sn_sigmas(fused)) > 3
        for key, sigma in sn_sigmas(ref).items():
            close(sn_sigmas(fused)[key], sigma, f"{name} sigma of {key}", seed, tol=1e-4)


@pytest.mark.parametrize("fast", ["triton", "foreach"])
def test_training_steps_with_fused_backends_equal_torch(tiny_cfg, fast):
    """Two full D+G steps on the tiny config: the whole-network SN (and, for triton, the fused D2D-CE) give the
    per-layer reference's parameters. adam_eps=1 makes Adam's update linear in small gradients, so float-rounding
    differences are not blown up to +-lr."""
    from hpc_gan.train.trainer import Trainer
    nets = {}
    for backend in ("torch", fast):
        cfg = tiny_cfg(f"model.sn_backend={backend}", f"loss.backend={'torch' if backend == 'foreach' else backend}",
                       "train.batch_size=6", "train.adam_eps=1.0", "train.g_lr=0.05", "train.d_lr=0.05")
        tr = Trainer(cfg, DEV)
        assert all(f is not None for f in tr.fused_sn) == (backend != "torch")
        for _ in range(2):
            tr.train_step(diagnostics=True)
        nets[backend] = (tr.g.module, tr.d.module, tr.pop_metrics())
    for i, tag in enumerate("GD"):
        for (name, a), b in zip(nets["torch"][i].state_dict().items(), nets[fast][i].state_dict().values()):
            close(b, a, f"{tag}.{name} after 2 steps", 0, tol=1e-4)
    assert nets[fast][2]["diag_sigma_D_max"] == pytest.approx(nets["torch"][2]["diag_sigma_D_max"], rel=1e-4)


def test_every_kernel_compiles_for_h100_without_a_gpu():
    """Triton's real CUDA pipeline (to a sm_90 cubin, fp32 and bf16): what the interpreter cannot check."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "90"], capture_output=True,
                          text=True, env=env, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]),
                          timeout=600)
    assert proc.returncode == 0 and "all kernels compile" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm_90")]
    assert len(lines) >= 40 and all("cubin" in line and "FAIL" not in line for line in lines), proc.stdout
    assert any(" generic " in line for line in lines) and any(" aligned " in line for line in lines)
    assert all(re.search(r", \d+ registers", line) for line in lines), "ptxas -v gave no register counts"


# ---- the split-column forward, every mode, determinism -----------------------------------------------------
def eq6_global_f64(embed, proxy, labels, cols, col_labels, offset, t, m_p):
    """Eq. 6 for rows of embed against the gathered columns, in float64 autograd (the independent reference)."""
    m_n = 1.0 - m_p
    f = torch.nn.functional.normalize(embed, dim=1)
    v = torch.nn.functional.normalize(proxy, dim=1)
    c = torch.nn.functional.normalize(cols, dim=1)
    n, m = f.shape[0], c.shape[0]
    is_self = torch.zeros(n, m, dtype=torch.bool)
    is_self[torch.arange(n), torch.arange(n) + offset] = True
    neg_mask = (labels[:, None] != col_labels[None, :]) & ~is_self
    pos = torch.clamp((f * v).sum(1) - m_p, max=0.0) / t
    neg = torch.clamp((f @ c.t() - m_n) / t, min=0.0).masked_fill(~neg_mask, float("-inf"))
    return (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()


@pytest.mark.parametrize("tmode", ["matrix", "fused", "stream"])
@pytest.mark.parametrize("n,m,d,split", [(8, 200, 40, 64), (37, 131, 9, 32), (5, 300, 70, 128), (8, 90, 33, 16)])
def test_split_columns_match_float64_with_gathered_negatives(n, m, d, split, tmode):
    """Rows at an offset inside gathered columns, the columns split across programs (odd widths across tile and
    split edges; a split narrower than the column tile, as a GPU's few-row grid can pick), and rows whose every
    column shares their label (no negatives: only the positive term)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    cols = torch.randn(m, d, generator=g, dtype=torch.float64)
    col_labels = torch.randint(0, 4, (m,), generator=g)
    offset = int(torch.randint(0, m - n + 1, (1,), generator=g))
    col_labels[:] = torch.where(torch.arange(m) % 7 == 0, col_labels, col_labels)
    embed = cols[offset:offset + n].clone()
    labels = col_labels[offset:offset + n].clone()
    lonely = labels.clone()
    lonely[0] = 99  # a label no column has: all columns are negatives for row 0
    col_labels_lonely = col_labels.clone()
    proxy = torch.randn(n, d, generator=g, dtype=torch.float64)
    for lab, clab in ((labels, col_labels), (lonely, col_labels_lonely)):
        leaves = [x.clone().requires_grad_() for x in (embed, proxy, cols)]
        want = eq6_global_f64(leaves[0], leaves[1], lab, leaves[2], clab, offset, 0.5, 0.9)
        want_g = torch.autograd.grad(want, leaves)
        got_leaves = [x.float().to(DEV).requires_grad_() for x in (embed, proxy, cols)]
        got = d2d_ce(got_leaves[0], got_leaves[1], lab.to(DEV), 0.5, 0.9, backend="triton",
                     negatives=(got_leaves[2], clab.to(DEV)), row_offset=offset, split_cols=split,
                     triton_mode=tmode)
        got_g = torch.autograd.grad(got, got_leaves)
        close(got.double().cpu(), want.detach(), f"loss, split {split}, {tmode}", seed, tol=1e-4)
        for name, a, b in zip(("embed", "proxy", "columns"), got_g, want_g):
            close(a.double().cpu(), b, f"d/d{name}, split {split}, {tmode}", seed, tol=1e-4)
    # a row with no negatives at all: every column shares its label
    same = torch.zeros(m, dtype=torch.long)
    got = d2d_ce(embed.float().to(DEV), proxy.float().to(DEV), same[:n].to(DEV), 0.5, 0.9, backend="triton",
                 negatives=(cols.float().to(DEV), same.to(DEV)), row_offset=offset, split_cols=split)
    want = eq6_global_f64(embed, proxy, same[:n], cols, same, offset, 0.5, 0.9)
    close(got.double().cpu(), want, f"no negatives, split {split}", seed, tol=1e-4)


@pytest.mark.parametrize("tmode", ["matrix", "fused", "stream"])
def test_fused_kernels_are_bitwise_deterministic(tmode):
    """Two calls give identical values and gradients (no float atomics anywhere: the kernels' sources say so)."""
    import inspect

    import kernels.similarity_triton as S
    import kernels.spectral_norm_triton as N
    for module in (S, N):
        src = inspect.getsource(module)
        assert not re.search(r"atomic_(add|max|min)\((?![^)]*COUNT)", src), "a float atomic in " + module.__name__
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    cols = torch.randn(96, 24, generator=g).to(DEV)
    col_labels = torch.randint(0, 5, (96,), generator=g).to(DEV)
    proxy = torch.randn(16, 24, generator=g).to(DEV)
    runs = []
    for _ in range(2):
        leaves = [cols[32:48].clone().requires_grad_(), proxy.clone().requires_grad_(), cols.clone().requires_grad_()]
        loss = d2d_ce(leaves[0], leaves[1], col_labels[32:48], 0.5, 0.9, mode="studiogan", backend="triton",
                      negatives=(leaves[2], col_labels), row_offset=32, split_cols=32, triton_mode=tmode)
        runs.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    ws, us = sn_case(seed)
    for run in runs:
        sig, u, v = sn_power_iteration(ws, us, 2, backend="triton")
        run.extend([sig.detach(), *u, *v, *torch.autograd.grad(sig.sum(), ws)])
        normalized = spectral_normalize(ws, us, 1, 1e-12, "triton")[0]
        run.extend([*normalized, *torch.autograd.grad(normalized, ws, [torch.ones_like(x) for x in normalized])])
    assert len(runs[0]) == len(runs[1]) > 20
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b), f"not bitwise reproducible (seed {seed})"


def test_kernel_names_keep_their_functor():
    from kernels.bench import short_kernel_name
    name = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
            "CUDAFunctorOnSelf_add<c10::BFloat16> >(at::TensorIteratorBase&, at::native::CUDAFunctorOnSelf_add"
            "<c10::BFloat16> const&)::{lambda(int)#1}>(int, at::native::gpu_kernel_impl_nocast<...>)")
    short = short_kernel_name(name)
    assert short.startswith("elementwise_kernel<128, 4, gpu_kernel_impl_nocast<CUDAFunctorOnSelf_add<BFloat16>")
    assert len(short) <= 160


def test_profiled_kernels_are_told_by_kind():
    """hpc-gan bench's profile sums a step's device time by kind of kernel. Every kernel the H200's reports name
    (docs/gpu-runs/2026-11-27-h200-*) gets its kind; cuDNN's convolutions are not taken for matmuls (their names
    say implicit_gemm, or CUTLASS's s16816fprop) nor its flash attention for a convolution, and inductor's fused
    kernels stay inductor's even where their names list a convolution's ops (run 3 counted them as convolutions)."""
    import json

    from kernels.bench import kernel_kind
    names = set()
    runs = [f"2026-11-27-h200-run{run}" for run in (1, 2, 3, 4)] + [f"2026-11-28-h200-call{c}" for c in (1, 3, 4)]
    for run in runs:
        report = json.loads((ROOT / "docs" / "gpu-runs" / f"{run}.json").read_text())
        for stage in report["stages"]:
            for row in stage.get("runs", []) + stage.get("rows", []):
                names |= {k[0] for k in (row.get("top_kernels") or row.get("kernels") or [])}
                names |= {k[0] for ks in (row.get("top_kernels_by_kind") or {}).values() for k in ks}
    kinds = {name: kernel_kind(name) for name in names if not name.startswith("Optimizer.")}
    # left as "other": random numbers and the embedding's backward (0.05 ms of the fifth run's 232 per iteration)
    others = [n for n, k in kinds.items() if k == "other"]
    assert all(n.startswith(("distribution_elementwise", "embedding_backward")) for n in others), others
    by_prefix = {"sm90_xmma_fprop_implicit_gemm": "convolution", "sm90_xmma_wgrad_indexed": "convolution",
                 "cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop": "convolution",
                 "_ZN17cutlass__5x_cudnn6KernelINS_4conv6kernel23ImplicitGemmConvolution": "convolution",
                 "nhwcAddPaddingKernel": "convolution",
                 "cudnn_generated_fort_native_sdpa": "attention", "nvjet_sm90": "matmul",
                 "cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm": "matmul",
                 "sn_u_kernel": "hpc-gan Triton", "inv_norms_kernel": "hpc-gan Triton",
                 "triton_poi_fused__to_copy_convolution_relu": "inductor Triton",
                 "triton_red_fused_convolution_backward": "inductor Triton",
                 "max_pool_backward_nhwc": "resampling",
                 "multi_tensor_apply_kernel<FusedOptimizer": "optimizer", "CatArrayBatchedCopy": "copy",
                 "elementwise_kernel<128, 4, gpu_kernel_impl_nocast<direct_copy": "copy",
                 "reduce_kernel": "reduction", "vectorized_elementwise_kernel": "elementwise",
                 "cudnn::fusion::compute_dot_do_o": "attention", "cudnn::fusion::convert_dq_to_16bits": "attention",
                 "memset32": "copy", "tensorTransformGeneric": "copy", "cudnn::engines_precompiled::nchwToNhwc": "copy"}
    for prefix, kind in by_prefix.items():  # an elementwise kernel whose functor copies is a copy
        seen = [k for n, k in kinds.items() if n.startswith(prefix) and not (kind != "copy" and "copy_kernel" in n)]
        assert seen and set(seen) == {kind}, (prefix, seen)
    assert kernel_kind("triton_poi_fused_add_relu_0") == "inductor Triton"
    assert kernel_kind("vectorized_elementwise_kernel<8, bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)") == "copy"


def test_host_waits_names_each_wait_by_the_op_it_was_called_under():
    """The profile's host waits (kernels.bench.host_waits), read off real profiler events: ranges named as CUDA's
    runtime calls are here, on the CPU, what the runtime's events are on a GPU. A synchronization is a wait under the
    op that called it (or outside any); an async copy is one only where it took long (a pageable copy waits for the
    stream); profile_cuda's own final synchronize is not counted."""
    import time

    from torch.profiler import ProfilerActivity, profile, record_function

    from kernels.bench import FINAL_SYNC_RANGE, host_waits
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("aten::_local_scalar_dense"):
            with record_function("cudaStreamSynchronize"):
                time.sleep(0.02)
            with record_function("cudaMemcpyAsync"):  # quick: the copy's own cost
                pass
        with record_function("aten::copy_"), record_function("cudaMemcpyAsync"):
            time.sleep(0.01)
        with record_function("cudaDeviceSynchronize"):
            time.sleep(0.005)
        with record_function("cudaLaunchKernel"):  # no wait
            time.sleep(0.005)
        with record_function(FINAL_SYNC_RANGE), record_function("cudaDeviceSynchronize"):
            time.sleep(0.005)
    total, waits = host_waits(prof.events())
    assert [(name, owner, calls) for name, owner, _, calls in waits] == [
        ("cudaStreamSynchronize", "aten::_local_scalar_dense", 1), ("cudaMemcpyAsync", "aten::copy_", 1),
        ("cudaDeviceSynchronize", "(outside any op)", 1)], waits
    assert 20 <= waits[0][2] < 60 and 35 <= total < 90, waits


def test_a_direct_launch_passes_every_argument_in_the_kernels_order():
    """kernels.launch: the compiled launcher takes every parameter in order, constexprs included (from keywords or
    their defaults) and launch options left out; a key changes with each thing the JIT specializes on (a tensor's
    dtype and 16-byte alignment, an integer's value, True against 1) and not with a float's value; another kind of
    argument is left to the JIT."""
    from kernels.launch import arg_key, signature_args
    from kernels.similarity_triton import d2d_grad_matrix_kernel as k
    names = list(inspect.signature(k.fn).parameters)
    n_pos = names.index("PREC")
    consts = dict(FROM_S=True, BK=16, BJ=64, BI=16, PREC="tf32x3", num_warps=4)  # in no particular order
    got = signature_args(k, tuple(range(n_pos)), consts)
    assert got == list(range(n_pos)) + [consts[name] for name in names[n_pos:]] and len(got) == len(names)
    x = torch.zeros(10)
    assert arg_key(x[4:]) == arg_key(x) != arg_key(x[1:]) != arg_key(x.double())  # 16 bytes on, 4 bytes on
    assert arg_key(1) != arg_key(True) and arg_key(16) != arg_key(17) and arg_key(0.5) == arg_key(2.0)
    assert arg_key(None) is None and arg_key([1]) is None


@pytest.mark.skipif(DEV.type != "cuda", reason="a direct launch needs compiled kernels: CUDA")
@pytest.mark.parametrize("tmode", ["matrix", "fused", "stream"])
def test_direct_launches_equal_the_jits_bitwise(tmode, monkeypatch):
    """kernels.launch.DIRECT: D2D-CE with its kernels launched through their compiled kernels gives the JIT's
    values and gradients bitwise, twice (the first call of a key goes through the JIT), with the rows a slice that
    starts off 16-byte alignment and then on it (another key)."""
    import kernels.launch
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    cols = torch.randn(131, 9, generator=g).to(DEV)
    col_labels = torch.randint(0, 5, (131,), generator=g).to(DEV)
    proxy = torch.randn(17, 9, generator=g).to(DEV)

    def run(offset):
        leaves = [proxy.clone().requires_grad_(), cols.clone().requires_grad_()]
        rows = leaves[1][offset:offset + 17]  # a view of the columns: its alignment follows the offset
        loss = d2d_ce(rows, leaves[0], col_labels[offset:offset + 17], 0.5, 0.9, backend="triton",
                      negatives=(leaves[1], col_labels), row_offset=offset, triton_mode=tmode)
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    for offset in (1, 16):  # 36 bytes in, then 576: off, then on 16-byte alignment
        want = run(offset)
        monkeypatch.setattr(kernels.launch, "DIRECT", True)
        before = kernels.launch.direct_kernels()
        for _ in range(2):
            for a, b in zip(run(offset), want):
                assert torch.equal(a, b), f"direct launch differs (seed {seed}, offset {offset})"
        assert kernels.launch.direct_kernels() > before  # the direct path was taken, not the JIT's
        monkeypatch.setattr(kernels.launch, "DIRECT", False)


def test_the_host_grid_helpers_equal_tritons():
    """kernels.launch.cdiv and next_power_of_2 are plain Python (Triton's are constexpr functions: ~1.7 us a call on
    the host, ten per D2D-CE call) and give Triton's results."""
    import triton
    from kernels.launch import cdiv, next_power_of_2
    for a in range(0, 2100, 7):
        for b in (1, 2, 3, 16, 64, 127, 128, 512):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


@pytest.mark.skipif(DEV.type == "cuda", reason="a CPU benchmark's smoke run (~30 s): not in the GPU pack's test box")
@pytest.mark.parametrize("op, launches", [("d2d", 5), ("sn", 5)])
def test_the_host_probe_runs(op, launches):
    """scripts/host_probe.py (a benchmark: its numbers are not checked) runs each op's Triton path with the launches
    skipped, and counts them: the kernels' launches per call, so a path that lost its kernels would show."""
    import subprocess
    import sys
    from procenv import child_env
    proc = subprocess.run([sys.executable, "scripts/host_probe.py", op, "--reps", "2"], capture_output=True,
                          text=True, env=child_env(), cwd=str(ROOT), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"({launches} Triton launches, skipped)" in proc.stdout and "identity autograd function" in proc.stdout, \
        proc.stdout
