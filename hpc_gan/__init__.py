"""hpc-gan: BigGAN-scale class-conditional GANs with the ReACGAN loss, from one CPU to many GPU nodes."""
__version__ = "0.1.0"
