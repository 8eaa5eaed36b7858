"""TRAK and D-TRAK baselines (method.md §6); CLIP and pixel cosine are in :mod:`attribution.similarity`.

Every public scorer returns ``scores: Tensor  # [Q, N]`` float32 for Q query images against the N
training examples of ``run.dataset()``, in dataset order.

Features are randomly projected per-example gradients, ``phi_n = S g_n`` (``S``: seeded
``k x P`` projection, :mod:`attribution.projection`), float32 throughout (float16 features
degrade diffusion TRAK badly, paper Fig. 20); how they are computed and cached is
:mod:`attribution.trak_features`. With ``Phi = [phi_1 ... phi_N]^T`` (``[N, k]``) the score of
training example n for query q is

    tau(q, n) = phi_q^T (Phi^T Phi / N + lambda I)^{-1} phi_n                         (1)

i.e. method.md §2's ``grad m^T (H + lambda I)^{-1} grad l_n`` with H the projected empirical
GGN of the MEAN training loss and lambda in the paper's normalisation (paper App. G.4), so the
scores share the units of the K-FAC influence scores (predicted change = (1/N) sum tau).

Damping conversion: MadryLab's TRAK code (and the D-TRAK paper's reported values) add lambda to
the UNnormalised Gram matrix, ``phi_q^T (Phi^T Phi + lambda_trak I)^{-1} phi_n``. Since
``(Phi^T Phi / N + lambda I)^{-1} = N (Phi^T Phi + N lambda I)^{-1}``,

    lambda_trak = N * lambda,     tau = N * score_trak(lambda_trak)                   (2)

(:func:`trak_code_damping`). Rankings, and hence LDS, depend only on lambda, not on the factor N.

- ``variant="trak"``: g_n = gradient of the training loss l(theta, x_n) (method.md §1), for
  training examples and queries alike (the K-FAC paper's TRAK baseline). Its training gradients
  are the rows of K-FAC's gradient store, same draws and budget (``train_draws``, importance-
  sampled timesteps), and its query gradients are K-FAC's (``query_draws``).
- ``variant="dtrak"``: D-TRAK (Zheng et al. 2024) replaces both the training loss and the
  measurement by the square norm ``mean(eps_theta(x_t, t)^2)`` and averages over K uniformly
  spaced timesteps ``0, T/K, 2T/K, ...`` (0-indexed, as D-TRAK's ``range(0, T, T // K)``), with
  ``draws / K`` noise draws per timestep (D-TRAK: one).

Budgets (issue 15: methods compare at equal Monte-Carlo budgets): both variants default to
K-FAC's ``DEFAULT_TRAIN_DRAWS`` training and ``DEFAULT_QUERY_DRAWS`` query draws per example,
each in two independent halves, which give every gallery a split-half reliability
(:mod:`attribution.stability`; it covers the draws, not the projection, whose noise the default
``proj_dim`` keeps small: bench/results/stability_*.md).

Parameters: :func:`attribution.gradients.kfac_parameters` (Linear / Conv2d weights and biases;
99.3% of the tiny U-Net's parameters, all but GroupNorm's scales and shifts), the same as K-FAC's,
so differences between TRAK and K-FAC influence are due to the curvature alone.

Default damping: TRAK/D-TRAK have no robust default (the paper tunes lambda per benchmark and
they fail when it is too small). With ``damping=None`` we use ``lambda = relative_damping *
mean non-zero eigenvalue of Phi^T Phi / N`` (= ``trace / min(N, k)``), which adapts to the
gradient scale of each variant and model. ``DEFAULT_RELATIVE_DAMPING`` holds each variant's
``relative_damping``, chosen by LDS at the default draws on both shipped runs
(bench/results/trak_damping_*.md): TRAK 1 (best mean LDS over the two runs, and seed-to-seed
Spearman 0.90 -> 0.94-0.97 against 0.1), D-TRAK 0.1.

Draw keys (:func:`attribution.measurements.example_generator`): training example n draws from key
n; query i of a query set from key ``QUERY_INDEX_OFFSET + i`` (its GLOBAL index in the set, as
:data:`attribution.influence.QUERY_OFFSET`), so a query never shares (t, eps) draws with a
training example and its score does not depend on which other queries are scored with it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from attribution.errors import UserError
from attribution.influence_settings import (
    DEFAULT_DRAW_SCHEME,
    DEFAULT_PREVIEW_DRAWS,
    DEFAULT_QUERY_DRAWS,
    DEFAULT_TRAIN_DRAWS,
    InfluenceSettings,
)
from attribution.measurements import DrawOptions, Measurement
from attribution.projection import PROJECTION_KINDS
from attribution.runs import Run, load_tensors, save_tensors
from attribution.similarity import check_query_images
from attribution.store import round_schedule
from attribution.trak_features import (  # noqa: F401 - public names of this module
    TrainFeatures,
    featurize,
    projector_for,
    query_feature_halves,
    query_gradient_halves,
    train_features,
)

Progress = Optional[Callable[[int, int, str], None]]

TRAK_VARIANTS = ("trak", "dtrak")
# The paper's k. Measured on the demo run (same draws, two projection seeds: JL noise alone), the
# Spearman of two projections is 0.74 / 0.92 / 0.96 / 0.98 at k = 2048 / 8192 / 16384 / 32768
# (bench/results/stability_demo.md). SJLT costs O(P) per row at any k; scoring O(N^2 k).
DEFAULT_PROJ_DIM = 32768
DEFAULT_NUM_TIMESTEPS = 32  # D-TRAK's K (the paper: 10 or 100); K must divide the rounds of draws
DEFAULT_RELATIVE_DAMPING = {"trak": 1.0, "dtrak": 0.1}  # per variant: bench/bench_trak_damping.py
DEFAULT_NUM_DRAWS = DEFAULT_TRAIN_DRAWS  # legacy name: the training draws per example
QUERY_INDEX_OFFSET = 1_000_000_000  # = attribution.influence.QUERY_OFFSET: TRAK's queries draw as K-FAC's


@dataclass(frozen=True)
class TrakSettings:
    """Everything that determines TRAK / D-TRAK features (saved in the cache keys).

    ``train_draws`` / ``query_draws``: (t, eps) draws per training / query gradient, each in two
    halves (K-FAC's defaults). TRAK's training draws are K-FAC's store rounds
    (``round_schedule(train_draws, preview_draws)``, ``draw_scheme``); D-TRAK's rounds hold
    multiples of its ``num_timesteps`` K fixed timesteps (K, K, 2K, 2K, ...), so ``train_draws``
    and ``query_draws`` must be multiples of 2K.
    """

    variant: str = "trak"
    proj_dim: int = DEFAULT_PROJ_DIM
    projection: str = "sjlt"
    train_draws: int = DEFAULT_TRAIN_DRAWS
    query_draws: int = DEFAULT_QUERY_DRAWS
    num_timesteps: int = DEFAULT_NUM_TIMESTEPS  # dtrak only
    seed: int = 0
    draw_scheme: str = DEFAULT_DRAW_SCHEME  # trak only (D-TRAK's timesteps are fixed)
    preview_draws: int = DEFAULT_PREVIEW_DRAWS  # trak only: draws of the store's first round

    def __post_init__(self):
        if self.variant not in TRAK_VARIANTS:
            raise UserError(f"unknown TRAK variant {self.variant!r}; choose trak or dtrak")
        if self.projection not in PROJECTION_KINDS:
            raise UserError(f"unknown projection {self.projection!r}; choose one of {', '.join(PROJECTION_KINDS)}")
        if self.proj_dim < 1:
            raise UserError(f"proj_dim must be positive, got {self.proj_dim}")
        if self.query_draws < 2 or self.query_draws % 2:
            raise UserError(f"query_draws must be even and >= 2 (two independent halves), got {self.query_draws}")
        if self.variant == "dtrak":
            K = self.num_timesteps
            if K < 1:
                raise UserError(f"num_timesteps must be positive, got {K}")
            for name, n in (("train_draws", self.train_draws), ("query_draws", self.query_draws)):
                if n < 2 * K or n % (2 * K):
                    raise UserError(f"D-TRAK: {name} ({n}) must be a multiple of 2 x num_timesteps "
                                    f"({2 * K}: two halves, each covering the {K} timesteps)")
        else:
            self.influence_settings()  # validates train_draws, preview_draws and draw_scheme
        if self.variant == "dtrak" and any(d % self.num_timesteps for d in self.round_draws):
            raise UserError(f"D-TRAK: rounds {self.round_draws} are not multiples of num_timesteps")

    @property
    def round_draws(self) -> list[int]:
        """Draws of each round of the training store (round r goes to half r % 2)."""
        first = self.num_timesteps if self.variant == "dtrak" else self.preview_draws
        return round_schedule(self.train_draws, first)

    @property
    def rounds(self) -> int:
        return len(self.round_draws)

    @property
    def query_scheme(self) -> str:
        """Draw scheme of the query gradients: K-FAC's for TRAK; D-TRAK's timesteps are fixed."""
        return DrawOptions(scheme=self.draw_scheme).scheme if self.variant == "trak" else "iid"

    def influence_settings(self, store_budget_bytes: Optional[int] = None) -> InfluenceSettings:
        """The K-FAC settings whose gradient store and query gradients TRAK shares."""
        return InfluenceSettings(train_draws=self.train_draws, query_draws=self.query_draws, seed=self.seed,
                                 draw_scheme=self.draw_scheme, preview_draws=self.preview_draws,
                                 store_budget_bytes=store_budget_bytes)

    def measurement(self) -> Measurement:
        return Measurement("square-norm" if self.variant == "dtrak" else "loss")

    def timesteps(self, T: int) -> Optional[list[int]]:
        """D-TRAK's uniformly spaced 0-indexed timesteps ``[K]``; None (random t) for TRAK."""
        return dtrak_timesteps(self.num_timesteps, T) if self.variant == "dtrak" else None

    def cache_args(self, num_params: int, num_train: int) -> dict:
        d = asdict(self)
        d.update(num_params=num_params, num_train=num_train, params="kfac", round_draws=self.round_draws)
        if self.variant == "dtrak":
            d.update(draw_scheme=None, preview_draws=None)
        else:
            d.update(num_timesteps=None)
        return d


def dtrak_timesteps(K: int, T: int) -> list[int]:
    """K uniformly spaced 0-indexed timesteps ``[i * T // K for i < K]`` (D-TRAK's ``range(0, T, T//K)``)."""
    if not 1 <= K <= T:
        raise UserError(f"the number of D-TRAK timesteps must be between 1 and {T}, got {K}")
    return [i * T // K for i in range(K)]


def trak_code_damping(damping: float, num_train: int) -> float:
    """lambda in MadryLab TRAK's convention (added to the unnormalised Gram matrix) = N * lambda."""
    return damping * num_train


def query_keys(num_queries: int, query_indices: Optional[Sequence[int]] = None) -> list[int]:
    """Draw keys ``[Q]`` of the queries: ``QUERY_INDEX_OFFSET + i`` for each global index i.

    ``query_indices``: the queries' indices in their query set; None means ``0..Q-1`` (the images
    are a whole set, or a set of their own).
    """
    idx = list(range(num_queries)) if query_indices is None else [int(i) for i in query_indices]
    if len(idx) != num_queries:
        raise UserError(f"{len(idx)} query indices for {num_queries} query images")
    if any(i < 0 for i in idx):
        raise UserError(f"query indices must be >= 0, got {min(idx)}")
    return [QUERY_INDEX_OFFSET + i for i in idx]


def query_features(run: Run, query_images: Tensor, settings: TrakSettings, *, query_indices=None, unet=None,
                   device=None, progress: Progress = None, grad_fn=None) -> Tensor:
    """Projected query gradients ``[Q, k]``: the mean of the two halves of ``query_draws`` draws
    (same projection and measurement as training; draws keyed by :func:`query_keys`)."""
    check_query_images(run, query_images)
    keys = query_keys(query_images.shape[0], query_indices)
    fa, fb = query_feature_halves(run, query_images, settings, keys, unet=unet, device=device, progress=progress,
                                  grad_fn=grad_fn)
    return (fa + fb) / 2


@dataclass
class GramEigen:
    """Eigendecomposition of the smaller Gram matrix of ``Phi [N, k]`` (float64).

    mode "train": ``Phi Phi^T = U diag(s) U^T`` (U ``[N, r]``), used when N <= k;
    mode "feature": ``Phi^T Phi = V diag(s) V^T`` (V ``[k, r]``), used when k < N.
    """

    mode: str
    eigenvalues: Tensor  # [r] >= 0, of the UNnormalised Gram matrix
    eigenvectors: Tensor  # [N, r] or [k, r]
    num_train: int

    def default_damping(self, relative: float) -> float:
        """relative * mean non-zero eigenvalue of Phi^T Phi / N (= trace / (N min(N, k)))."""
        return relative * float(self.eigenvalues.sum()) / self.num_train / self.eigenvalues.numel()


def gram_eigen(features: Tensor) -> GramEigen:
    """:class:`GramEigen` of ``features`` ``[N, k]`` (eigh in float64)."""
    Phi = features.double()
    N, k = Phi.shape
    if N <= k:
        s, U = torch.linalg.eigh(Phi @ Phi.T)
        mode = "train"
    else:
        s, U = torch.linalg.eigh(Phi.T @ Phi)
        mode = "feature"
    return GramEigen(mode, s.clamp_min(0), U, N)


def scores_from_features(query: Tensor, train: Tensor, damping: float, eig: Optional[GramEigen] = None) -> Tensor:
    """Equation (1): ``phi_q^T (Phi^T Phi / N + damping I)^{-1} phi_n`` -> ``[Q, N]`` float64.

    query ``[Q, k]``, train ``[N, k]``; ``damping`` in the paper's (mean-loss) normalisation.
    Uses the push-through identity ``(A^T A / N + l)^{-1} A^T = A^T (A A^T / N + l)^{-1}`` to
    work in the smaller of the N- and k-dimensional spaces.
    """
    Phi = train.double()
    q = query.double()
    N = Phi.shape[0]
    eig = eig if eig is not None else gram_eigen(train)
    if damping < 0 or not math.isfinite(damping):
        raise UserError(f"damping must be a non-negative number, got {damping}")
    denom = eig.eigenvalues / N + damping
    if float(denom.min()) <= 1e-12 * max(float(denom.max()), 1e-300):
        raise UserError(f"damping {damping:g} is too small: the projected GGN is singular "
                        "(more projected dimensions than training examples); use a positive damping")
    inv = 1.0 / denom
    if eig.mode == "train":  # q Phi^T U diag(inv) U^T
        U = eig.eigenvectors
        out = ((q @ Phi.T) @ U) * inv @ U.T
    else:  # q V diag(inv) V^T Phi^T
        V = eig.eigenvectors
        out = ((q @ V) * inv) @ (V.T @ Phi.T)
    if not torch.isfinite(out).all():
        raise UserError("TRAK scores are not finite; increase the damping")
    return out


def _load_or_build_eigen(path: Path, feats: Tensor) -> GramEigen:
    if path.exists():
        t, meta = load_tensors(path)
        if meta.get("num_train") == feats.shape[0] and t["eigenvectors"].shape[0] in feats.shape:
            return GramEigen(meta["mode"], t["eigenvalues"], t["eigenvectors"], feats.shape[0])
    eig = gram_eigen(feats)
    save_tensors(path, {"eigenvalues": eig.eigenvalues, "eigenvectors": eig.eigenvectors},
                 {"mode": eig.mode, "num_train": eig.num_train})
    return eig


@dataclass
class TrakResult:
    scores: Tensor  # [Q, N] float32, tau in method.md §2's units
    damping: float  # lambda used, paper (mean-loss) normalisation
    damping_trak_code: float  # the same in MadryLab TRAK's convention (N * lambda)
    settings: TrakSettings
    features_dir: Path
    scores_a: Optional[Tensor] = None  # [Q, N] from half A of the draws (its own Gram matrix), same lambda
    scores_b: Optional[Tensor] = None  # None while the training store has one round
    se: Optional[Tensor] = None  # [Q, N] moderated standard error of each score (draw noise)
    reliability: Optional[list] = None  # per query: attribution.stability.Reliability
    rounds_done: int = 0
    rounds_total: int = 0

    @property
    def preview(self) -> bool:
        return self.rounds_done < self.rounds_total

    def summary(self, q: int = 0) -> dict:
        """JSON-able stability figures of query row ``q`` (as InfluenceResult.summary)."""
        out = {"rounds_done": self.rounds_done, "rounds_total": self.rounds_total, "preview": self.preview,
               "train_draws_done": sum(self.settings.round_draws[:self.rounds_done])}
        if self.reliability is not None:
            out.update(self.reliability[q].as_dict())
        return out


def trak_attribution(
    run: Run,
    query_images: Tensor,
    *,
    variant: str = "trak",
    proj_dim: int = DEFAULT_PROJ_DIM,
    damping: Optional[float] = None,
    relative_damping: Optional[float] = None,
    train_draws: int = DEFAULT_TRAIN_DRAWS,
    query_draws: int = DEFAULT_QUERY_DRAWS,
    num_timesteps: int = DEFAULT_NUM_TIMESTEPS,
    seed: int = 0,
    projection: str = "sjlt",
    draw_scheme: str = DEFAULT_DRAW_SCHEME,
    preview_draws: int = DEFAULT_PREVIEW_DRAWS,
    device=None,
    progress: Progress = None,
    query_indices: Optional[Sequence[int]] = None,
    query_set: Optional[str] = None,
    rounds: Optional[int] = None,
    k: int = 16,
    store_budget_bytes: Optional[int] = None,
) -> TrakResult:
    """TRAK / D-TRAK scores with the damping used and their split-half reliability.

    ``query_indices``: the queries' global indices in their query set (their draw keys,
    :func:`query_keys`); None: ``0..Q-1``. ``query_set``: the name of that sample set; TRAK then
    shares K-FAC's cached query gradients (the images must be those queries). ``rounds``: score
    after this many rounds of the training store (a preview; default all). ``k``: top-k of the
    expected-overlap figures.
    """
    from attribution.ddpm import default_device
    from attribution.stability import moderated_se, reliability

    settings = TrakSettings(variant=variant, proj_dim=proj_dim, projection=projection, train_draws=train_draws,
                            query_draws=query_draws, num_timesteps=num_timesteps, seed=seed,
                            draw_scheme=draw_scheme, preview_draws=preview_draws)
    check_query_images(run, query_images)
    keys = query_keys(query_images.shape[0], query_indices)
    if query_set is not None:
        idx = list(range(query_images.shape[0])) if query_indices is None else [int(i) for i in query_indices]
        stored = run.load_samples(query_set)[0]["images"]
        if max(idx) >= stored.shape[0] or not torch.equal(stored[idx].float(), query_images.float()):
            raise UserError(f"the query images are not queries {idx} of sample set {query_set!r}")
    device = torch.device(device) if device is not None else default_device()
    unet = run.load_unet(device)
    tf = train_features(run, settings, unet=unet, device=device, progress=progress, rounds=rounds,
                        store_budget_bytes=store_budget_bytes)
    qa, qb = query_feature_halves(run, query_images, settings, keys, unet=unet, device=device, progress=progress,
                                  query_set=query_set, query_indices=query_indices)
    if progress is not None:
        progress(0, 1, "scores")
    feats = tf.features
    eig = _load_or_build_eigen(tf.directory / "gram_eigen.safetensors", feats)
    relative = DEFAULT_RELATIVE_DAMPING[variant] if relative_damping is None else relative_damping
    lam = eig.default_damping(relative) if damping is None else float(damping)
    scores = scores_from_features((qa + qb) / 2, feats, lam, eig).float()
    res = TrakResult(scores, lam, trak_code_damping(lam, feats.shape[0]), settings, tf.directory,
                     rounds_done=tf.rounds_done, rounds_total=tf.rounds_total)
    if len(tf.halves) == 2:
        halves = []
        for h, (q, phi) in enumerate(zip((qa, qb), tf.halves)):
            eh = _load_or_build_eigen(tf.directory / f"gram_eigen_half{h}.safetensors", phi)
            halves.append(scores_from_features(q, phi, lam, eh))
        res.scores_a, res.scores_b = halves[0].float(), halves[1].float()
        res.se = moderated_se(halves[0], halves[1]).float()
        res.reliability = reliability(halves[0], halves[1], scores.double(), k)
    if progress is not None:
        progress(1, 1, "scores")
    return res


def trak_scores(run: Run, query_images: Tensor, *, variant: str = "trak", proj_dim: int = DEFAULT_PROJ_DIM,
                damping: Optional[float] = None, progress: Progress = None, **kwargs) -> Tensor:
    """TRAK (``variant="trak"``) or D-TRAK (``"dtrak"``) scores ``[Q, N]`` float32.

    query_images ``[Q, C, H, W]`` in [-1, 1]. ``damping``: lambda in the paper's mean-loss
    normalisation (TRAK code's value / N); None: ``relative_damping`` (default: the variant's
    ``DEFAULT_RELATIVE_DAMPING``) x mean non-zero eigenvalue of the projected GGN. Other keywords as :func:`trak_attribution` (``train_draws``,
    ``query_draws``, ``num_timesteps``, ``seed``, ``query_indices``, ...).
    ``progress(done, total, stage)``.
    """
    return trak_attribution(run, query_images, variant=variant, proj_dim=proj_dim, damping=damping,
                            progress=progress, **kwargs).scores


__all__ = [
    "DEFAULT_NUM_DRAWS", "DEFAULT_NUM_TIMESTEPS", "DEFAULT_PROJ_DIM", "DEFAULT_RELATIVE_DAMPING", "GramEigen",
    "QUERY_INDEX_OFFSET", "TRAK_VARIANTS", "TrakResult", "TrakSettings", "dtrak_timesteps", "featurize",
    "gram_eigen", "query_features", "query_keys", "scores_from_features", "train_features", "trak_attribution",
    "trak_code_damping", "trak_scores",
]
