"""``python -m hpc_gan.gpucheck``: scripts/gpu-check.sh's entry point (and the stages' child processes')."""
import sys

from hpc_gan.gpucheck.runner import main

sys.exit(main())
