"""BigGAN-PyTorch (ajbrock) checkpoints: load with output parity, import a weights folder as a run, export back.

Names: BigGAN-PyTorch keeps a block and the attention after it as ``blocks.i.0`` / ``blocks.i.1``, D's heads as
``linear`` / ``embed``, G's output BN and conv as ``output_layer.0`` / ``.2``, BN statistics as ``stored_mean`` /
``stored_var`` and BN affine as ``gain`` / ``bias``; hpc-gan's are ``blocks.i``, ``attn.i``, ``head.adv`` /
``head.class_embed``, ``out.bn`` / ``out.conv``, ``running_*``, ``weight`` / ``bias``.

Spectral norm. BigGAN-PyTorch stores one vector ``u0`` per layer and, in eval mode too, runs one power iteration
from it without storing the result: v = n(u0 W), u = n(v W^T), sigma = u W v^T. hpc-gan stores u and v and, in eval
mode, uses sigma = u^T W v as stored. Import stores that iteration's (u, v), so eval outputs are equal (training
then continues from one power iteration further along, which only sharpens the estimate). Export writes the u0
whose iteration gives back hpc-gan's v exactly (u0 solves W^T u0 = v, least squares), and then also its u where
u = n(W v) holds, which is the case after every power iteration; after an optimizer step the two sigmas differ at
second order in the step (measured below 1e-6 relative).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpc_gan.config import Config, load
from hpc_gan.errors import UserError
from hpc_gan.interop.common import State, adam_state, fill, rename_all, with_overrides, write_run
from hpc_gan.models import build_models
from hpc_gan.models.layers import spectral_norm_layers

# BigGAN-PyTorch's constructor defaults (BigGAN.py), for kwargs a config leaves out
DEFAULTS = {"G_ch": 64, "D_ch": 64, "dim_z": 128, "resolution": 128, "G_attn": "64", "D_attn": "64",
            "n_classes": 1000, "G_shared": True, "shared_dim": 0, "hier": False, "BN_eps": 1e-5, "SN_eps": 1e-12}
# settings that change the function or the state layout, with the only value this importer maps
REQUIRED = {"G_shared": True, "hier": True, "G_mixed_precision": False, "G_fp16": False, "D_mixed_precision": False,
            "D_fp16": False, "norm_style": "bn", "G_param": "SN", "D_param": "SN", "num_G_SVs": 1, "num_D_SVs": 1,
            "num_G_SV_itrs": 1, "num_D_SV_itrs": 1, "D_wide": True, "cross_replica": False, "mybn": False,
            "bottom_width": 4, "G_kernel_size": 3, "D_kernel_size": 3, "output_dim": 1}
RELU = ("relu", "inplace_relu")
OUT_BN_EPS = 1e-5  # BigGAN-PyTorch's output layer is layers.bn(...) at its default eps
RES_OF_DATASET = {"I32": 32, "I64": 64, "I128": 128, "I256": 256, "C10": 32, "C100": 32}
CLASSES_OF_DATASET = {"I": 1000, "C10": 10, "C100": 100}
BUFFERS = ("u0", "sv0", "stored_mean", "stored_var", "accumulation_counter")


def _resolved(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    k = {**DEFAULTS, **kwargs}
    if "resolution" not in kwargs and "dataset" in kwargs:  # a training config: size and classes from the dataset
        name = str(kwargs["dataset"]).split("_")[0]
        k["resolution"] = RES_OF_DATASET.get(name, k["resolution"])
        if "n_classes" not in kwargs:
            k["n_classes"] = CLASSES_OF_DATASET.get("C10" if name == "C10" else "C100" if name == "C100" else "I")
    return k


def config_from_kwargs(kwargs: Dict[str, Any], base: Optional[Config] = None, source: str = "kwargs") -> Config:
    """An hpc-gan config with BigGAN-PyTorch's architecture (on top of ``base``: data, loss, training settings)."""
    k = _resolved(kwargs)
    for key, want in REQUIRED.items():
        got = k.get(key, want)
        if got != want:
            raise UserError(f"{source}: {key}={got!r} is not supported (hpc-gan maps BigGAN-PyTorch models with "
                            f"{key}={want!r})")
    for key in ("G_nl", "D_nl"):
        if key in k and k[key] not in RELU:
            raise UserError(f"{source}: {key}={k[key]!r} is not supported (hpc-gan's BigGAN uses ReLU)")
    attn = {}
    for key in ("G_attn", "D_attn"):
        parts = [p for p in str(k[key]).split("_") if p not in ("", "0")]
        if len(parts) > 1:
            raise UserError(f"{source}: {key}={k[key]!r} places attention at several resolutions; hpc-gan's "
                            f"BigGAN has at most one attention layer per network")
        attn[key] = int(parts[0]) if parts else 0
    res = int(k["resolution"])
    slots = {32: 4, 64: 5, 128: 6, 256: 7}.get(res)
    if slots is None:
        raise UserError(f"{source}: resolution {res} is not one of 32, 64, 128, 256")
    chunk = int(k["dim_z"]) // slots
    cfg = base or load(Path(__file__).resolve().parents[2] / "configs" / "imagenet128_biggan_b2048.yaml")
    m = cfg.model
    m.arch, m.resolution, m.g_ch, m.d_ch = "biggan", res, int(k["G_ch"]), int(k["D_ch"])
    m.z_dim, m.shared_dim = chunk * slots, int(k["shared_dim"]) or int(k["dim_z"])
    m.g_attn_res, m.d_attn_res = attn["G_attn"], attn["D_attn"]
    m.bn_eps, m.sn_eps, m.out_bn_eps, m.d_shortcut = float(k["BN_eps"]), float(k["SN_eps"]), OUT_BN_EPS, "biggan"
    cfg.data.num_classes = int(k["n_classes"])
    cfg.loss.cond = "pd"
    return cfg


