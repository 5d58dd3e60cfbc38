"""The step plan: how a global batch is laid out over ranks and micro-batches, and every random stream of a run.

Determinism is the contract that makes a run resumable and world-size independent: step k of a run computes the
same thing whether it runs on 1 rank or 256, straight or after a resume. Two things carry it, and both live here.

- **Layout** (:class:`StepPlan`). The global batch is micro-batch-major: accumulation step m covers the contiguous
  chunk [m * world * micro, (m + 1) * world * micro) of the global batch, split over the ranks in order. So the
  samples that meet in one cross-replica BN or one global-negatives D2D-CE are the same whatever the world size, and
  2 ranks x micro-batch B compute exactly what 1 rank x 2B does. With no accumulation a rank's positions are the
  plain contiguous slice.
- **Randomness** (:class:`RandomStreams`). Every draw of a run comes from a generator seeded by a hash of (run seed,
  stream name, indices): latents and fake labels per (step, phase), each augmentation per (step, phase), the data
  permutation per epoch, flips per global batch, evaluation chunks, sample sheets, standing statistics and the demo
  classifier. Distinct streams or indices never share a seed (up to a 64-bit hash collision), and every draw is made
  for the whole global batch and sliced, so a sample's randomness depends on its global position only.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from hpc_gan.errors import UserError

# Phases of a training step, for the per-phase streams: the G update, then D updates 1..n_dis.
G_PHASE = 0


def d_phase(k: int) -> int:
    """The phase of D update k (0-based) of a step."""
    return 1 + k


def stream_seed(*key: Any) -> int:
    """A 63-bit seed from a key of ints and strings: a hash, so different keys give unrelated seeds."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RandomStreams:
    """One named, seeded generator per use of randomness in a run (see the module docstring)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def _gen(self, name: str, *index: int, device: Optional[torch.device] = None) -> torch.Generator:
        return torch.Generator(device=device or "cpu").manual_seed(stream_seed(self.seed, name, *index))

    def weights_init(self) -> int:
        """The seed of the networks' initial weights (the global torch generator at construction)."""
        return stream_seed(self.seed, "weights_init")

    # ---- the training step (phase: G_PHASE or d_phase(k)) ------------------------------------------------------
    def latents(self, step: int, phase: int, device: torch.device) -> torch.Generator:
        """z and fake labels of a phase of a step."""
        return self._gen("latents", step, phase, device=device)

    def real_augment(self, step: int, phase: int, device: torch.device) -> torch.Generator:
        """DiffAugment of the real images."""
        return self._gen("real_augment", step, phase, device=device)

    def fake_augment(self, step: int, phase: int, device: torch.device) -> torch.Generator:
        """DiffAugment of the fakes."""
        return self._gen("fake_augment", step, phase, device=device)

    def consistency(self, step: int, phase: int, device: torch.device) -> torch.Generator:
        """Consistency regularization's flip and translation of the real images."""
        return self._gen("consistency", step, phase, device=device)

    def gp_mix(self, step: int, phase: int, device: torch.device) -> torch.Generator:
        """The gradient penalty's interpolation weights."""
        return self._gen("gp_mix", step, phase, device=device)

    # ---- the data ----------------------------------------------------------------------------------------------
    def data_order(self, epoch: int) -> torch.Generator:
        """The permutation of the data set in an epoch (CPU)."""
        return self._gen("data_order", epoch)

    def flips(self, batch_index: int) -> torch.Generator:
        """Horizontal flips of the real images of global batch ``batch_index`` (CPU)."""
        return self._gen("flips", batch_index)

    # ---- sampling ----------------------------------------------------------------------------------------------
    def eval_chunk(self, chunk: int, device: torch.device) -> torch.Generator:
        """z and labels of evaluation chunk ``chunk`` (chunks are spread over ranks)."""
        return self._gen("eval_chunk", chunk, device=device)

    def sheet(self, device: torch.device) -> torch.Generator:
        """The fixed z of the sample sheets."""
        return self._gen("sheet", device=device)

    def standing_stats(self, device: torch.device) -> torch.Generator:
        """z and labels of the standing-statistics passes: the same in training, eval and the CLI."""
        return self._gen("standing_stats", device=device)

    def demo_classifier(self) -> torch.Generator:
        """The demo classifier's held-out split and training order (CPU)."""
        return self._gen("demo_classifier")

    def demo_classifier_init(self) -> int:
        """The seed of the demo classifier's initial weights (the global torch generator at construction)."""
        return stream_seed(self.seed, "demo_classifier_init")

    def demo_samples(self, device: torch.device) -> torch.Generator:
        """z of the samples the demo classifier scores."""
        return self._gen("demo_samples", device=device)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    # cached: a permutation of ImageNet costs ~10 ms, too much to redo every step
    return torch.randperm(n, generator=RandomStreams(seed).data_order(epoch))


