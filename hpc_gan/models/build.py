"""Build G and D from the model section of a config."""
from __future__ import annotations

from typing import Any, Tuple

import torch.nn as nn

from hpc_gan.models import biggan


def build_generator(m: Any, n_classes: int) -> nn.Module:
    if m.arch == "biggan_deep":
        from hpc_gan.models import biggan_deep
        return biggan_deep.Generator(m.resolution, m.g_ch, n_classes, m.z_dim, m.shared_dim, m.g_attn_res,
                                     m.sn_eps, m.bn_eps)
    return biggan.Generator(m.resolution, m.g_ch, n_classes, m.z_dim, m.shared_dim, m.g_attn_res, m.sn_eps, m.bn_eps)


def build_discriminator(m: Any, n_classes: int, cond: str) -> nn.Module:
    if m.arch == "biggan_deep":
        from hpc_gan.models import biggan_deep
        return biggan_deep.Discriminator(m.resolution, m.d_ch, n_classes, cond, m.embed_dim, m.d_attn_res, m.sn_eps)
    return biggan.Discriminator(m.resolution, m.d_ch, n_classes, cond, m.embed_dim, m.d_attn_res, m.sn_eps)


def build_models(cfg: Any) -> Tuple[nn.Module, nn.Module]:
    """(G, D) for a full config: model section, data.num_classes and loss.cond."""
    n = cfg.data.num_classes
    return build_generator(cfg.model, n), build_discriminator(cfg.model, n, cfg.loss.cond)