def _block_name(prefix: str, i: str, j: str) -> str:
    return f"{prefix}{'blocks' if j == '0' else 'attn'}.{i}"


def ours_from_theirs(name: str, net: str) -> Optional[str]:
    """hpc-gan's name of a BigGAN-PyTorch tensor (G or D), with SN buffers named sn_u / sn_sigma_source (u0)."""
    name = re.sub(r"\.u0$", ".sn_u", name)
    m = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)$", name)
    if m:
        rest = m.group(3)
        rest = re.sub(r"^(bn[12])\.stored_(mean|var)$", r"\1.bn.running_\2", rest)
        return f"{'blocks' if m.group(2) == '0' else 'attn'}.{m.group(1)}.{rest}"
    if net == "G":
        for a, b in (("output_layer.0.gain", "out.bn.weight"), ("output_layer.0.bias", "out.bn.bias"),
                     ("output_layer.0.stored_mean", "out.bn.running_mean"),
                     ("output_layer.0.stored_var", "out.bn.running_var")):
            if name == a:
                return b
        name = re.sub(r"^output_layer\.2\.", "out.conv.", name)
        return name if name.split(".")[0] in ("shared", "linear", "out") else None
    name = re.sub(r"^linear\.", "head.adv.", name)
    name = re.sub(r"^embed\.", "head.class_embed.", name)
    return name if name.startswith("head.") else None


def _theirs_from_ours(name: str, net: str) -> str:
    m = re.match(r"(blocks|attn)\.(\d+)\.(.*)$", name)
    if m:
        rest = re.sub(r"^(bn[12])\.bn\.running_(mean|var)$", r"\1.stored_\2", m.group(3))
        return f"blocks.{m.group(2)}.{0 if m.group(1) == 'blocks' else 1}.{rest}"
    table = {"out.bn.weight": "output_layer.0.gain", "out.bn.bias": "output_layer.0.bias",
             "out.bn.running_mean": "output_layer.0.stored_mean", "out.bn.running_var": "output_layer.0.stored_var"}
    if name in table:
        return table[name]
    name = re.sub(r"^out\.conv\.", "output_layer.2.", name)
    name = re.sub(r"^head\.adv\.", "linear.", name)
    return re.sub(r"^head\.class_embed\.", "embed.", name)


