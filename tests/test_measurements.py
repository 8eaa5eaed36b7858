"""Measurements: parsing, ELBO weights / terms and trajectory density against direct formulas,
common random numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from attribution.ddpm import build_unet, linear_schedule, posterior_mean, q_sample
from attribution.errors import UserError
from attribution.measurements import (
    Measurement,
    decoder_variance,
    draw_plan,
    discretized_gaussian_nll,
    elbo_kl_constants,
    elbo_simple_weights,
    elbo_weights,
    measurement_values,
    parse_measurement,
    prior_kl,
)


class LinearEps(torch.nn.Module):
    """A stand-in network eps(x, t) = a * x + b_t with closed-form measurements."""

    def __init__(self, T):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1).double()
        self.bt = torch.linspace(-0.1, 0.1, T, dtype=torch.float64)

    def forward(self, x, t):
        out = 0.3 * x + self.bt[t].view(-1, 1, 1, 1) + 0 * self.lin.weight.sum()
        return type("O", (), {"sample": out})()


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    unet = build_unet("micro", 8, 1).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    return unet, x


def test_parse_measurement():
    assert parse_measurement("loss") == Measurement("loss")
    assert parse_measurement("LT:500") == Measurement("lt", 500)
    assert parse_measurement("elbo-simple").name == "elbo-simple"
    assert str(parse_measurement("lt:7")) == "lt:7"
    for bad in ["los", "lt:", "lt:x", "lt:-3", "", "lt"]:
        with pytest.raises(UserError):
            parse_measurement(bad)


def test_elbo_weights_match_gaussian_kl():
    """w_t ||eps - eps_theta||^2 == KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)) (Ho et al. eq. 5-8)."""
    s = linear_schedule()
    w = elbo_weights(s)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    eps_pred = eps + 0.3 * torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    for ti in [1, 2, 10, 500, 999]:
        t = torch.full((4,), ti)
        xt = q_sample(s, x0, t, eps)
        ab, abp, be, al = s.alpha_bars[ti], s.alpha_bars[ti - 1], s.betas[ti], s.alphas[ti]
        mu_tilde = abp.sqrt() * be / (1 - ab) * x0 + al.sqrt() * (1 - abp) / (1 - ab) * xt
        var = (1 - abp) / (1 - ab) * be
        q = torch.distributions.Normal(mu_tilde, var.sqrt())
        p = torch.distributions.Normal(posterior_mean(s, xt, t, eps_pred), var.sqrt())
        kl = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
        mine = w[ti] * (eps - eps_pred).pow(2).flatten(1).sum(1)
        torch.testing.assert_close(mine, kl, rtol=1e-8, atol=1e-10)
    assert w[0] == 0


def test_fixed_large_kl_and_official_simple_elbo_weights():
    """elbo-large: w_t ||eps - eps_theta||^2 + const_t == KL(q || N(mu_theta, beta_t)) exactly; the
    official ELBO* weight beta_t / (2 alpha_t (1 - abar_t)) is that KL weight for t >= 1, defined at t = 0."""
    s = linear_schedule()
    w = elbo_weights(s, "large")
    g = torch.Generator().manual_seed(6)
    D = 16
    x0 = torch.rand(4, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    eps_pred = eps + 0.3 * torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    consts = []
    for ti in [1, 2, 10, 500, 999]:
        t = torch.full((4,), ti)
        xt = q_sample(s, x0, t, eps)
        ab, abp, be, al = s.alpha_bars[ti], s.alpha_bars[ti - 1], s.betas[ti], s.alphas[ti]
        mu_tilde = abp.sqrt() * be / (1 - ab) * x0 + al.sqrt() * (1 - abp) / (1 - ab) * xt
        q = torch.distributions.Normal(mu_tilde, ((1 - abp) / (1 - ab) * be).sqrt())
        p = torch.distributions.Normal(posterior_mean(s, xt, t, eps_pred), be.sqrt())
        kl = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
        const = kl - w[ti] * (eps - eps_pred).pow(2).flatten(1).sum(1)
        torch.testing.assert_close(const, const[:1].expand(4), rtol=1e-8, atol=1e-10)  # parameter-free
        consts.append(float(const[0]))
        official = be / (2 * al * (1 - ab))
        torch.testing.assert_close(elbo_simple_weights(s)[ti], official, rtol=1e-12, atol=0)
        torch.testing.assert_close(w[ti], official, rtol=1e-10, atol=0)
    # the summed constant is the sum of these per-step constants (checked on a short schedule)
    s20 = linear_schedule(T=20)
    r = s20.sigma2[1:] / s20.betas[1:]
    assert elbo_kl_constants(s20, "large", D) == pytest.approx(float((0.5 * D * (r - 1 - r.log())).sum()))
    assert elbo_kl_constants(s20, "small", D) == 0.0
    assert elbo_simple_weights(s)[0] == pytest.approx(1 / (2 * float(s.alphas[0])))
    assert all(c > 0 for c in consts)


def test_prior_and_decoder_terms_against_direct_formulas():
    s = linear_schedule()
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    x0[0, 0, 0, 0] = -1.0
    x0[0, 0, 0, 1] = 1.0
    ab = s.alpha_bars[-1]
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(ab.sqrt() * x0, (1 - ab).sqrt()), torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(prior_kl(s, x0), kl.flatten(1).sum(1), rtol=1e-10, atol=1e-12)
    mean = x0 + 0.005 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    var = decoder_variance(s)
    sd = math.sqrt(var)
    xs, ms = x0.numpy(), mean.numpy()
    hi = np.where(xs > 0.999, 1.0, norm.cdf((xs - ms + 1 / 255) / sd))
    lo = np.where(xs < -0.999, 0.0, norm.cdf((xs - ms - 1 / 255) / sd))
    direct = -np.log(hi - lo).reshape(2, -1).sum(1)
    np.testing.assert_allclose(discretized_gaussian_nll(x0, mean, var).numpy(), direct, rtol=1e-8)


def test_elbo_estimates_match_exhaustive_sum_over_t():
    """Importance-weighted MC over t agrees with the exhaustive sum over t (same eps law), for the
    small- and large-variance bounds and the official ELBO* (t = 0 included); i.i.d. and stratified."""
    from attribution.measurements import DrawOptions

    T = 20
    s = linear_schedule(T=T)
    net = LinearEps(T)
    x0 = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    g = torch.Generator().manual_seed(4)
    E = 4000
    exact = {"elbo": prior_kl(s, x0).clone(), "elbo-large": prior_kl(s, x0) + elbo_kl_constants(s, "large", 16)}
    simple = torch.zeros(2, dtype=torch.float64)
    w = {"elbo": elbo_weights(s), "elbo-large": elbo_weights(s, "large")}
    ws = elbo_simple_weights(s)
    for ti in range(T):
        eps = torch.randn(E, 2, 1, 4, 4, generator=g, dtype=torch.float64).flatten(0, 1)
        t = torch.full((E * 2,), ti)
        x0r = x0.repeat(E, 1, 1, 1)
        xt = q_sample(s, x0r, t, eps)
        pred = net(xt, t).sample
        mse = (eps - pred).pow(2).flatten(1).sum(1)
        simple += (ws[ti] * mse).view(E, 2).mean(0)
        for k in exact:
            if ti == 0:
                term = discretized_gaussian_nll(x0r, posterior_mean(s, xt, t, pred), decoder_variance(s))
            else:
                term = w[k][ti] * mse
            exact[k] += term.view(E, 2).mean(0)
    for scheme in ("iid", "stratified"):
        opts = DrawOptions(scheme=scheme)
        for k in exact:
            est = measurement_values(net, s, x0, Measurement(k), 20000, seed=0, options=opts)
            torch.testing.assert_close(est, exact[k], rtol=0.03, atol=0)
        est_s = measurement_values(net, s, x0, Measurement("elbo-simple"), 20000, seed=0, options=opts)
        torch.testing.assert_close(est_s, simple, rtol=0.03, atol=0)
    assert (exact["elbo-large"] - exact["elbo"]).abs().min() > 1.0  # the variance choice matters


def test_trajectory_density_against_direct_formula():
    s = linear_schedule(T=12)
    net = LinearEps(12)
    g = torch.Generator().manual_seed(5)
    traj = torch.randn(13, 2, 1, 4, 4, generator=g, dtype=torch.float64)
    x0 = traj[-1]
    direct = torch.zeros(2, dtype=torch.float64)
    direct -= torch.distributions.Normal(0.0, 1.0).log_prob(traj[0]).flatten(1).sum(1)
    for step in range(12):
        ti = 12 - 1 - step
        t = torch.full((2,), ti)
        mu = posterior_mean(s, traj[step], t, net(traj[step], t).sample)
        var = s.sigma2[ti] if ti > 0 else s.sigma2[1]  # last step: clipped variance (documented)
        direct -= torch.distributions.Normal(mu, var.sqrt()).log_prob(traj[step + 1]).flatten(1).sum(1)
    exact = measurement_values(net, s, x0, Measurement("trajectory"), 12, seed=0, trajectory=traj)
    torch.testing.assert_close(exact, direct, rtol=1e-10, atol=1e-8)
    # a random batch of transitions is unbiased: the mean over seeds approaches the full sum
    mc = torch.stack([measurement_values(net, s, x0, Measurement("trajectory"), 4, seed=k, trajectory=traj)
                      for k in range(300)]).mean(0)
    torch.testing.assert_close(mc, direct, rtol=0.05, atol=0)
    with pytest.raises(UserError, match="trajector"):
        measurement_values(net, s, x0, Measurement("trajectory"), 4, seed=0)


def test_common_random_numbers_and_batch_invariance(small):
    unet, x = small
    s = linear_schedule()
    for m in [Measurement("loss"), Measurement("elbo"), Measurement("square-norm")]:
        a = measurement_values(unet, s, x, m, 8, seed=7, batch_size=256)
        b = measurement_values(unet, s, x, m, 8, seed=7, batch_size=3)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        # the draws of example i depend on (seed, i) only: a slice with its offset agrees
        c = measurement_values(unet, s, x[1:], m, 8, seed=7, offset=1)
        torch.testing.assert_close(a[1:], c, rtol=1e-12, atol=1e-12)
        d = measurement_values(unet, s, x, m, 8, seed=8)
        assert (a - d).abs().max() > 1e-6
    # the draws take no model argument and do not depend on the group an example is drawn in
    full = draw_plan(s, x, Measurement("loss"), 4, seed=3, indices=[0, 1, 2])
    one = draw_plan(s, x, Measurement("loss"), 4, seed=3, indices=[2])
    assert torch.equal(full.t[8:], one.t) and torch.equal(full.target[8:], one.target)
    # two different models see the same draws: their loss difference is much less noisy across
    # seeds with common random numbers than with independent draws
    other = build_unet("micro", 8, 1, seed=1).double()
    crn = torch.stack([measurement_values(unet, s, x, Measurement("loss"), 2, seed=k)
                       - measurement_values(other, s, x, Measurement("loss"), 2, seed=k) for k in range(6)])
    ind = torch.stack([measurement_values(unet, s, x, Measurement("loss"), 2, seed=k)
                       - measurement_values(other, s, x, Measurement("loss"), 2, seed=100 + k) for k in range(6)])
    assert crn.std(0).mean() < 0.5 * ind.std(0).mean()


def test_lt_and_bad_inputs(small):
    unet, x = small
    s = linear_schedule()
    with pytest.raises(UserError, match="0..999"):
        measurement_values(unet, s, x, Measurement("lt", 1000), 2, seed=0)
    with pytest.raises(UserError):
        measurement_values(unet, s, x, Measurement("loss"), 0, seed=0)
    with pytest.raises(UserError):
        measurement_values(unet, s, x[:, :, :, :].repeat(1, 3, 1, 1), Measurement("loss"), 2, seed=0)
    v = measurement_values(unet, s, x, Measurement("lt", 999), 64, seed=0)
    # at t = T-1 x_t is nearly pure noise and the untrained net predicts ~0: loss ~ D = 64
    assert torch.all((v > 30) & (v < 130))
