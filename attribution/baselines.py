"""Baselines (method.md §6): TRAK, D-TRAK, CLIP cosine and raw-pixel cosine.

Every public scorer returns ``scores: Tensor  # [Q, N]`` float32 for Q query images against the N
training examples of ``run.dataset()``, in dataset order.

TRAK / D-TRAK
-------------
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
so an interrupted featurisation resumes. Query draws use example indices offset by
``QUERY_INDEX_OFFSET``, so a query never shares (t, eps) draws with a training example.

CLIP cosine / pixel cosine
--------------------------
Cosine similarity of open_clip image embeddings (default ViT-B-32, LAION-2B weights), with the
training embeddings cached in the run; and of flattened raw images (model-free floor).
"""

from __future__ import annotations

import math
import os
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

import torch
from torch import Tensor

from attribution.errors import UserError
from attribution.projection import PROJECTION_KINDS, Projector, make_projector
from attribution.runs import Run, file_digest, load_tensors, save_tensors, write_json

Progress = Optional[Callable[[int, int, str], None]]

TRAK_VARIANTS = ("trak", "dtrak")
DEFAULT_PROJ_DIM = 2048
DEFAULT_NUM_DRAWS = 10  # per example; the paper used 250 (GPU)
DEFAULT_NUM_TIMESTEPS = 10  # D-TRAK's K (10 or 100)
DEFAULT_RELATIVE_DAMPING = 0.1
QUERY_INDEX_OFFSET = 1_000_000_000
SHARD_SIZE = 256  # training examples per cached feature shard
GRAD_BUDGET_BYTES = 256 << 20  # per-example gradients held at once (float32)

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b79k"
CLIP_WEIGHTS_ENV = "ATTRIBUTION_CLIP_WEIGHTS"


# ============================================================================ TRAK / D-TRAK


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
    offset: int = 0,
    grad_fn=None,
    params=None,
    progress: Progress = None,
    stage: str = "gradients",
    done: int = 0,
    total: Optional[int] = None,
) -> Tensor:
    """Projected per-example gradients ``[B, k]`` float32 of ``images`` ``[B, C, H, W]``.

    ``grad_fn`` defaults to :func:`attribution.gradients.per_example_gradients`; draws of image b
    are keyed by ``offset + b``. ``params``: default ``kfac_parameters(unet)`` (a subset only for
    tests; cached features always use the default).
    """
    from attribution.gradients import kfac_parameters, per_example_gradients

    grad_fn = grad_fn or per_example_gradients
    params = kfac_parameters(unet) if params is None else list(params)
    m = settings.measurement()
    ts = settings.timesteps(schedule.T)
    B = images.shape[0]
    total = B if total is None else total
    out = torch.empty(B, projector.out_dim, dtype=torch.float32)
    step = _grad_batch(projector.in_dim)
    for lo in range(0, B, step):
        hi = min(B, lo + step)
        g = grad_fn(unet, schedule, images[lo:hi], m, settings.draws, settings.seed,
                    timesteps=ts, params=params, offset=offset + lo)
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


def _features_dir(run: Run, settings: TrakSettings, projector: Projector, num_train: int) -> Path:
    args = settings.cache_args(projector.in_dim, num_train)
    args["projector"] = projector.describe()
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
    """Cached training features ``Phi: [N, k]`` float32 and their artifact folder."""
    from attribution.ddpm import default_device

    device = torch.device(device) if device is not None else default_device()
    unet = unet if unet is not None else run.load_unet(device)
    ds = run.dataset()
    N = len(ds)
    projector = _projector_for(unet, settings, device)
    d = _features_dir(run, settings, projector, N)
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
                      grad_fn=grad_fn, progress=progress, stage="train gradients", done=lo, total=N)
        save_tensors(path, {"features": f})
        shards.append(f)
    feats = torch.cat(shards)
    save_tensors(final, {"features": feats}, {"settings": asdict(settings), "num_train": N})
    shutil.rmtree(shard_dir, ignore_errors=True)
    return feats, d


