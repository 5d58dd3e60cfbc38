"""The step plan: the micro-batch-major layout of a global batch over ranks, and the run's random streams, which
must never share a seed (the old formulas made a D phase's latents collide with an epoch's data permutation)."""
import itertools

import pytest
import torch

from hpc_gan.errors import UserError
from hpc_gan.plan import G_PHASE, RandomStreams, StepPlan, d_phase

CPU = torch.device("cpu")


def all_stream_seeds(seed, steps=40, phases=4, epochs=40, batches=200, chunks=200):
    r = RandomStreams(seed)
    gens = []
    for step, phase in itertools.product(range(steps), range(phases)):
        gens += [r.latents(step, phase, CPU), r.real_augment(step, phase, CPU), r.fake_augment(step, phase, CPU),
                 r.consistency(step, phase, CPU), r.gp_mix(step, phase, CPU)]
    gens += [r.data_order(e) for e in range(epochs)] + [r.flips(k) for k in range(batches)]
    gens += [r.eval_chunk(c, CPU) for c in range(chunks)]
    gens += [r.sheet(CPU), r.standing_stats(CPU), r.demo_classifier(), r.demo_samples(CPU)]
    return [g.initial_seed() for g in gens] + [r.weights_init(), r.demo_classifier_init()]


def test_no_two_streams_share_a_seed():
    seeds = all_stream_seeds(0) + all_stream_seeds(1)
    assert len(seeds) == len(set(seeds)) > 2000
    # the collision of the old formulas: step 0, D phase 1 vs the permutation of epoch 1
    r = RandomStreams(0)
    assert r.latents(0, d_phase(0), CPU).initial_seed() != r.data_order(1).initial_seed()


def test_streams_are_reproducible_and_phases_distinct():
    a, b = RandomStreams(3), RandomStreams(3)
    assert torch.equal(torch.randn(5, generator=a.latents(7, G_PHASE, CPU)),
                       torch.randn(5, generator=b.latents(7, G_PHASE, CPU)))
    assert not torch.equal(torch.randn(5, generator=a.latents(7, G_PHASE, CPU)),
                           torch.randn(5, generator=a.latents(7, d_phase(0), CPU)))


@pytest.mark.parametrize("batch,world,micro", [(8, 1, 0), (8, 2, 0), (8, 2, 2), (12, 3, 2), (16, 4, 1)])
def test_layout_is_micro_batch_major(batch, world, micro):
    plans = [StepPlan(batch, world, r, micro) for r in range(world)]
    p0 = plans[0]
    assert sorted(torch.cat([p.positions for p in plans]).tolist()) == list(range(batch))
    for p in plans:
        assert len(p.positions) == p.local_batch == p.accum * p.micro
        for m in range(p.accum):
            rows = p.positions[p.micro_slice(m)]
            assert rows.tolist() == list(range(p.offset(m), p.offset(m) + p.micro))
    # micro-batch m of W ranks x B covers exactly what micro-batch m of 1 rank x W*B covers
    one = StepPlan(batch, 1, 0, p0.micro * world)
    for m in range(p0.accum):
        ranks = sorted(torch.cat([p.positions[p.micro_slice(m)] for p in plans]).tolist())
        assert ranks == one.positions[one.micro_slice(m)].tolist()


def test_real_data_draws_do_not_depend_on_the_world_size():
    one = StepPlan(12, seed=5)
    for world in (2, 3):
        for rank in range(world):
            p = StepPlan(12, world, rank, micro=2, seed=5)
            for k in (0, 1, 7):
                assert torch.equal(p.rank_indices(50, k), one.batch_indices(50, k)[p.positions])
                assert torch.equal(p.flips(k), one.flips(k)[p.positions])


def test_bad_layouts_are_one_line_errors():
    with pytest.raises(UserError, match="does not split over 3 ranks"):
        StepPlan(8, 3, 0)
    with pytest.raises(UserError, match="not train.micro_batch=3 x accumulation x 2 ranks"):
        StepPlan(8, 2, 0, micro=3)
    with pytest.raises(UserError, match="fewer than one global batch"):
        StepPlan(8).batch_indices(5, 0)
