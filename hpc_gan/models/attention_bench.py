"""G's and D's self-attention at a config's own shapes: every ``model.attn_impl`` timed forward and forward +
backward, and summed to device ms per training iteration. The GPU check pack's ``layers`` stage runs it: on the H200
(BigGAN-128, batch 256, bf16) cuDNN's flash backward alone took 11.7 ms of the 317 ms step, on queries and keys
zero-padded 4x (G: 24 -> 96 channels), where the memory-efficient kernel takes them at 24 beside v's 96.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from hpc_gan.models.build import forward_on_meta
from hpc_gan.models.layers import ATTENTIONS, SelfAttention

Shape = Tuple[int, ...]


def attention_shapes(cfg: Any, batch: int) -> Dict[str, List[Shape]]:
    """{"G": ..., "D": ...}: the inputs of each network's attention blocks in one forward on ``batch`` samples,
    recorded on the meta device."""
    shapes: Dict[str, List[Shape]] = {"G": [], "D": []}

    def hook(name: str, net: nn.Module) -> None:
        for m in net.modules():
            if isinstance(m, SelfAttention):
                m.register_forward_pre_hook(lambda mod, args: shapes[name].append(tuple(args[0].shape)))
    forward_on_meta(cfg, batch, hook=hook)
    return shapes


def bench_attention(cfg: Any, batch: int, device: torch.device, dtype: torch.dtype,
                    time_ms: Callable[[Callable[[], Any]], float], deadline: float = float("inf")) -> Dict[str, Any]:
    """Per implementation and attention block: ms forward and forward + backward (to the input and the block's
    1x1 convolutions), and per training iteration at ``cfg.train.n_dis``: G's blocks run forward in every D step and
    forward + backward in the G step; D's forward + backward on the joined real + fake batch (2 x ``batch``) in
    every D step and on ``batch`` in the G step. Past ``deadline`` (time.time()) the rest is skipped: an
    implementation with a block left out gets no per-iteration total. No attention in the config: no rows."""
    n_dis = cfg.train.n_dis
    recorded = attention_shapes(cfg, batch)
    # (network, shape, forwards per iteration, forwards + backwards per iteration)
    plan = [("G", s, n_dis, 1) for s in recorded["G"]] + \
        [("D", (2 * s[0], *s[1:]), 0, n_dis) for s in recorded["D"]] + [("D", s, 0, 1) for s in recorded["D"]]
    rows: List[Dict[str, Any]] = []
    per_iteration: Dict[str, float] = {}
    for impl in ATTENTIONS:
        total = 0.0
        for net, shape, fwd_per_it, both_per_it in plan:
            if time.time() > deadline:
                break
            torch.manual_seed(0)
            block = SelfAttention(shape[1], partial(nn.Conv2d), impl).to(device, dtype)
            with torch.no_grad():
                block.gamma.fill_(0.5)  # 0 at init: the attention's gradients would all be zero
            x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            xg = x.detach().requires_grad_()
            g = torch.randn_like(x)
            leaves = [xg, *block.parameters()]
            torch.autograd.grad(block(xg), leaves, g)  # once untimed: backend selection, workspaces, first calls
            with torch.no_grad():
                fwd = time_ms(lambda: block(x))
            both = time_ms(lambda: torch.autograd.grad(block(xg), leaves, g))
            rows.append({"op": "attention", "net": net, "impl": impl, "shape": list(shape),
                         "forward_ms": fwd, "forward_backward_ms": both})
            total += fwd_per_it * fwd + both_per_it * both
        else:  # every block timed
            if plan:
                per_iteration[impl] = total
    best = min(per_iteration, key=per_iteration.get) if per_iteration else None
    return {"rows": rows, "ms_per_iteration": per_iteration, "best": best}