def query_features(run: Run, query_images: Tensor, settings: TrakSettings, *, unet=None, device=None,
                   progress: Progress = None, grad_fn=None) -> Tensor:
    """Projected query gradients ``[Q, k]`` (same projection and measurement as training)."""
    from attribution.ddpm import default_device

    device = torch.device(device) if device is not None else default_device()
    unet = unet if unet is not None else run.load_unet(device)
    _check_queries(run, query_images)
    projector = _projector_for(unet, settings, device)
    return featurize(unet, run.schedule(), query_images.to(device), settings, projector,
                     offset=QUERY_INDEX_OFFSET, grad_fn=grad_fn, progress=progress, stage="query gradients")


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
) -> TrakResult:
    """TRAK / D-TRAK scores with the damping actually used (see the module docstring)."""
    from attribution.ddpm import default_device

    settings = TrakSettings(variant=variant, proj_dim=proj_dim, projection=projection,
                            num_draws=num_draws, num_timesteps=num_timesteps, seed=seed)
    _check_queries(run, query_images)
    device = torch.device(device) if device is not None else default_device()
    unet = run.load_unet(device)
    feats, d = train_features(run, settings, unet=unet, device=device, progress=progress)
    qf = query_features(run, query_images, settings, unet=unet, device=device, progress=progress)
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
) -> Tensor:
    """TRAK (``variant="trak"``) or D-TRAK (``"dtrak"``) scores ``[Q, N]`` float32.

    query_images ``[Q, C, H, W]`` in [-1, 1]. ``damping``: lambda in the paper's mean-loss
    normalisation (TRAK code's value / N); None: ``relative_damping`` x mean non-zero eigenvalue
    of the projected GGN. ``num_draws``: (t, eps) draws per example (default 10 for TRAK,
    ``num_timesteps`` for D-TRAK). ``num_timesteps``: D-TRAK's K. ``progress(done, total, stage)``.
    """
    return trak_attribution(run, query_images, variant=variant, proj_dim=proj_dim, damping=damping,
                            relative_damping=relative_damping, num_draws=num_draws,
                            num_timesteps=num_timesteps, seed=seed, projection=projection,
                            device=device, progress=progress).scores


# ============================================================================ queries / pixels


def _check_queries(run: Run, query_images: Tensor) -> None:
    """Query images must be ``[Q, C, H, W]`` float with the training images' C, H, W."""
    if not isinstance(query_images, Tensor) or query_images.dim() != 4:
        shape = tuple(query_images.shape) if isinstance(query_images, Tensor) else type(query_images).__name__
        raise UserError(f"query images must be a [Q, C, H, W] tensor, got {shape}")
    if query_images.shape[0] == 0:
        raise UserError("no query images")
    if not query_images.is_floating_point():
        raise UserError("query images must be float in [-1, 1] (convert uint8 with data.to_model_space)")
    ds = run.dataset()
    want = (ds.channels, ds.resolution, ds.resolution)
    if tuple(query_images.shape[1:]) != want:
        raise UserError(f"query images have shape [C, H, W] = {list(query_images.shape[1:])} but the run's "
                        f"training images are {list(want)}")
    if not torch.isfinite(query_images).all():
        raise UserError("query images contain NaN or inf")


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarities of the rows of ``a [Q, D]`` and ``b [N, D]``: ``[Q, N]`` (float64 inside)."""
    a = torch.nn.functional.normalize(a.double().flatten(1), dim=1, eps=1e-12)
    b = torch.nn.functional.normalize(b.double().flatten(1), dim=1, eps=1e-12)
    return a @ b.T


def pixel_scores(run: Run, query_images: Tensor) -> Tensor:
    """Cosine similarity of flattened raw images in [-1, 1]: ``[Q, N]`` float32 (model-free floor)."""
    _check_queries(run, query_images)
    return cosine_matrix(query_images, run.dataset().tensors()).float()


# ============================================================================ CLIP


class ClipUnavailable(UserError):
    """CLIP weights are neither cached, nor given as a file, nor downloadable right now."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_offline() -> bool:
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub always ships with open_clip here
        return False


def _reachable(url: str, timeout: float = 4.0) -> bool:
    """Whether an HTTP HEAD of ``url`` answers 2xx within ``timeout`` s (DNS included).

    A bare TCP connect is not enough: sandboxes and proxies accept connections they never answer.
    """
    import urllib.request

    ok = []

    def probe():
        try:
            req = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                ok.append(200 <= resp.status < 300)
        except Exception:
            pass

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout + 0.5)
    return bool(ok and ok[0])


@dataclass(frozen=True)
class ClipWeights:
    """Where CLIP weights come from: a checkpoint file, or None for an untrained model."""

    path: Optional[str]
    key: str  # cache key of the embeddings (digest of the file, or "untrained-seed0")
    cfg: dict  # open_clip pretrained config (image mean/std/interpolation), may be empty


