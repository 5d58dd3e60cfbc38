"""BigGAN and BigGAN-deep networks, built from a config by :func:`build_models`."""
from hpc_gan.models.build import build_discriminator, build_generator, build_models, set_memory_format

__all__ = ["build_generator", "build_discriminator", "build_models", "set_memory_format"]
