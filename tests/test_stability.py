"""The split-half reliability estimator against synthetic scores whose noise is known."""

from __future__ import annotations

import torch

from attribution.stability import (agreement, expected_overlap, moderated_se, rank_interval, reliability,
                                   rowwise_spearman, spearman_brown, top_overlap)


def _synthetic_run(truth: Tensor, sigma: Tensor, g: torch.Generator):
    """One run with two independent halves: each half has noise sigma * sqrt(2), the full mean sigma."""
    a = truth + sigma * 2**0.5 * torch.randn(truth.shape, generator=g, dtype=torch.float64)
    b = truth + sigma * 2**0.5 * torch.randn(truth.shape, generator=g, dtype=torch.float64)
    return a, b, (a + b) / 2


Tensor = torch.Tensor


def test_split_half_predicts_the_agreement_of_two_independent_runs():
    torch.manual_seed(0)  # StudentT samples from the global generator
    g = torch.Generator().manual_seed(0)
    Q, N, k = 24, 1000, 16
    for noise in (0.3, 1.0):  # a reliable and an unreliable regime
        truth = torch.distributions.StudentT(3.0).sample((Q, N)).double()  # heavy tails, like influence scores
        sigma = noise * (0.5 + torch.rand(Q, N, generator=g, dtype=torch.float64))  # heteroscedastic
        a1, b1, full1 = _synthetic_run(truth, sigma, g)
        _, _, full2 = _synthetic_run(truth, sigma, g)
        actual = agreement(full1, full2, k)
        rel = reliability(a1, b1, full1, k)
        predicted_rho = sum(r.stability for r in rel) / Q
        predicted_pos = sum(r.expected_top_pos for r in rel) / Q
        predicted_neg = sum(r.expected_top_neg for r in rel) / Q
        # measured over 6 seeds: |error| <= 0.005 (reliable) and 0.014..0.044 (unreliable regime)
        assert abs(predicted_rho - actual["spearman"]) < 0.05, (noise, predicted_rho, actual)
        # measured over 6 seeds: |error| <= 1.2 of 16 (includes the spread of the single actual pair)
        assert abs(predicted_pos - actual["top_pos"]) < 1.5, (noise, predicted_pos, actual)
        assert abs(predicted_neg - actual["top_neg"]) < 1.5, (noise, predicted_neg, actual)
        # per-image standard errors: right scale, and they track the true heteroscedastic noise
        se = moderated_se(a1, b1)
        assert abs(float((se.pow(2).mean() / sigma.pow(2).mean()).sqrt()) - 1) < 0.05
        assert float(rowwise_spearman(se, sigma).mean()) > 0.2


def test_spearman_brown_and_overlaps():
    assert float(spearman_brown(torch.tensor(0.5, dtype=torch.float64))) == 2 * 0.5 / 1.5
    assert float(spearman_brown(torch.tensor(1.0))) == 1.0
    a = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    b = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0]])
    assert top_overlap(a, b, 2).tolist() == [1.0]
    assert top_overlap(a, b, 2, largest=False).tolist() == [1.0]
    same = agreement(a, a, 2)
    assert abs(same["spearman"] - 1) < 1e-12 and same["top_pos"] == 2.0 and same["top_neg"] == 2.0
    # with no noise, the expected overlap is the full k
    pos, neg = expected_overlap(a.double(), torch.zeros(1, 5, dtype=torch.float64), 2)
    assert pos.tolist() == [2.0] and neg.tolist() == [2.0]


def test_rank_interval():
    row = torch.tensor([10.0, 9.0, 8.0, 1.0, 0.0])
    assert rank_interval(row, torch.zeros(5), 1) == (2, 2)
    lo, hi = rank_interval(row, torch.full((5,), 0.7), 1)  # +-1.15: can pass #1 or fall to #3
    assert (lo, hi) == (1, 3)