def _sn_from_u0(w: torch.Tensor, u0: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(u, v) of BigGAN-PyTorch's eval-mode power iteration from u0 (its F.normalize with its SN eps)."""
    wm = w.reshape(w.shape[0], -1).double()
    v = F.normalize(u0.double().reshape(1, -1) @ wm, eps=eps)
    u = F.normalize(v @ wm.t(), eps=eps)
    return u[0], v[0]


def _convert(state: State, net: str, eps: float, source: str) -> State:
    """BigGAN-PyTorch state -> hpc-gan state: renamed, sv0 dropped, (u0) -> (sn_u, sn_v)."""
    renamed = rename_all({k: v for k, v in state.items() if not k.endswith((".sv0", "accumulation_counter"))},
                         lambda k: ours_from_theirs(k, net), source, net)
    out = {}
    for k, v in renamed.items():
        if k.endswith(".sn_u"):
            layer = k[:-len(".sn_u")]
            if f"{layer}.weight" not in renamed:
                raise UserError(f"{source}: {net} has u0 for {layer} but no weight")
            u, v2 = _sn_from_u0(renamed[f"{layer}.weight"], v, eps)
            out[f"{layer}.sn_u"], out[f"{layer}.sn_v"] = u.float(), v2.float()
        else:
            out[k] = v
    return out


def load_biggan_pytorch(g_state: State, d_state: State, kwargs: Dict[str, Any], base: Optional[Config] = None,
                        source: str = "BigGAN-PyTorch checkpoint", overrides: Optional[List[str]] = None
                        ) -> Tuple[Config, nn.Module, nn.Module]:
    """(cfg, G, D) from BigGAN-PyTorch state dicts and the constructor kwargs they were built with. In eval mode
    ``G(z, y)`` equals BigGAN-PyTorch's ``G(z, G.shared(y))`` and ``D(x, y)["adv"]`` its ``D(x, y)``. ``base``:
    the hpc-gan config whose data, loss and training settings the result keeps (default: the BigGAN b2048 preset);
    ``overrides``: applied last."""
    cfg = with_overrides(config_from_kwargs(kwargs, base, source), overrides, source)
    G, D = build_models(cfg)
    eps = cfg.model.sn_eps
    fill(G, _convert(g_state, "G", eps, source), source, "G")
    fill(D, _convert(d_state, "D", eps, source), source, "D")
    return cfg, G.eval(), D.eval()


def _u0_for(layer: nn.Module) -> torch.Tensor:
    """The u0 whose BigGAN-PyTorch power iteration reproduces this layer's stored v (and its u, where u = n(W v))."""
    wm = layer.sn_matrix().detach().double()
    v = layer.sn_v.double()
    u0 = torch.linalg.lstsq(wm.t(), v.unsqueeze(1)).solution[:, 0]  # W^T u0 = v
    return F.normalize(u0, dim=0).float().reshape(1, -1)


def to_biggan_pytorch(net: nn.Module, name: str) -> State:
    """hpc-gan G or D -> a BigGAN-PyTorch state dict (``name``: "G" or "D")."""
    own = {k: v for k, v in net.state_dict().items() if not k.endswith(("num_batches_tracked", ".sn_v"))}
    out: State = {}
    for layer_name, layer in {n: m for n, m in net.named_modules() if m in set(spectral_norm_layers(net))}.items():
        out[_theirs_from_ours(f"{layer_name}.u0", name)] = _u0_for(layer)
        out[_theirs_from_ours(f"{layer_name}.sv0", name)] = layer.sn_sigma().reshape(1).float()
    for k, v in own.items():
        if not k.endswith(".sn_u"):
            out[_theirs_from_ours(k, name)] = v.clone()
    return out


def kwargs_of(cfg: Config, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """BigGAN-PyTorch constructor kwargs of an hpc-gan BigGAN config (refused for what BigGAN-PyTorch cannot build)."""
    m = cfg.model
    if m.arch != "biggan" or cfg.loss.cond != "pd" or m.d_shortcut != "biggan":
        raise UserError(f"export to BigGAN-PyTorch needs model.arch=biggan, loss.cond=pd and model.d_shortcut=biggan "
                        f"(this run: {m.arch}, {cfg.loss.cond}, {m.d_shortcut})")
    out_eps = m.bn_eps if m.out_bn_eps is None else m.out_bn_eps
    if out_eps != OUT_BN_EPS:
        log(f"note: BigGAN-PyTorch's output BatchNorm uses eps {OUT_BN_EPS:g}, this run {out_eps:g}: its samples "
            f"will differ slightly from hpc-gan's (train with model.out_bn_eps={OUT_BN_EPS:g} for equal outputs)")
    return {"resolution": m.resolution, "G_ch": m.g_ch, "D_ch": m.d_ch, "n_classes": cfg.data.num_classes,
            "G_attn": str(m.g_attn_res or 0), "D_attn": str(m.d_attn_res or 0), "G_shared": True,
            "shared_dim": m.shared_dim, "hier": True, "dim_z": m.z_dim, "BN_eps": m.bn_eps, "SN_eps": m.sn_eps}


# ---- weights folders ---------------------------------------------------------------------------------------------
def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"{path}: cannot read it as a torch file ({str(e).splitlines()[0]})") from None


def _param_names(state: State) -> List[str]:
    return [k for k in state if not k.endswith(BUFFERS)]


def import_biggan_pytorch(weights_dir: str, out: str, base: Optional[Config] = None,
                          overrides: Optional[List[str]] = None, log: Callable[[str], None] = print) -> Path:
    """A BigGAN-PyTorch weights folder (G.pth, D.pth, state_dict.pth with its config and itr; G_ema.pth, G_optim.pth,
    D_optim.pth where present) as an hpc-gan run directory at ``out``."""
    src = Path(weights_dir)
    for f in ("G.pth", "D.pth", "state_dict.pth"):
        if not (src / f).is_file():
            raise UserError(f"{src}: no {f}; a BigGAN-PyTorch weights folder holds G.pth, D.pth and state_dict.pth")
    meta = _load(src / "state_dict.pth")
    kwargs = meta.get("config") or {}
    g_state, d_state = _load(src / "G.pth"), _load(src / "D.pth")
    cfg, G, D = load_biggan_pytorch(g_state, d_state, kwargs, base, str(src), overrides)
    G_ema = None
    if (src / "G_ema.pth").is_file():
        G_ema = build_models(cfg)[0]
        fill(G_ema, _convert(_load(src / "G_ema.pth"), "G", cfg.model.sn_eps, str(src)), str(src), "G_ema")
    t = cfg.train
    opts = []
    for net, state, fname, lr in ((G, g_state, "G_optim.pth", t.g_lr), (D, d_state, "D_optim.pth", t.d_lr)):
        their = _load(src / fname) if (src / fname).is_file() else None
        tag = "G" if net is G else "D"
        opts.append(adam_state(list(net.named_parameters()), their, _param_names(state),
                               lambda k, tag=tag: ours_from_theirs(k, tag), lr, (t.beta1, t.beta2), t.adam_eps))
    log(f"BigGAN-PyTorch {cfg.model.resolution} px, G_ch {cfg.model.g_ch}, {cfg.data.num_classes} classes, itr "
        f"{int(meta.get('itr', 0))}; optimizer state {'imported' if (src / 'G_optim.pth').is_file() else 'fresh'}")
    return write_run(cfg, out, int(meta.get("itr", 0)), G, D, G_ema, opts[0], opts[1], log)


def export_biggan_pytorch(run: str, out: str, log: Callable[[str], None] = print) -> Path:
    """The newest intact checkpoint of an hpc-gan run as a BigGAN-PyTorch weights folder (G.pth, D.pth, G_ema.pth,
    state_dict.pth with ``config`` = the constructor kwargs and ``itr``)."""
    from hpc_gan.config import apply_overrides, from_dict
    from hpc_gan.train.checkpoint import load_consolidated
    state = load_consolidated(run)
    cfg = from_dict(apply_overrides(state["config"], []), f"{run} config")
    kwargs = kwargs_of(cfg, log)
    dst = Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    G, D = build_models(cfg)
    for key, net, name in (("G", G, "G"), ("D", D, "D"), ("G_ema", build_models(cfg)[0], "G")):
        net.load_state_dict(state[key])
        torch.save(to_biggan_pytorch(net, name), dst / f"{key}.pth")
    torch.save({"itr": int(state["step"]), "config": kwargs}, dst / "state_dict.pth")
    log(f"wrote {dst}: G.pth, D.pth, G_ema.pth, state_dict.pth (itr {state['step']}); BigGAN-PyTorch builds them "
        f"with BigGAN.Generator(**config) / BigGAN.Discriminator(**config)")
    return dst