@dataclass(frozen=True)
class StepPlan:
    """The layout of one rank's share of every global batch, and the run's random streams.

    ``batch`` is the global batch, ``micro`` the micro-batch of one forward/backward on one rank (0: the whole per-rank
    batch); accumulation steps = batch / (micro x world)."""

    batch: int
    world: int = 1
    rank: int = 0
    micro: int = 0
    seed: int = 0
    rng: RandomStreams = field(init=False, repr=False, compare=False)
    positions: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.batch % self.world:
            raise UserError(f"train.batch_size={self.batch} does not split over {self.world} ranks; use a multiple "
                            f"of the world size")
        local = self.batch // self.world
        micro = min(self.micro, local) if self.micro else local
        if local % micro:
            raise UserError(f"train.batch_size={self.batch} is not train.micro_batch={micro} x accumulation x "
                            f"{self.world} ranks; pick micro_batch dividing {local} (batch / ranks)")
        object.__setattr__(self, "micro", micro)
        object.__setattr__(self, "rng", RandomStreams(self.seed))
        object.__setattr__(self, "positions", torch.cat([
            torch.arange(self.offset(m), self.offset(m) + micro) for m in range(local // micro)]))

    @classmethod
    def from_config(cls, cfg: Any, rank: int = 0, world: int = 1) -> "StepPlan":
        t = cfg.train
        return cls(t.batch_size, world, rank, t.micro_batch, t.seed)

    @property
    def local_batch(self) -> int:
        return self.batch // self.world

    @property
    def accum(self) -> int:
        return self.local_batch // self.micro

    def micro_slice(self, m: int) -> slice:
        """Rows of micro-batch m in this rank's local batch."""
        return slice(m * self.micro, (m + 1) * self.micro)

    def offset(self, m: int) -> int:
        """Position in the global batch of the first sample of this rank's micro-batch m."""
        return m * self.world * self.micro + self.rank * self.micro

    # ---- real data ---------------------------------------------------------------------------------------------
    def batch_indices(self, n: int, k: int) -> torch.Tensor:
        """Sample indices (into a data set of n) of global batch k: batches walk an epoch-wise permutation, the last
        partial batch of an epoch dropped."""
        per_epoch = n // self.batch
        if per_epoch == 0:
            raise UserError(f"the data set has {n} images, fewer than one global batch of {self.batch}; use a "
                            f"smaller train.batch_size or more data")
        epoch, pos = divmod(k, per_epoch)
        return _epoch_permutation(n, self.seed, epoch)[pos * self.batch:(pos + 1) * self.batch]

    def rank_indices(self, n: int, k: int) -> torch.Tensor:
        """This rank's sample indices of global batch k, in its micro-batch order."""
        return self.batch_indices(n, k)[self.positions]

    def flips(self, k: int) -> torch.Tensor:
        """Whether each of this rank's images of global batch k is mirrored (bool, CPU)."""
        return (torch.rand(self.batch, generator=self.rng.flips(k)) < 0.5)[self.positions]
