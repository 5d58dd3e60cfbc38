"""PyTorch-StudioGAN (the ReACGAN authors' code) checkpoints: load with output parity, import a run.

StudioGAN's ``big_resnet`` is hpc-gan's BigGAN with two differences that the config carries: its 32 px D is
2 x d_conv_dim wide (hpc-gan: 4 x d_ch, so d_ch = d_conv_dim / 2), and its D blocks' shortcuts see ReLU(x)
(``model.d_shortcut: studiogan``). Its block lists hold attention as an entry of its own (``blocks.K.0`` with a
``sigma``); its spectral norm is torch's (``weight_orig``, ``weight_u``, ``weight_v``, eval mode: sigma = u^T W v
as stored), which is hpc-gan's, so those vectors map one to one. At 64 px StudioGAN's G is half as wide as
hpc-gan's (BigGAN-PyTorch's layout): refused.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import yaml

from hpc_gan.config import Config, load
from hpc_gan.errors import UserError
from hpc_gan.interop.common import State, adam_state, fill, rename_all, with_overrides, write_run
from hpc_gan.models import build_models
from hpc_gan.models.biggan import D_ARCH, G_ARCH

HEADS = {"D2DCE": "d2d_ce", "2C": "2c", "AC": "ac", "PD": "pd"}
REQUIRED = {"backbone": "big_resnet", "g_cond_mtd": "cBN", "apply_g_sn": True, "apply_d_sn": True,
            "g_act_fn": "ReLU", "d_act_fn": "ReLU", "aux_cls_type": "W/O", "info_type": "N/A", "z_prior": "gaussian"}
SIZES = (32, 128, 256)
BN_EPS, SN_EPS = 1e-4, 1e-6  # StudioGAN's ops.py


def _attn_res(locs: List[int], net: str, res: int, source: str) -> int:
    """The resolution after block ``locs[0]`` (1-based, StudioGAN's attn_*_loc), or 0."""
    if len(locs) > 1:
        raise UserError(f"{source}: attn_{net.lower()}_loc={locs}: hpc-gan's BigGAN has one attention layer per "
                        f"network")
    if not locs:
        return 0
    k = int(locs[0])
    if net == "G":
        return 4 * 2 ** k
    return res // 2 ** sum(D_ARCH[res]["down"][:k])


def config_from_studiogan(sg: Dict[str, Any], base: Optional[Config] = None, source: str = "config") -> Config:
    data, model, lossc = sg.get("DATA", {}), sg.get("MODEL", {}), sg.get("LOSS", {})
    for key, want in REQUIRED.items():
        got = model.get(key, want)
        if got != want:
            raise UserError(f"{source}: MODEL.{key}={got!r} is not supported (hpc-gan maps StudioGAN models with "
                            f"{key}={want!r})")
    head = model.get("d_cond_mtd")
    if head not in HEADS:
        raise UserError(f"{source}: MODEL.d_cond_mtd={head!r} is not supported; hpc-gan maps {', '.join(HEADS)}")
    if head == "AC" and model.get("normalize_d_embed"):
        raise UserError(f"{source}: MODEL.normalize_d_embed with AC normalizes D's features before the classifier, "
                        f"which hpc-gan's AC head does not")
    res = int(data.get("img_size", 0))
    if res not in SIZES:
        raise UserError(f"{source}: DATA.img_size={res} is not supported ({', '.join(map(str, SIZES))}; at 64 px "
                        f"StudioGAN's G is half as wide as hpc-gan's)")
    if res == 32 and int(model["d_conv_dim"]) % 2:
        raise UserError(f"{source}: MODEL.d_conv_dim={model['d_conv_dim']} must be even at 32 px (hpc-gan's d_ch is "
                        f"half of it)")
    preset = "cifar10_reacgan" if res == 32 else "imagenet128_reacgan_b256"  # data, loss, training settings
    cfg = base or load(Path(__file__).resolve().parents[2] / "configs" / f"{preset}.yaml")
    m = cfg.model
    m.arch, m.resolution, m.g_ch = "biggan", res, int(model["g_conv_dim"])
    m.d_ch = int(model["d_conv_dim"]) // 2 if res == 32 else int(model["d_conv_dim"])
    m.z_dim, m.shared_dim = int(model["z_dim"]), int(model["g_shared_dim"])
    if m.z_dim % (len(G_ARCH[res]["in"]) + 1):
        raise UserError(f"{source}: MODEL.z_dim={m.z_dim} does not split into equal chunks at {res} px")
    m.embed_dim = int(model.get("d_embed_dim", m.embed_dim)) if head in ("D2DCE", "2C") else m.embed_dim
    attn = model.get("apply_attn", False)
    m.g_attn_res = _attn_res(model.get("attn_g_loc", []) if attn else [], "G", res, source)
    m.d_attn_res = _attn_res(model.get("attn_d_loc", []) if attn else [], "D", res, source)
    m.bn_eps, m.sn_eps, m.out_bn_eps, m.d_shortcut = BN_EPS, SN_EPS, None, "studiogan"
    cfg.data.num_classes = int(data["num_classes"])
    cfg.loss.cond = HEADS[head]
    for ours, theirs in (("temperature", "temperature"), ("m_p", "m_p")):
        if theirs in lossc:
            setattr(cfg.loss, ours, float(lossc[theirs]))
    if "cond_lambda" in lossc:
        cfg.loss.cond_lambda_d = cfg.loss.cond_lambda_g = float(lossc["cond_lambda"])
    return cfg


def _block_names(state: State) -> Dict[str, str]:
    """StudioGAN block-list index -> hpc-gan prefix: blocks.i for residual blocks, attn.i for the attention
    after block i."""
    entries = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    names, block = {}, -1
    for j in entries:
        if f"blocks.{j}.0.sigma" in state:
            names[str(j)] = f"attn.{block}"
        else:
            block += 1
            names[str(j)] = f"blocks.{block}"
    return names


LAYER = {"conv2d0": "conv_sc", "conv2d1": "conv1", "conv2d2": "conv2", "conv1x1_theta": "theta",
         "conv1x1_phi": "phi", "conv1x1_g": "g", "conv1x1_attn": "o", "sigma": "gamma"}
TOP = {"G": {"linear0": "linear", "shared": "shared", "bn4": "out.bn", "conv2d5": "out.conv"},
       "D": {"linear1": "head.adv"}}


def ours_from_theirs(name: str, net: str, blocks: Dict[str, str], head: str) -> Optional[str]:
    name = re.sub(r"\.weight_orig$", ".weight", name)
    name = re.sub(r"\.weight_u$", ".sn_u", name)
    name = re.sub(r"\.weight_v$", ".sn_v", name)
    m = re.match(r"blocks\.(\d+)\.0\.(.*)$", name)
    if m:
        parts = m.group(2).split(".", 1)
        first = LAYER.get(parts[0], parts[0])
        return ".".join([blocks[m.group(1)], first] + parts[1:])
    top = dict(TOP[net])
    if net == "D":
        top["linear2"] = "head.classifier" if head == "ac" else "head.linear_p"
        top["embedding"] = "head.class_embed" if head == "pd" else "head.proxy"
    first, _, rest = name.partition(".")
    return f"{top[first]}.{rest}" if first in top else None


def _convert(state: State, net: str, head: str, source: str) -> State:
    blocks = _block_names(state)
    out = rename_all(state, lambda k: ours_from_theirs(k, net, blocks, head), source, net)
    return {k: (v.reshape(()) if k.endswith(".gamma") else v) for k, v in out.items()}


def load_studiogan(g_state: State, d_state: State, config: Dict[str, Any], base: Optional[Config] = None,
                   source: str = "StudioGAN checkpoint", overrides: Optional[List[str]] = None
                   ) -> Tuple[Config, nn.Module, nn.Module]:
    """(cfg, G, D) from StudioGAN state dicts and its YAML config (a dict). In eval mode ``G(z, y)`` equals
    StudioGAN's ``G(z, y)``; ``D(x, y)["adv"]`` its ``adv_output``; the L2-normalized ``embed`` / ``proxy`` its
    ``embed`` / ``proxy`` with ``normalize_d_embed``. ``base``: the hpc-gan config whose data and training settings
    the result keeps (default: cifar10_reacgan at 32 px, imagenet128_reacgan_b256 above); ``overrides``: last."""
    cfg = with_overrides(config_from_studiogan(config, base, source), overrides, source)
    G, D = build_models(cfg)
    fill(G, _convert(g_state, "G", cfg.loss.cond, source), source, "G")
    fill(D, _convert(d_state, "D", cfg.loss.cond, source), source, "D")
    return cfg, G.eval(), D.eval()


CKPT = re.compile(r"model=(G|D|G_ema)-(best|current)-weights-step=(\d+)\.pth$")


def _find(ckpt_dir: Path, which: str) -> Dict[str, Tuple[Path, int]]:
    found = {}
    for p in ckpt_dir.iterdir():
        m = CKPT.search(p.name)
        if m and m.group(2) == which:
            found[m.group(1)] = (p, int(m.group(3)))
    return found


def _state(path: Path) -> State:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"{path}: cannot read it as a torch file ({str(e).splitlines()[0]})") from None
    return obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj


def import_studiogan(ckpt_dir: str, config_path: str, out: str, which: str = "best", base: Optional[Config] = None,
                     overrides: Optional[List[str]] = None, log: Callable[[str], None] = print) -> Path:
    """StudioGAN's ``model=G|D|G_ema-{which}-weights-step=N.pth`` files and its YAML config as an hpc-gan run."""
    src = Path(ckpt_dir)
    if not src.is_dir():
        raise UserError(f"{src} is not a directory of StudioGAN checkpoints")
    found = _find(src, which)
    if "G" not in found or "D" not in found:
        raise UserError(f"{src}: no model=G-{which}-weights-step=N.pth / model=D-... pair; try --which "
                        f"{'current' if which == 'best' else 'best'}")
    try:
        sg = yaml.safe_load(Path(config_path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--config {config_path}: cannot read StudioGAN's YAML ({str(e).splitlines()[0]})") from None
    g_state, d_state = _state(found["G"][0]), _state(found["D"][0])
    cfg, G, D = load_studiogan(g_state, d_state, sg, base, str(src), overrides)
    G_ema = None
    if "G_ema" in found:
        G_ema = build_models(cfg)[0]
        fill(G_ema, _convert(_state(found["G_ema"][0]), "G", cfg.loss.cond, str(src)), str(src), "G_ema")
    t = cfg.train
    opts = [adam_state(list(net.named_parameters()), None, [], lambda k: k, lr, (t.beta1, t.beta2), t.adam_eps)
            for net, lr in ((G, t.g_lr), (D, t.d_lr))]
    step = found["G"][1]
    log(f"StudioGAN {cfg.model.resolution} px {cfg.loss.cond}, g_conv_dim {cfg.model.g_ch}, step {step} ({which}); "
        f"optimizer state fresh")
    return write_run(cfg, out, step, G, D, G_ema, opts[0], opts[1], log)
