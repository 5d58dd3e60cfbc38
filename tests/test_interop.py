"""Checkpoints of the reference implementations: BigGAN-PyTorch's and StudioGAN's own outputs (tests/data/fixtures,
written by their code) are reproduced by hpc-gan's networks after import; import / export round-trip; the
commands write run dirs that sample, train --resume and export accept; unsupported settings are refused in one line."""
import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from hpc_gan.config import load
from hpc_gan.errors import UserError
from hpc_gan.interop import load_biggan_pytorch, load_studiogan
from hpc_gan.interop.biggan_pytorch import to_biggan_pytorch
from hpc_gan.models import build_models
from hpc_gan.models.biggan import DBlock
from hpc_gan.models.layers import SNConv2d
from hpc_gan.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "data" / "fixtures"
DEMO = ROOT / "configs" / "demo.yaml"
TINY = ["run.tensorboard=false", "data.name=synthetic", "data.synthetic_size=64", "train.batch_size=8",
        "train.log_every=1", "train.sample_every=1000", "train.checkpoint_every=1000", "train.standing_stats=2",
        "train.demo_classifier=false", "train.ema_start=1"]


def rel(a, b):
    return float((a - b.reshape(a.shape)).norm() / b.norm())


def hpc_gan(*args):
    proc = subprocess.run([sys.executable, "-m", "hpc_gan.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"hpc-gan {' '.join(map(str, args))}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def bgp():
    return torch.load(FIX / "biggan64_ch8.pth", weights_only=False)


@pytest.fixture(scope="module")
def sg():
    return torch.load(FIX / "reacgan32.pth", weights_only=False)


def bgp_outputs(G, D, inputs):
    with torch.no_grad():
        return G(inputs["z"], inputs["y"]), D(inputs["x"], inputs["y"])["adv"]


# ---- BigGAN-PyTorch --------------------------------------------------------------------------------------------
def test_biggan_pytorch_outputs_equal_the_reference(bgp):
    cfg, G, D = load_biggan_pytorch(bgp["G"], bgp["D"], bgp["kwargs"], load(DEMO))
    assert (cfg.model.resolution, cfg.model.g_ch, cfg.model.z_dim, cfg.model.shared_dim) == (64, 8, 100, 32)
    assert (cfg.model.g_attn_res, cfg.model.d_attn_res, cfg.loss.cond, cfg.model.out_bn_eps) == (32, 32, "pd", 1e-5)
    g, d = bgp_outputs(G, D, bgp["inputs"])
    assert rel(g, bgp["outputs"]["G_eval"]) < 1e-4 and rel(d, bgp["outputs"]["D_eval"]) < 1e-4


def test_biggan_pytorch_state_round_trips(bgp):
    """Export writes BigGAN-PyTorch's names and a u0 whose power iteration gives back hpc-gan's (u, v): loading the
    exported state again reproduces the reference outputs, and every weight and BN statistic is the original."""
    cfg, G, D = load_biggan_pytorch(bgp["G"], bgp["D"], bgp["kwargs"], load(DEMO))
    g_out, d_out = to_biggan_pytorch(G, "G"), to_biggan_pytorch(D, "D")
    assert set(g_out) == set(bgp["G"]) and set(d_out) == set(bgp["D"])
    for net, out in (("G", g_out), ("D", d_out)):
        for name, theirs in bgp[net].items():
            if not name.endswith(("u0", "sv0")):
                assert torch.equal(out[name], theirs), f"{net}.{name}"
    _, G2, D2 = load_biggan_pytorch(g_out, d_out, bgp["kwargs"], load(DEMO))
    g, d = bgp_outputs(G2, D2, bgp["inputs"])
    assert rel(g, bgp["outputs"]["G_eval"]) < 1e-4 and rel(d, bgp["outputs"]["D_eval"]) < 1e-4


@pytest.mark.parametrize("change,match", [
    ({"G_shared": False}, "G_shared=False is not supported"),
    ({"norm_style": "in"}, "norm_style='in' is not supported"),
    ({"G_attn": "16_32"}, "attention at several resolutions"),
    ({"G_mixed_precision": True}, "G_mixed_precision=True"),
    ({"resolution": 512}, "resolution 512 is not one of"),
    ({"hier": False}, "hier=False"),
])
def test_biggan_pytorch_refusals(bgp, change, match):
    with pytest.raises(UserError, match=match) as e:
        load_biggan_pytorch(bgp["G"], bgp["D"], {**bgp["kwargs"], **change}, load(DEMO))
    assert "\n" not in str(e.value)


def write_bgp_folder(bgp, folder: Path, with_optim: bool = False) -> None:
    folder.mkdir(parents=True)
    torch.save(bgp["G"], folder / "G.pth")
    torch.save(bgp["D"], folder / "D.pth")
    torch.save({"itr": 2, "config": bgp["kwargs"]}, folder / "state_dict.pth")
    if with_optim:  # BigGAN-PyTorch's Adam state: indices in its parameter order; exp_avg marks the index
        names = [k for k in bgp["G"] if not k.endswith(("u0", "sv0", "stored_mean", "stored_var"))]
        state = {j: {"step": torch.tensor(2.0), "exp_avg": torch.full_like(bgp["G"][n], float(j)),
                     "exp_avg_sq": torch.full_like(bgp["G"][n], 1.0)} for j, n in enumerate(names)}
        torch.save({"state": state, "param_groups": [{"params": list(range(len(names))), "lr": 5e-5,
                                                      "betas": (0.0, 0.999), "eps": 1e-6, "weight_decay": 0}]},
                   folder / "G_optim.pth")


def test_import_export_commands_round_trip_and_fine_tune(bgp, tmp_path):
    src, run, back, run2 = tmp_path / "bgp", tmp_path / "run", tmp_path / "exported", tmp_path / "run2"
    write_bgp_folder(bgp, src, with_optim=True)
    out = hpc_gan("import", "biggan-pytorch", src, "--out", run, "--base", DEMO, *TINY).stdout
    assert "itr 2" in out and "optimizer state imported" in out
    state = checkpoint.load_consolidated(run)
    cfg = load(run / "config.yaml")
    assert state["step"] == 2 and cfg.run.dir == str(run) and cfg.loss.cond == "pd"
    G, D = build_models(cfg)
    G.load_state_dict(state["G"])
    D.load_state_dict(state["D"])
    g, d = bgp_outputs(G.eval(), D.eval(), bgp["inputs"])
    assert rel(g, bgp["outputs"]["G_eval"]) < 1e-4 and rel(d, bgp["outputs"]["D_eval"]) < 1e-4
    # the Adam state followed the parameters by name: shared.weight is BigGAN-PyTorch's parameter 0
    names = [n for n, _ in G.named_parameters()]
    adam = state["g_opt"]["adam"]["state"]
    assert float(adam[names.index("shared.weight")]["exp_avg"].flatten()[0]) == 0.0
    assert float(adam[names.index("out.conv.weight")]["exp_avg"].flatten()[0]) == len(names) - 2  # before its bias
    # sample, fine-tune one step, export and import again
    hpc_gan("sample", "--run", run, "--out", tmp_path / "s.png")
    assert "resumed from" in hpc_gan("train", "--config", run / "config.yaml", "--resume", "auto",
                                     "train.steps=3").stdout
    hpc_gan("export", "biggan-pytorch", run, "--out", back)
    assert {p.name for p in back.iterdir()} == {"G.pth", "D.pth", "G_ema.pth", "state_dict.pth"}
    assert torch.load(back / "state_dict.pth", weights_only=False)["itr"] == 3
    hpc_gan("import", "biggan-pytorch", back, "--out", run2, "--base", DEMO, *TINY)
    trained, again = checkpoint.load_consolidated(run), checkpoint.load_consolidated(run2)
    x = torch.randn(4, 3, 64, 64)
    z, y = torch.randn(4, 100), torch.arange(4)
    for key in ("G", "D", "G_ema"):
        a, b = (build_models(cfg)[0 if key != "D" else 1] for _ in range(2))
        a.load_state_dict(trained[key])
        b.load_state_dict(again[key])
        with torch.no_grad():
            oa = a.eval()(z, y) if key != "D" else a.eval()(x, y)["adv"]
            ob = b.eval()(z, y) if key != "D" else b.eval()(x, y)["adv"]
        assert rel(ob, oa) < 1e-4, key  # after an optimizer step u != n(W v): second order in the step


# ---- StudioGAN ---------------------------------------------------------------------------------------------------
def sg_outputs(G, D, inputs):
    with torch.no_grad():
        out = D(inputs["x"], inputs["y"])
        return G(inputs["z"], inputs["y"]), out["adv"], F.normalize(out["embed"], dim=1), F.normalize(out["proxy"],
                                                                                                   dim=1)


def test_studiogan_outputs_equal_the_authors(sg):
    cfg, G, D = load_studiogan(sg["G"], sg["D"], sg["config"])
    m = cfg.model
    assert (m.resolution, m.g_ch, m.d_ch, m.embed_dim, m.g_attn_res, m.d_attn_res) == (32, 16, 8, 32, 16, 16)
    assert (m.d_shortcut, cfg.loss.cond) == ("studiogan", "d2d_ce")
    o = sg["outputs"]
    got = sg_outputs(G, D, sg["inputs"])
    for mine, key in zip(got, ("G_eval", "D_adv", "D_embed", "D_proxy")):
        assert rel(mine, o[key]) < 1e-4, key
    # control: BigGAN's D shortcut (x, not ReLU(x)) is a different function with the very same weights
    cfg2 = copy.deepcopy(cfg)
    cfg2.model.d_shortcut = "biggan"
    D2 = build_models(cfg2)[1]
    D2.load_state_dict(D.state_dict())
    _, adv, embed, _ = sg_outputs(G, D2.eval(), sg["inputs"])
    assert rel(adv, o["D_adv"]) > 0.05 and rel(embed, o["D_embed"]) > 0.05


@pytest.mark.parametrize("section,change,match", [
    ("DATA", {"img_size": 64}, "img_size=64 is not supported"),
    ("MODEL", {"backbone": "deep_big_resnet"}, "backbone='deep_big_resnet' is not supported"),
    ("MODEL", {"d_cond_mtd": "MH"}, "d_cond_mtd='MH' is not supported"),
    ("MODEL", {"d_cond_mtd": "AC"}, "normalize_d_embed with AC"),
    ("MODEL", {"attn_g_loc": [1, 2]}, "one attention layer per network"),
    ("MODEL", {"d_conv_dim": 15}, "must be even at 32 px"),
])
def test_studiogan_refusals(sg, section, change, match):
    config = copy.deepcopy(sg["config"])
    config[section].update(change)
    with pytest.raises(UserError, match=match) as e:
        load_studiogan(sg["G"], sg["D"], config)
    assert "\n" not in str(e.value)


def test_studiogan_import_command_trains_on_at_another_world_size(sg, tmp_path):
    src, run = tmp_path / "sg", tmp_path / "run"
    src.mkdir()
    for net in ("G", "D", "G_ema"):
        torch.save({"state_dict": sg["G" if net == "G_ema" else net], "step": 2},
                   src / f"model={net}-best-weights-step=2.pth")
    (tmp_path / "ReACGAN.yaml").write_text(yaml.safe_dump(sg["config"]))
    hpc_gan("import", "studiogan", src, "--config", tmp_path / "ReACGAN.yaml", "--out", run, *TINY)
    cfg = load(run / "config.yaml")
    assert cfg.model.d_shortcut == "studiogan" and cfg.loss.cond == "d2d_ce"
    state = checkpoint.load_consolidated(run)
    G, D = build_models(cfg)
    G.load_state_dict(state["G_ema"])
    D.load_state_dict(state["D"])
    got = sg_outputs(G.eval(), D.eval(), sg["inputs"])
    assert rel(got[0], sg["outputs"]["G_eval"]) < 1e-4 and rel(got[1], sg["outputs"]["D_adv"]) < 1e-4
    # fine-tune on 2 ranks (checkpoints are world-size independent)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-port",
                           str(port), "-m", "hpc_gan.cli", "train", "--config", str(run / "config.yaml"), "--resume",
                           "auto", "train.steps=3"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert checkpoint.load_consolidated(run)["step"] == 3


# ---- model.d_shortcut against a float64 re-derivation ------------------------------------------------------------
@pytest.mark.parametrize("downsample,cin,cout", [(True, 5, 7), (False, 6, 6)])
def test_studiogan_shortcut_is_relu_of_the_input(downsample, cin, cout):
    torch.manual_seed(0)
    block = DBlock(cin, cout, lambda i, o, **kw: SNConv2d(i, o, **{"kernel_size": 3, "padding": 1, **kw}),
                   preactivation=True, downsample=downsample, relu_shortcut=True).double().eval()
    x = torch.randn(2, cin, 8, 8, dtype=torch.float64)

    def conv(layer, t):
        w = layer.weight / torch.dot(layer.sn_u.double(), layer.sn_matrix() @ layer.sn_v.double())
        return F.conv2d(t, w, layer.bias, padding=layer.padding)

    a = x.clamp_min(0)
    h = conv(block.conv2, conv(block.conv1, a).clamp_min(0))
    sc = conv(block.conv_sc, a) if block.conv_sc is not None else a
    if downsample:
        h, sc = F.avg_pool2d(h, 2), F.avg_pool2d(sc, 2)
    with torch.no_grad():  # the layer's sigma is an fp32 dot product even in a float64 module: 1e-6 relative
        torch.testing.assert_close(block(x), h + sc, rtol=1e-6, atol=1e-7)
        block.relu_shortcut = False  # BigGAN's shortcut (x itself) is another function
        assert (block(x) - (h + sc)).abs().max() > 1e-2
    first = DBlock(cin, cout, lambda i, o, **kw: SNConv2d(i, o, **{"kernel_size": 3, "padding": 1, **kw}),
                   preactivation=False, downsample=True, relu_shortcut=True)
    assert not first.relu_shortcut  # D's first block has no pre-activation to share (StudioGAN's DiscOptBlock)


def test_d_shortcut_is_refused_for_biggan_deep():
    with pytest.raises(UserError, match="model.d_shortcut=studiogan is StudioGAN's big_resnet D"):
        load(DEMO, ["model.arch=biggan_deep", "model.resolution=128", "model.d_shortcut=studiogan"])


def test_export_refuses_what_biggan_pytorch_cannot_build(tmp_path):
    hpc_gan("train", "--config", DEMO, f"run.dir={tmp_path / 'r'}", "train.steps=1", "model.g_ch=8", "model.d_ch=8",
            "model.embed_dim=16", *TINY)
    proc = subprocess.run([sys.executable, "-m", "hpc_gan.cli", "export", "biggan-pytorch", str(tmp_path / "r"),
                           "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs model.arch=biggan, loss.cond=pd" in proc.stderr
