"""How reliable is a gallery? Agreement of two score matrices, and the same estimated from ONE run.

Influence scores are Monte-Carlo estimates. A run keeps its draws in two independent halves
(A, B: disjoint draw rounds of the training gradients and of the query gradients), so from the
draws themselves, without a second run:

- split-half Spearman r_h between tau_A and tau_B, Spearman-Brown corrected to the full budget,
  r = 2 r_h / (1 + r_h) (applied to the equivalent Pearson correlation, as it is a rank
  correlation): the expected rank correlation of two independent full runs;
- a per-image standard error of tau from d_j = tau_A,j - tau_B,j (Var d_j = 4 Var tau_j for equal
  halves), moderated towards the pooled value (one degree of freedom per image is too noisy to
  show alone; empirical-Bayes shrinkage as in Smyth 2004 with a fixed prior weight);
- the expected top-k overlap of two independent full runs: the OBSERVED overlap of the two halves
  (a pair of independent half-budget runs), moved to the full budget by a parametric bootstrap
  (noisy replicas around the shrunken scores, with the moderated per-image errors) that predicts
  how much the overlap grows from half to full budget; using the model only for that difference
  cancels most of its bias (checked on synthetic heavy-tailed scores in tests/test_stability.py).

Shapes: scores ``[Q, N]`` (queries x training examples), one row per query.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor

PRIOR_DF = 4.0  # weight of the pooled variance in the moderated per-image variance (degrees of freedom)
BOOTSTRAP_REPLICAS = 64


def rowwise_spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation of each row pair ``[Q, N]``: ``[Q]`` float64 (scipy's tie handling)."""
    from attribution.lds import rowwise_spearman as _spearman

    return _spearman(a.double(), b.double())


def top_overlap(a: Tensor, b: Tensor, k: int, largest: bool = True) -> Tensor:
    """Size of the intersection of the top-k (largest or smallest) sets of each row pair: ``[Q]``."""
    ia = torch.topk(a, k, dim=-1, largest=largest).indices
    ib = torch.topk(b, k, dim=-1, largest=largest).indices
    hit = (ia.unsqueeze(-1) == ib.unsqueeze(-2)).any(-1)
    return hit.sum(-1).double()


def agreement(a: Tensor, b: Tensor, k: int = 16) -> dict:
    """Two runs' scores ``[Q, N]``: mean Spearman and mean top-k proponent / opponent overlaps."""
    a, b = a.double(), b.double()
    return {"spearman": float(rowwise_spearman(a, b).mean()),
            "top_pos": float(top_overlap(a, b, k, True).mean()),
            "top_neg": float(top_overlap(a, b, k, False).mean())}


def spearman_brown(r: Tensor, factor: float = 2.0) -> Tensor:
    """Reliability of a ``factor`` times longer estimate from reliability ``r``."""
    return factor * r / (1 + (factor - 1) * r)


def rank_spearman_brown(rho: Tensor, factor: float = 2.0) -> Tensor:
    """Spearman-Brown for a RANK correlation: through the Pearson correlation of the bivariate normal
    with that Spearman (r = 2 sin(pi rho / 6), Pearson 1907) and back."""
    import math

    r = 2 * torch.sin(math.pi * rho / 6)
    return 6 / math.pi * torch.asin(spearman_brown(r, factor).clamp(-1, 1) / 2)


@dataclass
class Reliability:
    """Reliability of one query's gallery, from its two half-scores."""

    split_half_spearman: float  # Spearman(tau_A, tau_B)
    stability: float  # Spearman-Brown corrected: expected Spearman of two independent full runs
    expected_top_pos: float  # expected top-k proponent overlap of two independent full runs (of k)
    expected_top_neg: float
    k: int

    def as_dict(self) -> dict:
        return asdict(self)


