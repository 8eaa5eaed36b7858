"""TRAK and D-TRAK baselines (method.md §6); CLIP and pixel cosine are in :mod:`attribution.similarity`.

Every public scorer returns ``scores: Tensor  # [Q, N]`` float32 for Q query images against the N
training examples of ``run.dataset()``, in dataset order.

Features are randomly projected per-example gradients, ``phi_n = S g_n`` (``S``: seeded
``k x P`` projection, :mod:`attribution.projection`), float32 throughout (float16 features
degrade diffusion TRAK badly, paper Fig. 20). With ``Phi = [phi_1 ... phi_N]^T`` (``[N, k]``)
the score of training example n for query q is

    tau(q, n) = phi_q^T (Phi^T Phi / N + lambda I)^{-1} phi_n                         (1)

i.e. method.md §2's ``grad m^T (H + lambda I)^{-1} grad l_n`` with H the projected empirical
GGN of the MEAN training loss and lambda in the paper's normalisation (paper App. G.4), so the
scores share the units of the K-FAC influence scores (predicted change = (1/N) sum tau).

Damping conversion: MadryLab's TRAK code (and the D-TRAK paper's reported values) add lambda to
the UNnormalised Gram matrix, ``phi_q^T (Phi^T Phi + lambda_trak I)^{-1} phi_n``. Since
``(Phi^T Phi / N + lambda I)^{-1} = N (Phi^T Phi + N lambda I)^{-1}``,

    lambda_trak = N * lambda,     tau = N * score_trak(lambda_trak)                   (2)

(:func:`trak_code_damping`). Rankings, and hence LDS, depend only on lambda, not on the factor N.

- ``variant="trak"``: g_n = gradient of the training loss l(theta, x_n) (method.md §1) estimated
  with ``num_draws`` random (t, eps) draws, for training examples and queries alike (the
  K-FAC paper's TRAK baseline; it used 250 draws).
- ``variant="dtrak"``: D-TRAK (Zheng et al. 2024) replaces both the training loss and the
  measurement by the square norm ``mean(eps_theta(x_t, t)^2)`` and averages over K uniformly
  spaced timesteps ``0, T/K, 2T/K, ...`` (0-indexed, as D-TRAK's ``range(0, T, T // K)``), with
  ``num_draws / K`` noise draws per timestep (D-TRAK: one).

Parameters: :func:`attribution.gradients.kfac_parameters` (Linear / Conv2d weights and biases;
99.3% of the tiny U-Net's parameters, all but GroupNorm's scales and shifts). The per-example
gradient engine covers exactly these, and it makes TRAK and K-FAC influence attribute through
the same parameters, so their differences are due to the curvature alone.

Default damping: TRAK/D-TRAK have no robust default (the paper tunes lambda per benchmark and
they fail when it is too small). With ``damping=None`` we use ``lambda = relative_damping *
mean non-zero eigenvalue of Phi^T Phi / N`` (= ``trace / min(N, k)``), which adapts to the
gradient scale of each variant and model; ``DEFAULT_RELATIVE_DAMPING = 0.1`` was not LDS-tuned.

Caching: training features (and the eigendecomposition of their Gram matrix) are stored under
``run.artifact_dir("trak-features", settings)``, keyed by the model fingerprint and every
setting that changes them; a retrained model gets a new folder. Features are written in shards,
so an interrupted featurisation resumes. Training features follow the run's augmentation: for a
run trained with ``--hflip`` each (t, eps) draw flips the image independently (drawn from the
example's own keyed stream, as K-FAC's factors and gradient store do), and the cache key says so.
Queries are generated samples and are never flipped.

Draw keys (:func:`attribution.measurements.example_generator`): training example n draws from key
n; query i of a query set from key ``QUERY_INDEX_OFFSET + i`` (its GLOBAL index in the set, as
:data:`attribution.influence.QUERY_OFFSET`), so a query never shares (t, eps) draws with a
training example and its score does not depend on which other queries are scored with it.
"""

from __future__ import annotations

import math
import numbers
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from attribution.errors import UserError
from attribution.projection import PROJECTION_KINDS, Projector, make_projector
from attribution.runs import Run, load_tensors, save_tensors
from attribution.similarity import check_query_images

Progress = Optional[Callable[[int, int, str], None]]

TRAK_VARIANTS = ("trak", "dtrak")
DEFAULT_PROJ_DIM = 2048
DEFAULT_NUM_DRAWS = 10  # per example; the paper used 250 (GPU)
DEFAULT_NUM_TIMESTEPS = 10  # D-TRAK's K (10 or 100)
DEFAULT_RELATIVE_DAMPING = 0.1
QUERY_INDEX_OFFSET = 1_000_000_000
SHARD_SIZE = 256  # training examples per cached feature shard
GRAD_BUDGET_BYTES = 256 << 20  # per-example gradients held at once (float32)