def resolve_clip_weights(model_name: str = DEFAULT_CLIP_MODEL, pretrained: Optional[str] = DEFAULT_CLIP_PRETRAINED,
                         clip_weights: Optional[str] = None) -> ClipWeights:
    """Find CLIP weights without waiting on the network.

    Order: ``clip_weights`` argument, ``$ATTRIBUTION_CLIP_WEIGHTS``, ``pretrained`` as a file path,
    the Hugging Face / open_clip caches, then a download (only when the hub answers within 3 s and
    HF_HUB_OFFLINE is not set). ``pretrained=None``: untrained weights (tests).
    Raises :class:`ClipUnavailable` (within seconds) when none of these works.
    """
    import open_clip

    if model_name not in open_clip.list_models():
        raise UserError(f"unknown CLIP model {model_name!r} (e.g. ViT-B-32, ViT-B-16, RN50)")
    file = clip_weights or os.environ.get(CLIP_WEIGHTS_ENV) or None
    if file is None and pretrained is not None and os.path.sep in str(pretrained):
        file = pretrained
    if file is not None:
        p = Path(file).expanduser()
        if not p.is_file():
            raise ClipUnavailable(f"CLIP weight file {p} does not exist (from "
                                  f"{'clip_weights' if clip_weights else CLIP_WEIGHTS_ENV if os.environ.get(CLIP_WEIGHTS_ENV) else 'pretrained'}); "
                                  "point it to an open_clip checkpoint (.safetensors or .bin)")
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained and os.path.sep not in str(pretrained) else {}
        return ClipWeights(str(p), "file-" + _weights_digest(p), dict(cfg or {}))
    if pretrained is None:
        return ClipWeights(None, "untrained-seed0", {})
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise UserError(f"no pretrained weights {pretrained!r} for CLIP {model_name} (known: {tags})")
    cfg = dict(cfg)
    hf = cfg.get("hf_hub", "")
    url = cfg.get("url", "")
    candidates: list[tuple[str, str]] = []
    if hf:
        repo, filename = os.path.split(hf)
        filenames = [filename] if filename else []
        filenames += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        candidates = [(repo.rstrip("/"), f) for f in dict.fromkeys(filenames)]
        from huggingface_hub import try_to_load_from_cache

        for repo_id, fn in candidates:
            hit = try_to_load_from_cache(repo_id, fn)
            if isinstance(hit, str) and Path(hit).is_file():
                return ClipWeights(hit, f"hf-{repo_id}-{Path(hit).parent.name}-{fn}", cfg)
    if url:
        local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if local.is_file():
            return ClipWeights(str(local), "file-" + _weights_digest(local), cfg)
    source = f"not in the cache of huggingface.co/{candidates[0][0]}" if candidates else f"not downloaded from {url}"
    hint = (f"Provide them: set {CLIP_WEIGHTS_ENV}=/path/to/open_clip_model.safetensors (or pass "
            f"clip_weights=...)" + (f", or run `huggingface-cli download {candidates[0][0]}` while online"
                                    if candidates else "")
            + "; or use --method pixel, which needs no weights.")
    if _hub_offline():
        raise ClipUnavailable(f"CLIP weights {model_name}/{pretrained} are {source} and HF_HUB_OFFLINE is set. {hint}")
    if candidates:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        probe_url = f"{endpoint}/{candidates[0][0]}/resolve/main/{candidates[0][1]}"
    else:
        endpoint = probe_url = url
    if not _reachable(probe_url):
        raise ClipUnavailable(f"CLIP weights {model_name}/{pretrained} are {source} and {urlparse(endpoint).hostname} "
                              f"is unreachable (offline?). {hint}")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        path = open_clip.pretrained.download_pretrained(cfg)
    except Exception as exc:
        raise ClipUnavailable(f"downloading CLIP weights {model_name}/{pretrained} failed "
                              f"({type(exc).__name__}). {hint}") from None
    if not path or not Path(path).is_file():
        raise ClipUnavailable(f"downloading CLIP weights {model_name}/{pretrained} failed. {hint}")
    return ClipWeights(str(path), "file-" + _weights_digest(Path(path)), cfg)


_DIGESTS: dict[tuple, str] = {}


