"""Checkpoints of the reference implementations in and out of hpc-gan: BigGAN-PyTorch (ajbrock) and
PyTorch-StudioGAN (the ReACGAN authors'). Each loader returns ``(cfg, G, D)``: an hpc-gan config equal in
architecture and networks that compute the reference's eval-mode function; :func:`write_run` turns them into a run
directory that ``hpc-gan sample``, ``eval`` and ``train --resume auto`` accept at any world size."""
from hpc_gan.interop.biggan_pytorch import export_biggan_pytorch, import_biggan_pytorch, load_biggan_pytorch
from hpc_gan.interop.common import write_run
from hpc_gan.interop.studiogan import import_studiogan, load_studiogan

__all__ = ["export_biggan_pytorch", "import_biggan_pytorch", "import_studiogan", "load_biggan_pytorch",
           "load_studiogan", "write_run"]