@dataclass(frozen=True)
class TrakSettings:
    """Everything that determines TRAK / D-TRAK features (saved as the cache key)."""

    variant: str = "trak"
    proj_dim: int = DEFAULT_PROJ_DIM
    projection: str = "sjlt"
    num_draws: Optional[int] = None  # None: DEFAULT_NUM_DRAWS (trak) / num_timesteps (dtrak)
    num_timesteps: int = DEFAULT_NUM_TIMESTEPS  # dtrak only
    seed: int = 0

    def __post_init__(self):
        if self.variant not in TRAK_VARIANTS:
            raise UserError(f"unknown TRAK variant {self.variant!r}; choose trak or dtrak")
        if self.projection not in PROJECTION_KINDS:
            raise UserError(f"unknown projection {self.projection!r}; choose one of {', '.join(PROJECTION_KINDS)}")
        if self.proj_dim < 1:
            raise UserError(f"proj_dim must be positive, got {self.proj_dim}")
        if self.variant == "dtrak" and self.num_timesteps < 1:
            raise UserError(f"num_timesteps must be positive, got {self.num_timesteps}")
        if self.num_draws is not None and self.num_draws < 1:
            raise UserError(f"num_draws must be positive, got {self.num_draws}")
        if self.variant == "dtrak" and self.num_draws is not None and self.num_draws % self.num_timesteps:
            raise UserError(f"D-TRAK: num_draws ({self.num_draws}) must be a multiple of "
                            f"num_timesteps ({self.num_timesteps})")

    @property
    def draws(self) -> int:
        if self.num_draws is not None:
            return self.num_draws
        return self.num_timesteps if self.variant == "dtrak" else DEFAULT_NUM_DRAWS

    def measurement(self):
        from attribution.measurements import Measurement

        return Measurement("square-norm" if self.variant == "dtrak" else "loss")

    def timesteps(self, T: int) -> Optional[list[int]]:
        """D-TRAK's uniformly spaced 0-indexed timesteps ``[K]``; None (random t) for TRAK."""
        return dtrak_timesteps(self.num_timesteps, T) if self.variant == "dtrak" else None

    def cache_args(self, num_params: int, num_train: int) -> dict:
        d = asdict(self)
        d.update(num_draws=self.draws, num_params=num_params, num_train=num_train, params="kfac",
                 num_timesteps=self.num_timesteps if self.variant == "dtrak" else None)
        return d


