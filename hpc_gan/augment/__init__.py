"""Differentiable augmentations applied to D's inputs: DiffAugment and consistency regularization."""
from hpc_gan.augment.diffaug import Draws, consistency_augment, diff_augment

__all__ = ["Draws", "diff_augment", "consistency_augment"]
