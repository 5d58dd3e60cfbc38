"""BigGAN's orthogonal regularization in its off-diagonal form (Brock et al. 2019, Eq. 3)."""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import torch

Block = Tuple[int, int, int]  # (weight index, first row, end row) of the (out, fan_in) views
# a Gram matrix larger than this (elements) is left unformed for a tall weight (``_add_ortho_rows_``): below it,
# its products cost less than the tall form's few more launches, which a small per-GPU batch pays on the host
GRAM_MAX = 2 ** 22


def uses_tall_form(out: int, fan_in: int) -> bool:
    """Whether an (out, fan_in) weight's rows go through its fan_in x fan_in W^T W (``_add_ortho_rows_``)."""
    return out > fan_in and out * out > GRAM_MAX


def orthogonal_reg(weights: Iterable[torch.Tensor], beta: float) -> torch.Tensor:
    """beta * sum_W ||W W^T * (1 - I)||_F^2 with W the (out, fan_in) view: pairwise filter similarities are pushed
    to zero, filter norms are left free."""
    total = None
    for w in weights:
        w = w.reshape(w.shape[0], -1)
        gram = w @ w.t()
        off = gram - torch.diag_embed(torch.diagonal(gram))
        term = (off ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("orthogonal_reg: no weights given")
    return beta * total


def add_orthogonal_grad_(weights: Iterable[torch.Tensor], beta: float) -> torch.Tensor:
    """Add the gradient of ``orthogonal_reg(weights, beta)``, 4 beta (W W^T * (1 - I)) W, to each weight's .grad
    without autograd (a few ops per weight, no backward graph: BigGAN-PyTorch's way); returns the regularizer's
    value. For gradients that are complete and unscaled: after the (synchronized) backward, before the step."""
    weights = list(weights)
    if not weights:
        raise ValueError("add_orthogonal_grad_: no weights given")
    return seed_orthogonal_grad_(weights, beta, [(i, 0, w.shape[0]) for i, w in enumerate(weights)])


def ortho_shards(shapes: Sequence[Tuple[int, int]], world: int) -> List[List[Block]]:
    """Per rank, the rows of the weights (``shapes``: each one's (out, fan_in) view) whose part of the orthogonal
    regularization it computes: one contiguous run of equal cost each, over all weights in order. A row of an
    (o, k) weight costs 2 o k multiply-adds (its row of W W^T, and its row of the gradient), or about 2 k^2 for a
    tall one (``_add_ortho_rows_``), so the rows of G's widest convolutions spread over many ranks and the smallest
    weights share one. Every row is in one block."""
    costs = [k * k if uses_tall_form(o, k) else o * k for o, k in shapes]
    total = sum(o * c for (o, _), c in zip(shapes, costs))
    bounds = [total * r // world for r in range(world + 1)]
    shards: List[List[Block]] = [[] for _ in range(world)]
    start = 0  # the cost before this weight's first row
    for i, ((o, _), c) in enumerate(zip(shapes, costs)):
        for r in range(world):  # rank r: the rows whose cost offset start + j c lies in [bounds[r], bounds[r + 1])
            lo = min(o, max(0, -((start - bounds[r]) // c)))
            hi = o if r == world - 1 else min(o, max(0, -((start - bounds[r + 1]) // c)))
            if lo < hi:
                shards[r].append((i, lo, hi))
        start += o * c
    return shards


def _add_ortho_rows_(out: torch.Tensor, m: torch.Tensor, r0: int, r1: int, alpha: float) -> torch.Tensor:
    """Add alpha times rows r0:r1 of (W W^T * (1 - I)) W, for W = m (out, fan_in), to ``out`` (those rows of the
    gradient). Returns what gives those rows' part of ||W W^T * (1 - I)||_F^2: their rows of the Gram matrix (its
    squared norm), or for a tall W the part itself. A tall W (out > fan_in, and a Gram matrix over ``GRAM_MAX``
    elements: BigGAN-128 G's first linear is 24576 x 20) goes through its fan_in x fan_in W^T W: row j of W W^T W
    is w_j (W^T W), less the diagonal's ||w_j||^2 w_j, and ||W w_j||^2 - ||w_j||^4 is row j's sum of squares; the
    out x out Gram matrix (2.4 GB for that linear, of rank 20) is never formed."""
    rows = m if r1 - r0 == m.shape[0] else m[r0:r1]  # a whole weight unsliced: one op fewer per weight
    if uses_tall_form(*m.shape):
        h = rows @ (m.t() @ m)
        sq = rows.square().sum(1)
        out.add_(h - sq[:, None] * rows, alpha=alpha)
        return ((h * rows).sum(1) - sq.square()).sum()
    gram = rows @ m.t()
    gram.diagonal(offset=r0).zero_()  # row j of the block is row r0 + j of W W^T
    out.addmm_(gram, m, alpha=alpha)
    return gram


@torch.no_grad()
def seed_orthogonal_grad_(weights: Sequence[torch.Tensor], beta: float, blocks: Sequence[Block],
                          scale: float = 1.0) -> torch.Tensor:
    """Add ``scale`` times the rows ``blocks`` of ``orthogonal_reg(weights, beta)``'s gradient to the weights'
    .grad (zeros first where there is none), and return ``scale`` times those rows' part of its value. Row block
    (r0, r1) of 4 beta (W W^T * (1 - I)) W needs only its own rows of the Gram matrix, so ranks can split the work
    (``ortho_shards``) and, seeding their blocks before the backward with ``scale`` = the world size, let the
    data-parallel all-reduce (a mean) assemble the whole."""
    grams, parts = [], []
    for i, r0, r1 in blocks:
        w = weights[i]
        m = w.view(w.shape[0], -1)
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        out = w.grad.view_as(m)
        got = _add_ortho_rows_(out if r1 - r0 == m.shape[0] else out[r0:r1], m, r0, r1, 4.0 * beta * scale)
        (parts if got.dim() == 0 else grams).append(got)
    if grams:  # one pass over all the Gram blocks
        parts.append(torch.stack(torch._foreach_norm(grams)).square().sum())
    if not parts:  # more ranks than rows: nothing here (its metric adds 0)
        return torch.zeros((), device=weights[0].device)
    return beta * scale * torch.stack(parts).sum()


def ortho_weights(model: torch.nn.Module) -> list:
    """The weights BigGAN regularizes: every conv/linear weight of G, not the shared class embedding, biases or
    BN parameters."""
    return [p for name, p in model.named_parameters()
            if p.dim() >= 2 and not name.startswith("shared.")]
