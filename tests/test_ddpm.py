"""DDPM schedule, forward process, ancestral step and sampling against closed forms."""

import math

import numpy as np
import pytest
import torch

from attribution.ddpm import (
    PRESETS,
    ancestral_step,
    build_unet,
    linear_schedule,
    posterior_mean,
    q_sample,
    sample,
)
from attribution.errors import UserError


def test_linear_schedule_matches_closed_form():
    s = linear_schedule()
    assert s.T == 1000
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    # beta_t = 1e-4 + (t / 999) * (0.02 - 1e-4), t 0-indexed
    t = 500
    assert s.betas[t].item() == pytest.approx(1e-4 + t / 999 * (0.02 - 1e-4), rel=1e-12)
    abar = np.prod([1 - (1e-4 + k / 999 * (0.02 - 1e-4)) for k in range(t + 1)])
    assert s.alpha_bars[t].item() == pytest.approx(abar, rel=1e-10)
    # the "small" variance at t=0 is 0 and equals beta_t (1-abar_{t-1})/(1-abar_t) elsewhere
    assert s.sigma2[0].item() == 0.0
    expected = (1 - s.alpha_bars[t - 1]) / (1 - s.alpha_bars[t]) * s.betas[t]
    assert s.sigma2[t].item() == pytest.approx(expected.item(), rel=1e-12)
    assert s.alpha_bars[-1].item() < 1e-4  # x_T is nearly pure noise


def test_q_sample_moments():
    s = linear_schedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    for t in (0, 250, 999):
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        xt = q_sample(s, x0, torch.full((x0.shape[0],), t), eps)
        abar = s.alpha_bars[t].item()
        # mean sqrt(abar) x0, variance 1 - abar; 200k draws -> SE of the mean ~ 0.0023
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - abar, rel=0.02, abs=1e-6)


def test_ancestral_step_matches_formula():
    s = linear_schedule()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = 400
    beta, alpha, abar = s.betas[t].item(), s.alphas[t].item(), s.alpha_bars[t].item()
    sigma = math.sqrt((1 - s.alpha_bars[t - 1].item()) / (1 - abar) * beta)
    expected = (x - beta / math.sqrt(1 - abar) * eps) / math.sqrt(alpha) + sigma * z
    got = ancestral_step(s, x, torch.full((3,), t), eps, z)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the last step adds no noise
    got0 = ancestral_step(s, x, torch.zeros(3, dtype=torch.long), eps, z)
    torch.testing.assert_close(got0, posterior_mean(s, x, torch.zeros(3, dtype=torch.long), eps))


def test_sampling_is_reproducible_and_keeps_trajectory():
    unet = build_unet("micro", 8, 1, seed=0)
    s = linear_schedule(T=50)
    a = sample(unet, s, 3, torch.Generator().manual_seed(7), return_trajectory=True, batch_size=2)
    b = sample(unet, s, 3, torch.Generator().manual_seed(7), return_trajectory=True, batch_size=2)
    c = sample(unet, s, 3, torch.Generator().manual_seed(8))
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert a.trajectory.shape == (51, 3, 1, 8, 8)
    torch.testing.assert_close(a.images, a.trajectory[-1].clamp(-1, 1))
    assert not torch.allclose(a.images, c.images)
    assert c.trajectory is None


def test_presets_and_bad_input():
    assert {"tiny", "small", "ho-cifar10"} <= set(PRESETS)
    with pytest.raises(UserError, match="unknown model preset"):
        build_unet("huge", 16, 1)
    with pytest.raises(UserError, match="1 or 3 channels"):
        build_unet("tiny", 16, 4)
    with pytest.raises(UserError, match="divisible"):
        build_unet("tiny", 15, 1)


@pytest.mark.slow
def test_ho_cifar10_preset_has_paper_size():
    n = sum(p.numel() for p in build_unet("ho-cifar10", 32, 3).parameters())
    assert 35.0e6 < n < 36.5e6  # Ho et al.: 35.7M parameters
