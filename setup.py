"""hpc-gan: BigGAN + ReACGAN training for HPC clusters.

torch is a range that the CPU wheel 2.13.0 satisfies, so an existing CUDA build is kept; `make` installs
torch==2.13.0 first only where no torch is importable (see scripts/bootstrap.sh)."""
from setuptools import find_packages, setup

setup(
    name="hpc-gan",
    version="0.1.0",
    description="BigGAN-scale class-conditional GANs with the ReACGAN loss, from one CPU to many GPU nodes",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hpc_gan", "hpc_gan.*", "kernels", "kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1,<3", "numpy", "pyyaml", "pillow", "scipy"],
    extras_require={
        "dali": ["nvidia-dali-cuda120>=1.40"],
        "deepspeed": ["deepspeed>=0.17,<0.20"],
        "mpi": ["mpi4py", "mpich"],
        "triton": ["triton>=3.4,<4"],
        "tensorboard": ["tensorboard"],
        "plots": ["matplotlib"],
        "dev": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["hpc-gan=hpc_gan.cli:main"]},
)
