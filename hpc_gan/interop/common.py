"""What both importers share: filling hpc-gan networks from renamed state dicts (every key accounted for), Adam
states re-indexed by parameter name, and writing a run directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from hpc_gan.config import Config, apply_overrides, dump, from_dict, to_dict
from hpc_gan.dist.engines import build_optimizer
from hpc_gan.errors import UserError
from hpc_gan.train import checkpoint

State = Dict[str, torch.Tensor]


def with_overrides(cfg: Config, overrides: Optional[List[str]], source: str) -> Config:
    """``cfg`` with ``section.key=value`` overrides applied and validated (data paths, training settings)."""
    return from_dict(apply_overrides(to_dict(cfg), overrides or []), source) if overrides else cfg


def fill(net: nn.Module, mapped: State, source: str, what: str) -> None:
    """Load ``mapped`` (hpc-gan names) into ``net``: every tensor of the net must be given, except BN batch counters,
    with the net's shape; a missing or misshapen one is a one-line error naming it."""
    own = net.state_dict()
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    extra = [k for k in mapped if k not in own]
    if missing or extra:
        raise UserError(f"{source}: {what} does not match this architecture (missing {missing[:3]}, unexpected "
                        f"{extra[:3]}); check the model settings it was trained with")
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(f"{source}: {what}.{k} has shape {tuple(v.shape)}, this architecture {tuple(own[k].shape)}")
    own.update({k: v.to(own[k].dtype) for k, v in mapped.items()})
    net.load_state_dict(own)


def rename_all(state: State, rename: Callable[[str], Optional[str]], source: str, what: str) -> State:
    """``state`` under new names; ``rename`` returns None for a key the mapping does not know (refused)."""
    out = {}
    for k, v in state.items():
        new = rename(k)
        if new is None:
            raise UserError(f"{source}: {what} has a tensor {k!r} this importer does not know; the checkpoint's "
                            f"architecture is not one hpc-gan can load")
        out[new] = v
    return out


def adam_state(params: List[Tuple[str, nn.Parameter]], their: Optional[Dict[str, Any]], their_names: List[str],
               rename: Callable[[str], Optional[str]], lr: float, betas: tuple, eps: float) -> Dict[str, Any]:
    """An hpc-gan optimizer state ({"adam": torch Adam state dict}) for ``params``: fresh, or ``their`` Adam state
    re-indexed from their parameter order (``their_names``) to ours by name."""
    fresh = build_optimizer([p for _, p in params], "torch", lr, betas, eps).state_dict()
    if their is None:
        return {"adam": fresh}
    index = {name: i for i, (name, _) in enumerate(params)}
    state = {}
    for j, name in enumerate(their_names):
        ours = rename(name)
        if ours not in index:
            raise UserError(f"optimizer state: parameter {name!r} has no counterpart here")
        if j in their["state"]:
            state[index[ours]] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in their["state"][j].items()}
    fresh["state"] = state
    return {"adam": fresh}


def write_run(cfg: Config, out: str, step: int, G: nn.Module, D: nn.Module, G_ema: Optional[nn.Module],
              g_opt: Dict[str, Any], d_opt: Dict[str, Any], log: Callable[[str], None] = print) -> Path:
    """A run directory at ``out`` (config.yaml + one verified checkpoint at ``step``) that ``hpc-gan train --config
    OUT/config.yaml --resume auto`` continues as a fine-tune, and ``sample`` / ``eval`` read."""
    run = Path(out)
    if checkpoint.any_checkpoints(run / "checkpoints"):
        raise UserError(f"--out {run} already holds checkpoints; choose a new run directory (nothing was changed)")
    cfg.run.dir = str(run)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "samples").mkdir(exist_ok=True)
    (run / "config.yaml").write_text(dump(cfg))
    ema = G_ema if G_ema is not None else G
    state = {"step": step, "G": G.state_dict(), "D": D.state_dict(), "G_ema": ema.state_dict(), "g_opt": g_opt,
             "d_opt": d_opt, "data": {"consumed": 0}, "world_size": 1, "strategy": cfg.dist.strategy,
             "config": to_dict(cfg)}
    path = checkpoint.save(run / "checkpoints", step, state)
    log(f"wrote {path} (step {step}{'' if G_ema is not None else ', G_ema = G: the checkpoint had none'}); "
        f"continue with: hpc-gan train --config {run / 'config.yaml'} --resume auto")
    return run