def dtrak_timesteps(K: int, T: int) -> list[int]:
    """K uniformly spaced 0-indexed timesteps ``[i * T // K for i < K]`` (D-TRAK's ``range(0, T, T//K)``)."""
    if not 1 <= K <= T:
        raise UserError(f"the number of D-TRAK timesteps must be between 1 and {T}, got {K}")
    return [i * T // K for i in range(K)]


def trak_code_damping(damping: float, num_train: int) -> float:
    """lambda in MadryLab TRAK's convention (added to the unnormalised Gram matrix) = N * lambda."""
    return damping * num_train


def _grad_batch(num_params: int) -> int:
    return max(1, min(256, GRAD_BUDGET_BYTES // (4 * max(1, num_params))))


def featurize(
    unet,
    schedule,
    images: Tensor,
    settings: TrakSettings,
    projector: Projector,
    *,
    offset: Union[int, Sequence[int]] = 0,
    grad_fn=None,
    params=None,
    progress: Progress = None,
    stage: str = "gradients",
    done: int = 0,
    total: Optional[int] = None,
    hflip: bool = False,
) -> Tensor:
    """Projected per-example gradients ``[B, k]`` float32 of ``images`` ``[B, C, H, W]``.

    ``grad_fn`` defaults to :func:`attribution.gradients.per_example_gradients`; draws of image b
    are keyed by ``offset + b`` (int ``offset``) or ``offset[b]`` (a sequence of B global keys).
    ``params``: default ``kfac_parameters(unet)`` (a subset only for tests; cached features
    always use the default). ``hflip``: an independent horizontal flip of the image per (t, eps)
    draw, from the same keyed stream (``DrawOptions(hflip=True)``; training images of runs
    trained with flips, never queries).
    """
    from attribution.gradients import kfac_parameters, per_example_gradients

    grad_fn = grad_fn or per_example_gradients
    params = kfac_parameters(unet) if params is None else list(params)
    extra = {}
    if hflip:  # only then: a grad_fn without draw options still serves flip-free features
        from attribution.measurements import DrawOptions

        extra["options"] = DrawOptions(hflip=True)
    m = settings.measurement()
    ts = settings.timesteps(schedule.T)
    B = images.shape[0]
    if isinstance(offset, numbers.Integral):
        offset = int(offset)
    else:
        offset = [int(k) for k in offset]
        if len(offset) != B:
            raise UserError(f"{len(offset)} draw keys for {B} images")
    total = B if total is None else total
    out = torch.empty(B, projector.out_dim, dtype=torch.float32)
    step = _grad_batch(projector.in_dim)
    for lo in range(0, B, step):
        hi = min(B, lo + step)
        g = grad_fn(unet, schedule, images[lo:hi], m, settings.draws, settings.seed,
                    timesteps=ts, params=params,
                    offset=offset + lo if isinstance(offset, int) else offset[lo:hi], **extra)
        if g.shape != (hi - lo, projector.in_dim):
            raise UserError(f"gradient function returned shape {tuple(g.shape)}, expected "
                            f"{(hi - lo, projector.in_dim)}")
        with torch.no_grad():  # per_example_gradients' result may still require grad
            out[lo:hi] = projector.project(g.detach().float()).cpu()
        if progress is not None:
            progress(done + hi, total, stage)
    if not torch.isfinite(out).all():
        raise UserError("TRAK features contain NaN or inf (diverged model?); check the model and the images")
    return out


def _projector_for(unet, settings: TrakSettings, device) -> Projector:
    from attribution.gradients import kfac_parameters

    P = sum(p.numel() for p in kfac_parameters(unet))
    k = P if settings.projection == "identity" else settings.proj_dim
    return make_projector(settings.projection, P, k, seed=settings.seed, device=device)


def _features_dir(run: Run, settings: TrakSettings, projector: Projector, num_train: int, hflip: bool) -> Path:
    args = settings.cache_args(projector.in_dim, num_train)
    args["projector"] = projector.describe()
    if hflip:  # runs without augmentation keep the cache keys they had
        args["hflip"] = True
    return run.artifact_dir("trak-features", args)


def train_features(
    run: Run,
    settings: TrakSettings,
    *,
    unet=None,
    device=None,
    progress: Progress = None,
    grad_fn=None,
) -> tuple[Tensor, Path]:
    """Cached training features ``Phi: [N, k]`` float32 and their artifact folder.

    The draws follow the run's training augmentation: a run trained with ``hflip`` gets an
    independent flip per (t, eps) draw (paper App. G.8), so TRAK attributes the trained objective.
    """
    from attribution.ddpm import default_device
    from attribution.influence import run_hflip

    device = torch.device(device) if device is not None else default_device()
    unet = unet if unet is not None else run.load_unet(device)
    ds = run.dataset()
    N = len(ds)
    hflip = run_hflip(run)
    projector = _projector_for(unet, settings, device)
    d = _features_dir(run, settings, projector, N, hflip)
    final = d / "train_features.safetensors"
    if final.exists():
        feats = load_tensors(final)[0]["features"]
        if feats.shape == (N, projector.out_dim):
            if progress is not None:
                progress(N, N, "train features (cached)")
            return feats, d
    images = ds.tensors()
    schedule = run.schedule()
    shard_dir = d / "shards"
    shards = []
    for lo in range(0, N, SHARD_SIZE):
        hi = min(N, lo + SHARD_SIZE)
        path = shard_dir / f"{lo:09d}_{hi:09d}.safetensors"
        if path.exists():
            shards.append(load_tensors(path)[0]["features"])
            if progress is not None:
                progress(hi, N, "train gradients")
            continue
        f = featurize(unet, schedule, images[lo:hi].to(device), settings, projector, offset=lo,
                      grad_fn=grad_fn, progress=progress, stage="train gradients", done=lo, total=N,
                      hflip=hflip)
        save_tensors(path, {"features": f})
        shards.append(f)
    feats = torch.cat(shards)
    save_tensors(final, {"features": feats}, {"settings": asdict(settings), "num_train": N, "hflip": hflip})
    shutil.rmtree(shard_dir, ignore_errors=True)
    return feats, d


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
    """Projected query gradients ``[Q, k]`` (same projection and measurement as training).

    Draws of query b are keyed by its global index ``query_indices[b]`` (:func:`query_keys`).
    Queries are generated samples, so they are never augmented.
    """
    from attribution.ddpm import default_device

    device = torch.device(device) if device is not None else default_device()
    unet = unet if unet is not None else run.load_unet(device)
    check_query_images(run, query_images)
    keys = query_keys(query_images.shape[0], query_indices)
    projector = _projector_for(unet, settings, device)
    return featurize(unet, run.schedule(), query_images.to(device), settings, projector,
                     offset=keys, grad_fn=grad_fn, progress=progress, stage="query gradients")


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

    def default_damping(self, relative: float = DEFAULT_RELATIVE_DAMPING) -> float:
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


def _load_or_build_eigen(d: Path, feats: Tensor) -> GramEigen:
    path = d / "gram_eigen.safetensors"
    if path.exists():
        t, meta = load_tensors(path)
        if meta.get("num_train") == feats.shape[0]:
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


def trak_attribution(
    run: Run,
    query_images: Tensor,
    *,
    variant: str = "trak",
    proj_dim: int = DEFAULT_PROJ_DIM,
    damping: Optional[float] = None,
    relative_damping: float = DEFAULT_RELATIVE_DAMPING,
    num_draws: Optional[int] = None,
    num_timesteps: int = DEFAULT_NUM_TIMESTEPS,
    seed: int = 0,
    projection: str = "sjlt",
    device=None,
    progress: Progress = None,
    query_indices: Optional[Sequence[int]] = None,
) -> TrakResult:
    """TRAK / D-TRAK scores with the damping actually used (see the module docstring).

    ``query_indices``: the queries' global indices in their query set (their draw keys,
    :func:`query_keys`); None: ``0..Q-1``.
    """
    from attribution.ddpm import default_device

    settings = TrakSettings(variant=variant, proj_dim=proj_dim, projection=projection,
                            num_draws=num_draws, num_timesteps=num_timesteps, seed=seed)
    check_query_images(run, query_images)
    device = torch.device(device) if device is not None else default_device()
    unet = run.load_unet(device)
    feats, d = train_features(run, settings, unet=unet, device=device, progress=progress)
    qf = query_features(run, query_images, settings, query_indices=query_indices, unet=unet, device=device,
                        progress=progress)
    if progress is not None:
        progress(0, 1, "scores")
    eig = _load_or_build_eigen(d, feats)
    lam = eig.default_damping(relative_damping) if damping is None else float(damping)
    scores = scores_from_features(qf, feats, lam, eig).float()
    if progress is not None:
        progress(1, 1, "scores")
    return TrakResult(scores, lam, trak_code_damping(lam, feats.shape[0]), settings, d)


def trak_scores(
    run: Run,
    query_images: Tensor,
    *,
    variant: str = "trak",
    proj_dim: int = DEFAULT_PROJ_DIM,
    damping: Optional[float] = None,
    num_draws: Optional[int] = None,
    num_timesteps: int = DEFAULT_NUM_TIMESTEPS,
    seed: int = 0,
    progress: Progress = None,
    relative_damping: float = DEFAULT_RELATIVE_DAMPING,
    projection: str = "sjlt",
    device=None,
    query_indices: Optional[Sequence[int]] = None,
) -> Tensor:
    """TRAK (``variant="trak"``) or D-TRAK (``"dtrak"``) scores ``[Q, N]`` float32.

    query_images ``[Q, C, H, W]`` in [-1, 1]. ``damping``: lambda in the paper's mean-loss
    normalisation (TRAK code's value / N); None: ``relative_damping`` x mean non-zero eigenvalue
    of the projected GGN. ``num_draws``: (t, eps) draws per example (default 10 for TRAK,
    ``num_timesteps`` for D-TRAK). ``num_timesteps``: D-TRAK's K. ``progress(done, total, stage)``.
    ``query_indices``: the queries' global indices in their set (draw keys); None: ``0..Q-1``.
    """
    return trak_attribution(run, query_images, variant=variant, proj_dim=proj_dim, damping=damping,
                            relative_damping=relative_damping, num_draws=num_draws,
                            num_timesteps=num_timesteps, seed=seed, projection=projection,
                            device=device, progress=progress, query_indices=query_indices).scores


__all__ = [
    "DEFAULT_NUM_DRAWS", "DEFAULT_NUM_TIMESTEPS", "DEFAULT_PROJ_DIM", "DEFAULT_RELATIVE_DAMPING", "GramEigen",
    "QUERY_INDEX_OFFSET", "TRAK_VARIANTS", "TrakResult", "TrakSettings", "dtrak_timesteps", "featurize",
    "gram_eigen", "query_features", "query_keys", "scores_from_features", "train_features", "trak_attribution",
    "trak_code_damping", "trak_scores",
]
