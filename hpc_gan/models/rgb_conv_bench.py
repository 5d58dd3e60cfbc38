"""The convolutions that touch RGB (D's first block reads 3 channels, G's output writes 3) at a config's own shapes:
every formulation of ``model.d_rgb_conv_impl`` and ``model.g_rgb_conv_impl`` (hpc_gan.models.rgb_conv), timed with
the backward each training step asks of them and summed to device ms per training iteration beside the bandwidth
floor. The GPU check pack's ``layers`` stage runs it.

Why: on the H200 (2026-11-27, BigGAN-128, bf16, channels-last, 256 per GPU) two forward kernels that run 3 times
an iteration stood out, a CUTLASS fprop at ~2 ms a call (D's 3 -> 96 input convolution, after cuDNN pads the 3
channels to 8) and an sm80 fprop with a 32-wide tile at ~0.9 ms a call (G's 96 -> 3 output convolution): ~9 ms
of forward alone, where their bytes take under 2. Which calls they are is inferred from the kernels' names and
counts; this bench measures them, and the check pack's ``eager fastest layers`` train case runs the winners in a
step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from hpc_gan.models.build import forward_on_meta
from hpc_gan.models.formulation_bench import Plan, Shape, bench_formulations
from hpc_gan.models.rgb_conv import D_RGB_CONVS, G_RGB_CONVS, rgb_convs


def rgb_conv_shapes(cfg: Any, batch: int) -> Dict[str, List[Tuple[Shape, Shape, int]]]:
    """{"G": ..., "D": ...}: (input shape, weight shape, padding) of each network's convolutions that read or write
    3 channels, in one forward on ``batch`` samples, recorded on the meta device."""
    found: Dict[str, List[Tuple[Shape, Shape, int]]] = {"G": [], "D": []}

    def hook(name: str, net: nn.Module) -> None:
        for conv in rgb_convs(net, "out" if name == "G" else "in"):
            conv.register_forward_pre_hook(lambda mod, args: found[name].append(
                (tuple(args[0].shape), tuple(mod.weight.shape), int(mod.padding[0]))))
    forward_on_meta(cfg, batch, dataclasses.replace(cfg.model, d_rgb_conv_impl="conv2d", g_rgb_conv_impl="conv2d"),
                    hook)
    return found


def _plan(cfg: Any, batch: int) -> Plan:
    """(side "d" or "g", label, input shape, weight shape, padding, [(calls per iteration, input grad?, weight
    grad?)]): each D step runs D on the joined real + fake batch (2 x ``batch``) with weight gradients only (its
    inputs need none); the G step runs D on ``batch`` with the input gradient only (D is frozen); G runs forward in
    each D step and forward + both gradients in the G step."""
    n_dis, plan = cfg.train.n_dis, []
    recorded = rgb_conv_shapes(cfg, batch)
    for x, w, p in recorded["D"]:
        label = f"D {w[1]}->{w[0]} k{w[2]} at {x[2]}"
        plan.append(("d", label, (2 * x[0], *x[1:]), w, p, [(n_dis, False, True)]))
        plan.append(("d", label, x, w, p, [(1, True, False)]))
    for x, w, p in recorded["G"]:
        plan.append(("g", f"G {w[1]}->{w[0]} k{w[2]} at {x[2]}", x, w, p, [(n_dis, False, False), (1, True, True)]))
    return plan


def bench_rgb_convs(cfg: Any, batch: int, device: torch.device, dtype: torch.dtype,
                    time_ms: Callable[[Callable[[], Any]], float], copy_gb_per_s: float,
                    deadline: float = float("inf")) -> Dict[str, Any]:
    """Per RGB convolution and formulation of its side (D's ``D_RGB_CONVS``, G's ``G_RGB_CONVS``): ms per call as
    each training step calls it, summed per iteration at ``cfg.train.n_dis`` beside the floor (each byte once at
    ``copy_gb_per_s``); and per side ("d", "g") the fastest over all its convolutions. Every formulation's output is
    checked against ``conv2d``'s on the inputs it is timed on (``rel_error``). Past ``deadline`` (time.time()) the
    rest is skipped: a formulation with a call left out gets no total."""
    return bench_formulations("rgb_conv", _plan(cfg, batch), {"d": D_RGB_CONVS, "g": G_RGB_CONVS}, device, dtype,
                              time_ms, copy_gb_per_s, deadline, cfg.train.cudnn_benchmark)
