"""A timestep proposal for the training-gradient draws: Neyman allocation from a small pilot.

The training loss averages over t ~ U{0..T-1}. Its per-example gradient is estimated from K draws;
what matters for the galleries is the noise of the SCORES v^T g_j, whose per-draw spread differs by
orders of magnitude across t (measured on the demo run: the standard deviation is ~100x larger
for t < 200 than for t > 600). Stratified sampling over timestep bins with n_h proportional to
p_h sigma_h (Neyman 1934) minimises the variance of the weighted estimate; the proposal keeps a
floor on every bin so every weight p(t) / q(t) stays bounded and the estimate unbiased.

sigma_h is measured once per run on a pilot: a few training examples' draws in each bin, scored
against a few directions v (K-FAC-preconditioned training-loss gradients of other training
examples: query-independent, so one store serves every query, variant and damping).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from attribution.measurements import PROPOSAL_EDGES, Measurement

PILOT_EXAMPLES = 32
PILOT_DIRECTIONS = 8
PILOT_DRAWS_PER_BIN = 4
PROPOSAL_FLOOR = 0.05  # share of the draws spread uniformly over t (bounds the importance weights)


def bin_score_spread(unet, schedule, images: Tensor, directions: Tensor, seed: int,
                     draws_per_bin: int = PILOT_DRAWS_PER_BIN, antithetic: bool = False) -> Tensor:
    """Per-bin standard deviation of one draw's score ``directions @ grad l_t(x_j)`` over
    (eps, t within the bin), averaged over examples and directions: ``[num_bins]`` float64.

    ``antithetic``: the draws come in pairs (t, eps), (t, -eps); the spread is then that of a
    pair's mean times sqrt(2) (per draw, at the same cost), from draws_per_bin / 2 pairs."""
    from attribution.gradients import per_example_gradients
    from attribution.measurements import DrawOptions

    # a draw, or an antithetic pair (whose mean's variance, times 2, is the per-draw variance at equal cost)
    per_k, options, scale = (2, DrawOptions(scheme="antithetic"), 2.0) if antithetic else (1, DrawOptions(), 1.0)
    count = max(2, draws_per_bin // 2) if antithetic else draws_per_bin
    T = schedule.T
    edges = [round(e * T) for e in PROPOSAL_EDGES]
    g = torch.Generator().manual_seed(seed)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        ts = torch.randint(a, max(b, a + 1), (count,), generator=g).tolist()
        vals = []
        for k, t in enumerate(ts):  # one draw (pair) per (example, k): its own eps via its own key
            grads = per_example_gradients(unet, schedule, images, Measurement("lt", t), per_k, seed,
                                          offset=[10_000 * (k + 1) + i for i in range(len(images))], options=options)
            vals.append(directions @ grads.T.to(directions.dtype))  # [R, J]
        s = torch.stack(vals).double()  # [K, R, J]
        out.append(float((scale * s.var(0).mean()).sqrt()))
    return torch.tensor(out, dtype=torch.float64)


def neyman_proposal(spread: Tensor, floor: float = PROPOSAL_FLOOR) -> tuple[float, ...]:
    """Bin probabilities q_h = (1 - floor) p_h sigma_h / sum + floor p_h, with p_h the bin widths."""
    widths = torch.tensor([b - a for a, b in zip(PROPOSAL_EDGES[:-1], PROPOSAL_EDGES[1:])], dtype=torch.float64)
    ney = widths * spread.clamp_min(1e-300)
    q = (1 - floor) * ney / ney.sum() + floor * widths
    return tuple(float(x) for x in q / q.sum())


def pilot_proposal(unet, schedule, images: Tensor, precondition: Callable[[Tensor], Tensor], seed: int,
                   antithetic: bool = False) -> tuple:
    """The proposal of a run: pilot examples and directions drawn (seeded) from ``images``;
    ``antithetic``: allocated for antithetic pairs (:func:`bin_score_spread`)."""
    from attribution.gradients import per_example_gradients

    g = torch.Generator().manual_seed(seed + 7)
    perm = torch.randperm(images.shape[0], generator=g)
    dir_idx = perm[:PILOT_DIRECTIONS].tolist()
    ex_idx = perm[PILOT_DIRECTIONS:PILOT_DIRECTIONS + PILOT_EXAMPLES].tolist()
    gd = per_example_gradients(unet, schedule, images[dir_idx], Measurement("loss"), 32, seed + 7, offset=dir_idx)
    directions = precondition(gd).float()
    return neyman_proposal(bin_score_spread(unet, schedule, images[ex_idx], directions, seed,
                                            antithetic=antithetic))