def _weights_digest(path: Path) -> str:
    """file_digest memoised on (path, size, mtime): checkpoints are hundreds of MB."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path)
    return _DIGESTS[key]


_CLIP_MODELS: dict[tuple, tuple] = {}


def load_clip(model_name: str, weights: ClipWeights, device=None):
    """``(model, preprocess)`` in eval mode; memoised per (model, weights, device).

    ``pretrained=None`` weights are a seeded (seed 0) random initialisation, so they repeat.
    """
    import open_clip

    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (model_name, weights.key, str(device))
    if key not in _CLIP_MODELS:
        kw = {}
        for ours, theirs in (("image_mean", "mean"), ("image_std", "std"),
                             ("image_interpolation", "interpolation"), ("image_resize_mode", "resize_mode")):
            if weights.cfg.get(theirs) is not None:
                kw[ours] = weights.cfg[theirs]
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=weights.path, device=device, **kw)
        except Exception as exc:
            raise ClipUnavailable(f"could not load CLIP {model_name} from {weights.path}: {exc}") from None
        _CLIP_MODELS.clear()  # keep one model in memory
        _CLIP_MODELS[key] = (model.eval(), preprocess)
    return _CLIP_MODELS[key]


@torch.no_grad()
def clip_embeddings(model, preprocess, images: Tensor, batch_size: int = 64, progress: Progress = None,
                    stage: str = "clip embeddings") -> Tensor:
    """Unit-norm CLIP image embeddings ``[B, D]`` float32 of ``images`` ``[B, C, H, W]`` in [-1, 1].

    Grey images are repeated to RGB; each image goes through open_clip's own preprocessing
    (resize to the model's input size, centre crop, normalisation) as a PIL image.
    """
    from PIL import Image

    from attribution.data import to_uint8

    device = next(model.parameters()).device
    out = []
    B = images.shape[0]
    for lo in range(0, B, batch_size):
        arr = to_uint8(images[lo:lo + batch_size])
        if arr.shape[-1] == 1:
            arr = arr.repeat(3, axis=-1)
        batch = torch.stack([preprocess(Image.fromarray(a)) for a in arr]).to(device)
        emb = model.encode_image(batch).float()
        out.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
        if progress is not None:
            progress(min(B, lo + batch_size), B, stage)
    return torch.cat(out)


def clip_train_embeddings(run: Run, model_name: str = DEFAULT_CLIP_MODEL,
                          pretrained: Optional[str] = DEFAULT_CLIP_PRETRAINED, *,
                          clip_weights: Optional[str] = None, weights: Optional[ClipWeights] = None,
                          device=None, progress: Progress = None) -> tuple[Tensor, Path]:
    """Cached CLIP embeddings of the run's training set ``[N, D]`` and their artifact folder.

    The cache is keyed by the CLIP weights (file digest) and, like every run artifact, by the
    run's model fingerprint.
    """
    weights = weights or resolve_clip_weights(model_name, pretrained, clip_weights)
    ds = run.dataset()
    d = run.artifact_dir("clip-embeddings", {"model_name": model_name, "weights": weights.key, "num_train": len(ds)})
    path = d / "train_embeddings.safetensors"
    if path.exists():
        emb = load_tensors(path)[0]["embeddings"]
        if emb.shape[0] == len(ds):
            return emb, d
    model, preprocess = load_clip(model_name, weights, device)
    emb = clip_embeddings(model, preprocess, ds.tensors(), progress=progress, stage="clip train embeddings")
    save_tensors(path, {"embeddings": emb}, {"model_name": model_name, "weights": weights.key})
    write_json(d / "weights.json", {"path": weights.path, "key": weights.key})
    return emb, d


def clip_scores(
    run: Run,
    query_images: Tensor,
    *,
    model_name: str = DEFAULT_CLIP_MODEL,
    pretrained: Optional[str] = DEFAULT_CLIP_PRETRAINED,
    progress: Progress = None,
    clip_weights: Optional[str] = None,
    device=None,
) -> Tensor:
    """Cosine similarity of CLIP image embeddings, queries vs training set: ``[Q, N]`` float32.

    Weights: see :func:`resolve_clip_weights`; ``pretrained=None`` is an untrained model (tests).
    Raises :class:`ClipUnavailable` within seconds when offline without weights.
    """
    _check_queries(run, query_images)
    weights = resolve_clip_weights(model_name, pretrained, clip_weights)
    train, _ = clip_train_embeddings(run, model_name, weights=weights, device=device, progress=progress)
    model, preprocess = load_clip(model_name, weights, device)
    q = clip_embeddings(model, preprocess, query_images, progress=progress, stage="clip queries")
    return cosine_matrix(q, train).float()


__all__ = [
    "ClipUnavailable", "TrakResult", "TrakSettings", "GramEigen", "DEFAULT_RELATIVE_DAMPING",
    "DEFAULT_PROJ_DIM", "DEFAULT_NUM_DRAWS", "DEFAULT_NUM_TIMESTEPS", "dtrak_timesteps",
    "trak_code_damping", "featurize", "train_features", "query_features", "gram_eigen",
    "scores_from_features", "trak_attribution", "trak_scores", "clip_scores", "clip_embeddings",
    "clip_train_embeddings", "resolve_clip_weights", "load_clip", "pixel_scores", "cosine_matrix",
]
