"""Antithetic draws (scheme ``antithetic``): pair structure, exact cancellation of the part of a
draw that is odd in eps, unbiasedness against the exhaustive sum over t, and the pilot's
proposal for pairs."""

from __future__ import annotations

import pytest
import torch

from attribution.ddpm import build_unet, linear_schedule
from attribution.measurements import (
    PROPOSAL_EDGES,
    DrawOptions,
    Measurement,
    draw_plan,
    measurement_values,
    proposal_pmf,
)
from attribution.proposal import bin_score_spread, neyman_proposal

PROPOSAL = (1.0, 2.0, 2.0, 3.0, 3.0, 1.0, 1.0, 1.0)
WIDTHS = tuple(b - a for a, b in zip(PROPOSAL_EDGES[:-1], PROPOSAL_EDGES[1:]))  # q(t) uniform
A = 0.3  # the stand-in network's slope


class LinearEps(torch.nn.Module):
    """eps(x_t, t) = A * x_t + b_t: its loss at t is (1 - A s_t)^2 ||eps||^2 - 2 (1 - A s_t) eps.c_t + ||c_t||^2
    with s_t = sqrt(1 - abar_t), c_t = A sqrt(abar_t) x_0 + b_t: the cross term is odd in eps."""

    def __init__(self, T):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.bt = torch.linspace(-0.1, 0.1, T, dtype=torch.float64)

    def forward(self, x, t):
        return type("O", (), {"sample": A * x + self.bt[t].view(-1, 1, 1, 1) + 0 * self.w})()


def _images(n=2, seed=3):
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("K", [4, 5])
def test_pairs_share_t_and_flip_and_negate_eps(K):
    s = linear_schedule(T=50)
    x = _images(3)
    plan = draw_plan(s, x, Measurement("loss"), K, seed=1, indices=[0, 1, 2],
                     options=DrawOptions("antithetic", hflip=True, proposal=PROPOSAL))
    t = plan.t.view(3, K)
    eps = plan.target.view(3, K, -1)
    coef = plan.coef.view(3, K)
    for j in range(K // 2):
        assert torch.equal(t[:, 2 * j], t[:, 2 * j + 1])
        assert torch.equal(eps[:, 2 * j], -eps[:, 2 * j + 1])
        assert torch.equal(coef[:, 2 * j], coef[:, 2 * j + 1])
    # the weights are the importance weights (1/T) / q(t) / K of each row's t
    q = proposal_pmf(PROPOSAL, s.T)
    torch.testing.assert_close(plan.coef, (1.0 / s.T) / q[plan.t] / K, rtol=1e-12, atol=0)
    if K % 2:  # the unpaired last draw has its own noise
        assert not torch.equal(eps[:, -1].abs(), eps[:, -2].abs())
    # the pairs' timesteps are stratified over K // 2 strata of the proposal's CDF
    cdf = torch.cumsum(q, 0)
    u = cdf[t[0, 0:2 * (K // 2):2]]
    assert torch.all(u >= torch.arange(K // 2) / (K // 2))


def test_odd_part_cancels_exactly_within_a_pair():
    """At a fixed t (lt:T), a pair's mean is (1 - A s)^2 ||eps||^2 + ||c||^2: no eps.c term at all."""
    T = 20
    s = linear_schedule(T=T)
    net = LinearEps(T)
    x0 = _images(2)
    ti = 7
    m = Measurement("lt", ti)
    est = measurement_values(net, s, x0, m, 6, seed=4, options=DrawOptions("antithetic"))
    plan = draw_plan(s, x0, m, 6, seed=4, indices=[0, 1], options=DrawOptions("antithetic"))
    sd = float((1 - s.alpha_bars[ti]).sqrt())
    c = A * float(s.alpha_bars[ti].sqrt()) * x0 + s.alphas.new_tensor(float(net.bt[ti]))
    e2 = plan.target.pow(2).flatten(1).sum(1).view(2, 6)
    exact = (1 - A * sd) ** 2 * e2.mean(1) + c.pow(2).flatten(1).sum(1)
    torch.testing.assert_close(est, exact, rtol=1e-12, atol=1e-12)
    iid = measurement_values(net, s, x0, m, 6, seed=4)  # the plain draws keep the cross term
    plan_iid = draw_plan(s, x0, m, 6, seed=4, indices=[0, 1])
    e2_iid = plan_iid.target.pow(2).flatten(1).sum(1).view(2, 6)
    assert (iid - ((1 - A * sd) ** 2 * e2_iid.mean(1) + c.pow(2).flatten(1).sum(1))).abs().min() > 1e-3


@pytest.mark.parametrize("K,proposal", [(2, PROPOSAL), (8, PROPOSAL), (3, WIDTHS), (5, WIDTHS)])
def test_loss_estimate_is_unbiased(K, proposal):
    """Mean over seeds of the antithetic importance estimate = the exact loss (sum over t of the
    closed form), within 4 standard errors of the mean (with the bin-width proposal, i.e. uniform t,
    the standard error is small enough to see a weight off by one draw)."""
    T = 30
    s = linear_schedule(T=T)
    net = LinearEps(T)
    x0 = _images(2)
    D = 16
    sd = (1 - s.alpha_bars).sqrt()
    c = A * s.alpha_bars.sqrt().view(-1, 1, 1) * x0.flatten(1).unsqueeze(0) + net.bt.view(-1, 1, 1)  # [T, 2, D]
    exact = ((1 - A * sd) ** 2 * D).view(-1, 1) + c.pow(2).sum(-1)  # [T, 2]: E over eps at each t
    exact = exact.mean(0)  # t ~ U{0..T-1}
    opts = DrawOptions("antithetic", proposal=proposal)
    est = torch.stack([measurement_values(net, s, x0, Measurement("loss"), K, seed=k, options=opts)
                       for k in range(600)])
    sem = est.std(0) / est.shape[0] ** 0.5
    assert torch.all((est.mean(0) - exact).abs() < 4 * sem), (est.mean(0), exact, sem)


def test_antithetic_pilot_gives_a_valid_proposal():
    torch.manual_seed(0)
    unet = build_unet("micro", 8, 1).double()
    s = linear_schedule()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    from attribution.gradients import per_example_gradients

    directions = per_example_gradients(unet, s, x[:2], Measurement("loss"), 2, 0)
    plain = bin_score_spread(unet, s, x, directions, 0)
    pairs = bin_score_spread(unet, s, x, directions, 0, antithetic=True)
    assert pairs.shape == plain.shape and torch.all(pairs > 0) and torch.all(torch.isfinite(pairs))
    q = neyman_proposal(pairs)
    assert abs(sum(q) - 1) < 1e-12 and min(q) > 0


def test_cli_offers_every_draw_scheme_and_defaults_to_antithetic():
    from attribution.cli_attribute import DEFAULTS, SCHEMES
    from attribution.measurements import DrawScheme

    assert set(SCHEMES) == {s.value for s in DrawScheme}
    assert DEFAULTS["draw_scheme"] == DrawScheme.ANTITHETIC.value


def test_a_proposal_read_back_from_a_store_is_bit_identical():
    """Regression: the store compares its saved settings exactly; renormalising a normalised
    proposal changed its last bits, and the second round of a store refused to build."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        raw = tuple(float(x) for x in torch.rand(8, generator=g, dtype=torch.float64) + 0.01)
        once = DrawOptions("antithetic", proposal=raw).proposal
        assert abs(sum(once) - 1) < 1e-12
        assert DrawOptions("antithetic", proposal=list(once)).proposal == once
