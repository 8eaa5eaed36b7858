"""Linear Data-modelling Score and related diagnostics, from score matrices and ground truth.

Everything here is pure tensor math (no training), fast enough to recompute interactively.

Conventions (method.md §2, §7):
- ``scores``: ``[Q, N]`` tensor, ``tau[q, j] > 0`` means removing training example ``j`` is
  predicted to INCREASE query ``q``'s measurement.
- ``masks``: ``[M, N]`` bool, ``True`` where subset ``S_m`` KEEPS the example.
- The prediction for subset ``S_m`` is the sum of tau over the examples REMOVED from it:
  ``pred[q, m] = sum_{j not in S_m} tau[q, j]`` (the 1/N factor of the influence formula does
  not change ranks; :func:`predicted_vs_actual` applies it).
- ``values``: ``[R, M, Q]`` measurements of the R retrained seeds of each subset model.
- dattri's ``metric.lds`` sums scores over the examples KEPT and expects "helpfulness" scores;
  ``lds(tau, ...)`` equals ``dattri.metric.lds(-tau.T, (values.mean(0), kept_indices))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from attribution.errors import UserError


@dataclass
class GroundTruth:
    """Retrained-model measurements of one measurement on one query set.

    masks: ``[M, N]`` bool (True = kept); values: ``[R, M, Q]`` float64; base: ``[Q]`` float64,
    the measurement of the model trained on all the data (same Monte-Carlo draws), or None.
    """

    measurement: str
    masks: Tensor
    values: Tensor
    base: Optional[Tensor] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.masks.dim() != 2 or self.values.dim() != 3 or self.values.shape[1] != self.masks.shape[0]:
            raise UserError(
                f"ground truth shapes disagree: masks {tuple(self.masks.shape)}, values {tuple(self.values.shape)}"
            )
        self.masks = self.masks.bool()
        self.values = self.values.double()
        if self.base is not None:
            self.base = self.base.double()

    @property
    def num_subsets(self) -> int:
        return int(self.masks.shape[0])

    @property
    def num_train(self) -> int:
        return int(self.masks.shape[1])

    @property
    def num_seeds(self) -> int:
        return int(self.values.shape[0])

    @property
    def num_queries(self) -> int:
        return int(self.values.shape[2])

    def target(self) -> Tensor:
        """Seed-averaged measurement per query and subset: ``[Q, M]``."""
        return self.values.mean(dim=0).T.contiguous()


@dataclass
class LDSResult:
    per_query: Tensor  # [Q] Spearman correlation per query (NaN where undefined)
    mean: float
    sem: float  # standard error of the mean over queries
    num_valid: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "sem": self.sem, "num_valid": self.num_valid,
                "per_query": [None if math.isnan(v) else float(v) for v in self.per_query.tolist()]}


# ----------------------------------------------------------------------------- subsets


def draw_subset_masks(num_train: int, num_subsets: int, alpha: float = 0.5, seed: int = 0) -> Tensor:
    """``[M, N]`` bool masks, each keeping ``round(alpha N)`` examples drawn without replacement.

    Subset ``m`` depends only on ``(seed, m)``, so a job can be extended with more subsets.
    """
    if not 0.0 < alpha < 1.0:
        raise UserError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    if num_subsets < 1:
        raise UserError(f"the number of subsets must be positive, got {num_subsets}")
    keep = int(round(alpha * num_train))
    if keep < 1 or keep >= num_train:
        raise UserError(f"alpha={alpha} keeps {keep} of {num_train} examples; choose another alpha")
    masks = torch.zeros(num_subsets, num_train, dtype=torch.bool)
    for m in range(num_subsets):
        gen = torch.Generator().manual_seed(1_000_003 * seed + m)
        masks[m, torch.randperm(num_train, generator=gen)[:keep]] = True
    return masks


# ----------------------------------------------------------------------------- core


def _check_scores(scores: Tensor, num_train: int) -> Tensor:
    if scores.dim() != 2 or scores.shape[1] != num_train:
        raise UserError(f"scores must be [num_queries, {num_train}], got {tuple(scores.shape)}")
    scores = scores.detach().double().cpu()
    if not torch.isfinite(scores).all():
        raise UserError("scores contain NaN or inf; recompute them (a larger damping may help)")
    return scores


def subset_predictions(scores: Tensor, masks: Tensor) -> Tensor:
    """``[Q, M]``: the sum of tau over the examples removed from each subset."""
    scores = _check_scores(scores, masks.shape[1])
    return scores @ (~masks.bool()).double().T


def rowwise_spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` (``[Q, M]`` each): ``[Q]``.

    Ties get average ranks (as scipy.stats.spearmanr); rows that are constant give NaN.
    """
    from scipy.stats import rankdata

    if a.shape != b.shape or a.dim() != 2:
        raise UserError(f"cannot correlate shapes {tuple(a.shape)} and {tuple(b.shape)}")
    ra = torch.from_numpy(rankdata(a.double().numpy(), axis=1))
    rb = torch.from_numpy(rankdata(b.double().numpy(), axis=1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = ra.norm(dim=1) * rb.norm(dim=1)
    out = (ra * rb).sum(dim=1) / denom
    return torch.where(denom > 0, out, torch.full_like(out, float("nan")))


def summarize(per_query: Tensor) -> LDSResult:
    """Mean over queries (NaN ignored) with its standard error."""
    valid = per_query[~torch.isnan(per_query)]
    n = int(valid.numel())
    mean = float(valid.mean()) if n else float("nan")
    sem = float(valid.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return LDSResult(per_query=per_query, mean=mean, sem=sem, num_valid=n)


def lds(scores: Tensor, gt: GroundTruth) -> LDSResult:
    """Spearman LDS of ``scores`` ``[Q, N]`` against the seed-averaged ground truth."""
    if scores.shape[0] != gt.num_queries:
        raise UserError(f"scores have {scores.shape[0]} queries but the ground truth has {gt.num_queries}")
    return summarize(rowwise_spearman(subset_predictions(scores, gt.masks), gt.target()))


def exact_retraining_lds(gt: GroundTruth) -> LDSResult:
    """The retraining "oracle": each seed's measurements against the mean of the other seeds.

    Per query, the correlations are averaged over the R choices of held-out seed. Needs R >= 2.
    """
    R = gt.num_seeds
    if R < 2:
        raise UserError("the exact-retraining reference needs at least 2 seeds per subset")
    per_seed = []
    for r in range(R):
        others = torch.cat([gt.values[:r], gt.values[r + 1:]]).mean(dim=0)  # [M, Q]
        per_seed.append(rowwise_spearman(gt.values[r].T, others.T))
    return summarize(torch.stack(per_seed).nanmean(dim=0))


# ----------------------------------------------------------------------------- sweeps and diagnostics


def damping_sweep(
    score_fn: Callable[[float], Tensor], dampings: Iterable[float], gt: GroundTruth
) -> tuple[list[dict], dict]:
    """LDS for each damping: ``score_fn(damping) -> [Q, N]``.

    Returns ``(rows, best)`` with rows ``{"damping", "mean", "sem", "per_query"}``; a damping whose
    scores fail (NaN / inf / an error) is reported with ``"error"`` and skipped for ``best``.
    """
    rows = []
    for d in dampings:
        try:
            res = lds(score_fn(float(d)), gt)
            rows.append({"damping": float(d), **res.as_dict()})
        except (UserError, RuntimeError, np.linalg.LinAlgError) as exc:
            rows.append({"damping": float(d), "mean": float("nan"), "sem": float("nan"), "error": str(exc)})
    finite = [r for r in rows if not math.isnan(r["mean"])]
    if not finite:
        raise UserError("no damping value gave usable scores")
    return rows, max(finite, key=lambda r: r["mean"])


def cross_lds(scores_by_proxy: dict[str, Tensor], truth_by_target: dict[str, GroundTruth]) -> tuple[list[str], list[str], Tensor]:
    """Mean LDS of each attributed proxy (rows) against each true measurement (columns).

    For per-timestep losses this is the paper's Fig. 11 (observation 1): attribute l_t', evaluate
    on l_t. Returns ``(row_names, col_names, matrix [rows, cols])``.
    """
    rows, cols = list(scores_by_proxy), list(truth_by_target)
    mat = torch.full((len(rows), len(cols)), float("nan"), dtype=torch.float64)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            mat[i, j] = lds(scores_by_proxy[r], truth_by_target[c]).mean
    return rows, cols, mat


def predicted_vs_actual(scores: Tensor, gt: GroundTruth) -> dict:
    """Predicted and actual measurement changes per (query, subset) (observation 2).

    predicted ``[Q, M]`` = (1/N) sum of tau over the removed examples (method.md §2);
    actual ``[Q, M]`` = seed-averaged retrained measurement minus the full-data model's.
    """
    if gt.base is None:
        raise UserError("this ground truth has no full-data measurement; re-run the LDS job's measure stage")
    pred = subset_predictions(scores, gt.masks) / gt.num_train
    actual = gt.target() - gt.base[:, None]
    return {
        "predicted": pred,
        "actual": actual,
        "fraction_predicted_increase": float((pred > 0).double().mean()),
        "fraction_actual_increase": float((actual > 0).double().mean()),
    }


def model_correlation(gt: GroundTruth) -> dict:
    """Pearson correlation across queries between every pair of models (observation 3).

    Models: the full-data model (first, when present) and every retrained (seed, subset) model.
    Returns ``{"labels", "matrix" [K, K], "min_offdiag", "mean_offdiag"}``.
    """
    vals = [gt.values[r, m] for r in range(gt.num_seeds) for m in range(gt.num_subsets)]
    labels = [f"subset {m} seed {r}" for r in range(gt.num_seeds) for m in range(gt.num_subsets)]
    if gt.base is not None:
        vals, labels = [gt.base] + vals, ["full data"] + labels
    x = torch.stack(vals)  # [K, Q]
    if x.shape[1] < 2:
        raise UserError("the model-vs-model correlation needs at least 2 queries")
    corr = torch.corrcoef(x)
    off = corr[~torch.eye(len(vals), dtype=torch.bool)]
    return {"labels": labels, "matrix": corr, "min_offdiag": float(off.min()), "mean_offdiag": float(off.mean())}


def top_k_removal(scores: Tensor, k: int) -> Tensor:
    """``[Q, k]`` indices of the k largest scores per query (the strongest proponents)."""
    if not 0 < k < scores.shape[1]:
        raise UserError(f"k must lie in 1..{scores.shape[1] - 1}, got {k}")
    return torch.topk(scores.double(), k, dim=1).indices


def random_removal(num_train: int, k: int, num_queries: int, seed: int = 0) -> Tensor:
    """``[Q, k]`` random training indices per query (the counterfactual control)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_train, generator=gen)[:k] for _ in range(num_queries)])


def keep_indices(masks: Tensor) -> list[Sequence[int]]:
    """Kept indices of each subset (dattri's ground-truth format)."""
    return [torch.nonzero(m).flatten().tolist() for m in masks.bool()]