def moderated_se(tau_a: Tensor, tau_b: Tensor, prior_df: float = PRIOR_DF) -> Tensor:
    """Per-image standard error of the full estimate (tau_a + tau_b) / 2: ``[Q, N]`` float64.

    Each image's variance from its own split (1 df, d^2 / 4) is shrunk towards the pooled variance
    of its query row with weight ``prior_df``.
    """
    d2 = (tau_a.double() - tau_b.double()).pow(2) / 4  # unbiased for Var((tau_a + tau_b) / 2)
    pooled = d2.mean(-1, keepdim=True)
    return ((prior_df * pooled + d2) / (prior_df + 1)).sqrt()


def _bootstrap_overlap(truth: Tensor, se: Tensor, k: int, replicas: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    pos = torch.zeros(truth.shape[0], dtype=torch.float64)
    neg = torch.zeros_like(pos)
    for _ in range(replicas):
        r1 = truth + se * torch.randn(truth.shape, generator=g, dtype=torch.float64)
        r2 = truth + se * torch.randn(truth.shape, generator=g, dtype=torch.float64)
        pos += top_overlap(r1, r2, k, True)
        neg += top_overlap(r1, r2, k, False)
    return pos / replicas, neg / replicas


def expected_overlap(tau: Tensor, se: Tensor, k: int, replicas: int = BOOTSTRAP_REPLICAS,
                     seed: int = 0, tau_a: Optional[Tensor] = None, tau_b: Optional[Tensor] = None
                     ) -> tuple[Tensor, Tensor]:
    """Expected top-k proponent and opponent overlaps ``([Q], [Q])`` of two independent full runs.

    The bootstrap's true scores shrink tau towards its row mean so that their variance is
    Var(tau) - mean(se^2); replicas are true + se * z. With the halves ``tau_a``, ``tau_b`` the
    result is their observed overlap plus the bootstrap's predicted gain from half (se * sqrt 2)
    to full budget, clipped to [0, k]; without them, the bootstrap's full-budget overlap.
    """
    tau, se = tau.double(), se.double()
    mean = tau.mean(-1, keepdim=True)
    var = tau.var(-1, keepdim=True)
    shrink = ((var - se.pow(2).mean(-1, keepdim=True)).clamp_min(0) / var.clamp_min(1e-300)).sqrt()
    truth = mean + shrink * (tau - mean)
    g = torch.Generator().manual_seed(seed)
    full_pos, full_neg = _bootstrap_overlap(truth, se, k, replicas, g)
    if tau_a is None or tau_b is None:
        return full_pos, full_neg
    half_pos, half_neg = _bootstrap_overlap(truth, se * 2**0.5, k, replicas, g)
    obs_pos = top_overlap(tau_a.double(), tau_b.double(), k, True)
    obs_neg = top_overlap(tau_a.double(), tau_b.double(), k, False)
    return ((obs_pos + full_pos - half_pos).clamp(0, k), (obs_neg + full_neg - half_neg).clamp(0, k))


def reliability(tau_a: Tensor, tau_b: Tensor, tau: Tensor, k: int = 16) -> list[Reliability]:
    """Per query (rows): split-half reliability of the full scores ``tau`` ``[Q, N]`` from its halves."""
    rh = rowwise_spearman(tau_a, tau_b)
    se = moderated_se(tau_a, tau_b)
    k = min(k, tau.shape[1])
    pos, neg = expected_overlap(tau, se, k, tau_a=tau_a, tau_b=tau_b)
    return [Reliability(float(rh[q]), float(rank_spearman_brown(rh[q].clamp_min(0))), float(pos[q]), float(neg[q]), k)
            for q in range(tau.shape[0])]


def rank_interval(tau_row: Tensor, se_row: Tensor, index: int, z: float = 1.645) -> tuple[int, int]:
    """Approximate 90% interval of image ``index``'s rank (1 = most positive) in its query row:
    the ranks it would take with its score moved by +-z standard errors, others held fixed."""
    s = tau_row.double()
    hi = float(s[index] + z * se_row[index])
    lo = float(s[index] - z * se_row[index])
    best = 1 + int((s > hi).sum()) - (1 if float(s[index]) > hi else 0)
    worst = 1 + int((s > lo).sum()) - (1 if float(s[index]) > lo else 0)
    return max(1, best), min(s.numel(), worst)
