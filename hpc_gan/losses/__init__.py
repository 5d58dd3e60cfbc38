"""Adversarial losses, conditioning losses that consume D's output dict, and regularizers."""
from hpc_gan.losses.adversarial import d_adv_loss, g_adv_loss, gradient_penalty
from hpc_gan.losses.conditioning import cond_loss, has_cond_loss
from hpc_gan.losses.regularizers import (add_orthogonal_grad_, ortho_shards, ortho_weights, orthogonal_reg,
                                         seed_orthogonal_grad_)

__all__ = ["d_adv_loss", "g_adv_loss", "gradient_penalty", "cond_loss", "has_cond_loss", "orthogonal_reg",
           "ortho_weights", "add_orthogonal_grad_", "ortho_shards", "seed_orthogonal_grad_"]
