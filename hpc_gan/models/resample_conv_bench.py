"""G's upsample + 3x3 conv and D's 3x3 conv + pool at a config's own shapes, separate and fused (G's also
transposed; hpc_gan.models.resample_conv), timed with the backward each training step asks of them and summed to
device ms per training iteration beside the bandwidth floor. The GPU check pack's ``layers`` stage runs it.

Why: the fused forms do 4/9 of these convolutions' multiply-adds; at BigGAN-128 that is a third of the training
step's FLOPs gone (G's five upsampling convolutions and D's five pooled ones; ``hpc-gan info`` counts the separate
ops, the model's FLOPs). Whether cuDNN runs a 2x2 convolution, a 4x4 stride-2 one and a 4x4 stride-2 transposed
one (and their gradients) as fast per FLOP as it runs the 3x3 ones is what a GPU has to say.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hpc_gan.models.build import forward_on_meta
from hpc_gan.models.layers import make_pool, make_upsample
from hpc_gan.models.resample_conv import conv_avgpool, resampling_convs, upsample_conv, upsample_conv_transposed
from hpc_gan.models.formulation_bench import Plan, Shape, bench_formulations


def resample_conv_shapes(cfg: Any, batch: int) -> Dict[str, List[Tuple[Shape, Shape]]]:
    """{"G": ..., "D": ...}: (input shape, weight shape) of G's convolutions on an upsampled input (the input
    before the upsampling) and of D's convolutions whose output is pooled, in one forward on ``batch`` samples,
    recorded on the meta device with the separate ops."""
    found: Dict[str, List[Tuple[Shape, Shape]]] = {"G": [], "D": []}

    def hook(name: str, net: nn.Module) -> None:
        for conv in resampling_convs(net, "up" if name == "G" else "down"):
            conv.register_forward_pre_hook(lambda mod, args: found[name].append(
                (_before_upsampling(args[0].shape) if name == "G" else tuple(args[0].shape),
                 tuple(mod.weight.shape))))
    forward_on_meta(cfg, batch, dataclasses.replace(cfg.model, g_upconv_impl="separate",
                                                    d_downconv_impl="separate"), hook)
    return found


def _before_upsampling(shape: torch.Size) -> Shape:
    n, c, h, w = shape
    return n, c, h // 2, w // 2


def _plan(cfg: Any, batch: int) -> Plan:
    """G runs forward in each D step and forward + both gradients in the G step; D runs on the joined real + fake
    batch (2 x ``batch``) with both gradients in each D step (these convolutions are inside the network: their
    input's gradient reaches the layers before them) and on ``batch`` with the input's gradient in the G step."""
    n_dis, plan = cfg.train.n_dis, []
    recorded = resample_conv_shapes(cfg, batch)
    for x, w in recorded["G"]:
        plan.append(("g", f"G {w[1]}->{w[0]} at {x[2]}->{2 * x[2]}", x, w, 1,
                     [(n_dis, False, False), (1, True, True)]))
    for x, w in recorded["D"]:
        label = f"D {w[1]}->{w[0]} at {x[2]}->{x[2] // 2}"
        plan.append(("d", label, (2 * x[0], *x[1:]), w, 1, [(n_dis, True, True)]))
        plan.append(("d", label, x, w, 1, [(1, True, False)]))
    return plan


def formulations(cfg: Any) -> Dict[str, Dict[str, Callable[..., torch.Tensor]]]:
    """Per side, fn(x, w, b, padding) of each formulation, the separate ops first (with the resampling the model
    runs: ``model.upsample_impl``, ``model.pool_impl``, "auto" resolved on the tensor's device)."""
    up, pool = make_upsample(cfg.model.upsample_impl), make_pool(cfg.model.pool_impl)
    return {"g": {"separate": lambda x, w, b, p: F.conv2d(up(x), w, b, padding=p),
                  "fused": lambda x, w, b, p: upsample_conv(x, w, b),
                  "transposed": lambda x, w, b, p: upsample_conv_transposed(x, w, b)},
            "d": {"separate": lambda x, w, b, p: pool(F.conv2d(x, w, b, padding=p)),
                  "fused": lambda x, w, b, p: conv_avgpool(x, w, b)}}


def bench_resample_convs(cfg: Any, batch: int, device: torch.device, dtype: torch.dtype,
                         time_ms: Callable[[Callable[[], Any]], float], copy_gb_per_s: float,
                         deadline: float = float("inf")) -> Dict[str, Any]:
    """Per resampling convolution and formulation: ms per call as each training step calls it, summed per iteration
    at ``cfg.train.n_dis`` beside the floor, each formulation's output checked against the separate ops'; and per
    side ("g", "d") the fastest over all its convolutions. Past ``deadline`` (time.time()) the rest is skipped."""
    return bench_formulations("resample_conv", _plan(cfg, batch), formulations(cfg), device, dtype, time_ms,
                              copy_gb_per_s, deadline, cfg.train.cudnn_benchmark)
