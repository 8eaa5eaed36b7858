"""TRAK / D-TRAK features: projected per-example gradients, in two halves of the draws (method.md §6).

Training features ``phi_n = S g_n`` (``S``: the seeded ``k x P`` projection of
:mod:`attribution.projection`) are projections of the rows of a gradient store
(:mod:`attribution.store`: each example's gradient as the mean over rounds of (t, eps) draws,
round r in half r % 2):

- TRAK projects K-FAC's own training-loss store (:func:`attribution.influence.gradient_store`):
  the same draws (importance-sampled timesteps, the run's flips, rounds doubling in pairs), so
  its features cost no gradient beyond K-FAC's and the two compare at exactly equal budgets.
- D-TRAK projects a store of square-norm gradients at its K fixed, uniformly spaced timesteps;
  every round adds fresh noise at all K timesteps (rounds of K, K, 2K, 2K, ... draws).

Projection is linear, so projecting the store's mean rows equals the draw-weighted mean of the
projected halves; both halves are kept (the split-half reliability of the galleries). A store
above the byte budget is not built: the same rounds are then computed and projected chunk by
chunk ("streamed", resumable by shard), so nothing of size N x P is kept.

Query features: ``query_draws`` draws of the measurement in two independent halves (draw rounds
0 and 1). TRAK's are exactly K-FAC's query gradients (same keys, scheme and rounds:
:func:`attribution.influence.query_gradients`). The raw halves are cached per image (content
digest + draw key), so another projection or damping never recomputes them.

Caching: everything is keyed by :func:`attribution.runs.Run.artifact_dir` (model fingerprint +
every setting); store-based features also by the store's folder and its completed rounds, so a
grown store or another model never reuses old features.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from attribution.errors import UserError
from attribution.measurements import DrawOptions
from attribution.projection import Projector, make_projector
from attribution.runs import Run, load_tensors, read_json, save_tensors

Progress = Optional[Callable[[int, int, str], None]]

SHARD_SIZE = 256  # training examples per cached shard of streamed features
PROJECT_ROWS = 64  # store rows dequantised and projected at once
GRAD_BUDGET_BYTES = 256 << 20  # per-example gradients held at once (float32)
QUERY_GROUP = 4  # queries whose gradients are computed (and cached) together


def _grad_batch(num_params: int) -> int:
    return max(1, min(256, GRAD_BUDGET_BYTES // (4 * max(1, num_params))))


def projector_for(unet, settings, device=None) -> Projector:
    """The seeded projection of ``settings`` for ``unet``'s K-FAC parameters (P -> proj_dim)."""
    from attribution.gradients import kfac_parameters

    P = sum(p.numel() for p in kfac_parameters(unet))
    k = P if settings.projection == "identity" else settings.proj_dim
    return make_projector(settings.projection, P, k, seed=settings.seed, device=device)


def featurize(
    unet,
    schedule,
    images: Tensor,
    settings,
    projector: Projector,
    *,
    num_draws: int,
    offset: Union[int, Sequence[int]] = 0,
    options: Optional[DrawOptions] = None,
    grad_fn=None,
    params=None,
    progress: Progress = None,
    stage: str = "gradients",
    done: int = 0,
    total: Optional[int] = None,
    hflip: bool = False,
) -> Tensor:
    """Projected per-example gradients ``[B, k]`` float32 of ``images`` ``[B, C, H, W]``.

    ``num_draws`` (t, eps) draws of ``settings.measurement()`` (D-TRAK: at its fixed timesteps),
    made with ``options`` (default plain i.i.d.; ``hflip=True`` adds a flip per draw). Draws of
    image b are keyed by ``offset + b`` (int) or ``offset[b]`` (B global keys). ``grad_fn``
    defaults to :func:`attribution.gradients.per_example_gradients`; ``params`` to
    ``kfac_parameters(unet)`` (a subset only for tests).
    """
    from attribution.gradients import kfac_parameters, per_example_gradients

    grad_fn = grad_fn or per_example_gradients
    params = kfac_parameters(unet) if params is None else list(params)
    opts = options if options is not None else DrawOptions()
    if hflip and not opts.hflip:
        opts = DrawOptions(opts.scheme, True, opts.draw_round, opts.proposal)
    extra = {} if opts == DrawOptions() else {"options": opts}  # plain draws: any grad_fn serves
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
        g = grad_fn(unet, schedule, images[lo:hi], m, num_draws, settings.seed, timesteps=ts, params=params,
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


# ----------------------------------------------------------------------------- training features


@dataclass
class TrainFeatures:
    """Projected training gradients of each stored half of the draws."""

    halves: list[Tensor]  # [N, k] float32 each: 1 half while one round is done, else 2
    weights: list[float]  # share of the draws in each half (sums to 1)
    rounds_done: int
    rounds_total: int
    directory: Path  # the cache folder (eigendecompositions live there too)
    source: str  # "store" (projected store rows) or "stream" (projected while computed)

    @property
    def features(self) -> Tensor:
        """``Phi [N, k]``: the projection of the mean gradient over all completed rounds."""
        if len(self.halves) == 1:
            return self.halves[0]
        return self.weights[0] * self.halves[0] + self.weights[1] * self.halves[1]


def _draw_options(run: Run, settings, progress: Progress) -> DrawOptions:
    """Training-side draw options: TRAK shares K-FAC's (scheme, proposal, flips); D-TRAK's fixed
    timesteps need only the run's flips."""
    from attribution.influence import draw_options, run_hflip

    if settings.variant == "trak":
        return draw_options(run, settings.influence_settings(), progress)
    return DrawOptions(hflip=run_hflip(run))


def dtrak_store_args(run: Run, settings, num_params: int) -> dict:
    """Cache key of D-TRAK's square-norm gradient store (beside K-FAC's under ``grad_store``)."""
    from attribution.influence import run_hflip

    args = {"measurement": str(settings.measurement()), "round_draws": settings.round_draws, "seed": settings.seed,
            "dtype": "float16", "params": "kfac", "p": num_params, "layout": "rounds",
            "timesteps": settings.num_timesteps}
    if run_hflip(run):
        args["hflip"] = True
    return args


def training_store(run: Run, settings, unet, progress: Progress = None, rounds: Optional[int] = None,
                   store_budget_bytes: Optional[int] = None):
    """The gradient store whose rows are ``settings``' training gradients, with at least
    ``rounds`` completed rounds (built, resumed or grown); None when it would exceed the byte
    budget (default :data:`attribution.influence.DEFAULT_STORE_BUDGET`)."""
    from attribution.gradients import GradientStore, build_gradient_store, kfac_parameters, store_nbytes
    from attribution.influence import DEFAULT_STORE_BUDGET, gradient_store, training_images

    want = settings.rounds if rounds is None else max(1, min(int(rounds), settings.rounds))
    if settings.variant == "trak":
        return gradient_store(run, settings.influence_settings(store_budget_bytes), progress, want)
    p = sum(q.numel() for q in kfac_parameters(unet))
    d = run.artifact_dir("grad_store", dtrak_store_args(run, settings, p))
    if (d / "progress.json").exists() and int(read_json(d / "progress.json")["rounds_done"]) >= want:
        return GradientStore(d)
    budget = DEFAULT_STORE_BUDGET if store_budget_bytes is None else store_budget_bytes
    n = len(run.dataset())
    if store_nbytes(n, p, "float16") > budget:
        return None
    return build_gradient_store(d, unet, run.schedule(), training_images(run), settings.measurement(), 0,
                                settings.seed, timesteps=settings.timesteps(run.schedule().T), rounds=want,
                                round_draws=settings.round_draws, options=_draw_options(run, settings, progress),
                                progress=progress)


def project_store(store, projector: Projector, progress: Progress = None) -> list[Tensor]:
    """Each stored half's rows projected: ``[N, k]`` float32 per half (rows dequantised in tiles)."""
    out = []
    total = store.n * len(store.halves)
    for h, half in enumerate(store.halves):
        feats = torch.empty(store.n, projector.out_dim, dtype=torch.float32)
        for lo in range(0, store.n, PROJECT_ROWS):
            hi = min(store.n, lo + PROJECT_ROWS)
            feats[lo:hi] = projector.project(half.rows(lo, hi)).cpu()
            if progress is not None:
                progress(h * store.n + hi, total, "train features (projection)")
        out.append(feats)
    return out


def streamed_halves(unet, schedule, images: Tensor, settings, projector: Projector, options: DrawOptions,
                    rounds: int, *, offset: int = 0, grad_fn=None, progress: Progress = None, done: int = 0,
                    total: Optional[int] = None) -> list[Tensor]:
    """The store's halves computed directly: round r (``settings.round_draws[r]`` draws, draw round
    r) of ``images``' gradients, projected and averaged draw-weighted into half r % 2."""
    sched = settings.round_draws[:rounds]
    n = images.shape[0]
    sums = [torch.zeros(n, projector.out_dim, dtype=torch.float64) for _ in range(min(2, rounds))]
    for r, draws in enumerate(sched):
        opts = DrawOptions(options.scheme, options.hflip, r, options.proposal)
        f = featurize(unet, schedule, images, settings, projector, num_draws=draws, offset=offset, options=opts,
                      grad_fn=grad_fn)
        sums[r % 2] += draws * f.double()
        if progress is not None:
            progress(done + n * (r + 1) // len(sched), total or n, "train gradients (streamed)")
    counts = [sum(d for i, d in enumerate(sched) if i % 2 == h) for h in range(len(sums))]
    return [(s / c).float() for s, c in zip(sums, counts)]


def _half_weights(settings, rounds: int) -> list[float]:
    counts = [sum(d for i, d in enumerate(settings.round_draws[:rounds]) if i % 2 == h) for h in range(min(2, rounds))]
    return [c / sum(counts) for c in counts]


def _load_features(path: Path, n: int, k: int) -> Optional[tuple[list[Tensor], list[float]]]:
    if not path.exists():
        return None
    t, meta = load_tensors(path)
    halves = [t[f"half{h}"] for h in range(len(meta.get("weights", [])))]
    if not halves or any(x.shape != (n, k) for x in halves):
        return None
    return halves, [float(w) for w in meta["weights"]]


def _prune_fewer_rounds(d: Path, rounds_done: int) -> None:
    """Delete cached features of the same settings at fewer rounds (superseded by ``d``)."""
    args = read_json(d / "args.json")
    for other in d.parent.iterdir():
        if other == d or not (other / "args.json").exists():
            continue
        try:
            o = read_json(other / "args.json")
        except UserError:
            continue
        if o.get("rounds_done", rounds_done) < rounds_done and {**o, "rounds_done": None} == {**args, "rounds_done": None}:
            shutil.rmtree(other, ignore_errors=True)


def train_features(run: Run, settings, *, unet=None, device=None, progress: Progress = None,
                   rounds: Optional[int] = None, grad_fn=None,
                   store_budget_bytes: Optional[int] = None) -> TrainFeatures:
    """Cached training features of ``settings`` after ``rounds`` rounds (default all).

    From the gradient store (:func:`training_store`, built if missing) when it fits the byte
    budget, else streamed (``grad_fn`` is used only then). Training draws follow the run's
    augmentation (a flip per draw for runs trained with ``hflip``, paper App. G.8).
    """
    from attribution.ddpm import default_device
    from attribution.influence import run_hflip, training_images

    device = torch.device(device) if device is not None else default_device()
    unet = unet if unet is not None else run.load_unet(device)
    projector = projector_for(unet, settings, device)
    n = len(run.dataset())
    want = settings.rounds if rounds is None else max(1, min(int(rounds), settings.rounds))
    store = training_store(run, settings, unet, progress, want, store_budget_bytes)
    if store is not None:
        args = {"source": "store", "variant": settings.variant, "store": store.dir.name,
                "rounds_done": store.rounds_done, "projector": projector.describe(), "num_train": store.n}
        d = run.artifact_dir("trak-features", args)
        got = _load_features(d / "train_features.safetensors", store.n, projector.out_dim)
        if got is None:
            halves = project_store(store, projector, progress)
            got = halves, store.weights()
            save_tensors(d / "train_features.safetensors", {f"half{h}": x for h, x in enumerate(halves)},
                         {"weights": got[1], "store": str(store.dir), "rounds_done": store.rounds_done})
            _prune_fewer_rounds(d, store.rounds_done)
        elif progress is not None:
            progress(1, 1, "train features (cached)")
        return TrainFeatures(got[0], got[1], store.rounds_done, settings.rounds, d, "store")
    options = _draw_options(run, settings, progress)
    args = {"source": "stream", **settings.cache_args(projector.in_dim, n), "rounds_done": want,
            "projector": projector.describe(), "options": {"scheme": options.scheme, "proposal": options.proposal}}
    if run_hflip(run):
        args["hflip"] = True
    d = run.artifact_dir("trak-features", args)
    final = d / "train_features.safetensors"
    got = _load_features(final, n, projector.out_dim)
    if got is not None:
        if progress is not None:
            progress(1, 1, "train features (cached)")
        return TrainFeatures(got[0], got[1], want, settings.rounds, d, "stream")
    images, schedule = training_images(run), run.schedule()
    shards: list[list[Tensor]] = []
    for lo in range(0, n, SHARD_SIZE):
        hi = min(n, lo + SHARD_SIZE)
        path = d / "shards" / f"{lo:09d}_{hi:09d}.safetensors"
        part = _load_features(path, hi - lo, projector.out_dim)
        if part is None:
            halves = streamed_halves(unet, schedule, images[lo:hi].to(device), settings, projector, options, want,
                                     offset=lo, grad_fn=grad_fn, progress=progress, done=lo, total=n)
            part = halves, _half_weights(settings, want)
            save_tensors(path, {f"half{h}": x for h, x in enumerate(halves)}, {"weights": part[1]})
        shards.append(part[0])
    halves = [torch.cat([s[h] for s in shards]) for h in range(len(shards[0]))]
    weights = _half_weights(settings, want)
    save_tensors(final, {f"half{h}": x for h, x in enumerate(halves)}, {"weights": weights})
    shutil.rmtree(d / "shards", ignore_errors=True)
    _prune_fewer_rounds(d, want)
    return TrainFeatures(halves, weights, want, settings.rounds, d, "stream")


# ----------------------------------------------------------------------------- query features


def image_digest(image: Tensor) -> str:
    """Content digest of one image ``[C, H, W]`` (its float32 bytes)."""
    return hashlib.sha256(image.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def query_gradient_halves(run: Run, images: Tensor, settings, keys: Sequence[int], *, unet=None,
                          progress: Progress = None, grad_fn=None) -> tuple[Tensor, Tensor]:
    """The two independent halves (``query_draws / 2`` draws each, draw rounds 0 and 1) of the
    queries' gradients of ``settings.measurement()``: ``([Q, P], [Q, P])`` float32, cached per
    image (content digest and draw key ``keys[b]``). Queries are never augmented."""
    from attribution.gradients import kfac_parameters, per_example_gradients

    grad_fn = grad_fn or per_example_gradients
    unet = unet if unet is not None else run.load_unet()
    half = settings.query_draws // 2
    args = {"measurement": str(settings.measurement()), "draws": half, "seed": settings.seed, "params": "kfac",
            "scheme": settings.query_scheme, "timesteps": settings.num_timesteps if settings.variant == "dtrak" else None}
    d = run.artifact_dir("trak-query-grads", args)
    path = d / "grads.safetensors"
    have: dict[str, tuple[Tensor, Tensor]] = {}
    if path.exists():
        t, meta = load_tensors(path)
        have = {rid: (t["half0"][i], t["half1"][i]) for i, rid in enumerate(json.loads(meta["rows"]))}
    rids = [f"{image_digest(images[b])}:{int(k)}" for b, k in enumerate(keys)]
    missing = [b for b, rid in enumerate(rids) if rid not in have]
    params = kfac_parameters(unet)
    ts = settings.timesteps(run.schedule().T)
    stage = f"query gradients ({settings.measurement()}, {settings.query_draws} draws in two halves)"
    for start in range(0, len(missing), QUERY_GROUP):
        part = missing[start:start + QUERY_GROUP]
        got = [grad_fn(unet, run.schedule(), images[part], settings.measurement(), half, settings.seed,
                       timesteps=ts, params=params, offset=[int(keys[b]) for b in part],
                       options=DrawOptions(scheme=settings.query_scheme, draw_round=h)).detach().float().cpu()
               for h in (0, 1)]
        for j, b in enumerate(part):
            have[rids[b]] = (got[0][j], got[1][j])
        order = sorted(have)
        save_tensors(path, {f"half{h}": torch.stack([have[r][h] for r in order]) for h in (0, 1)},
                     {"rows": json.dumps(order)})
        if progress is not None:
            progress(start + len(part), len(missing), stage)
    return tuple(torch.stack([have[r][h] for r in rids]) for h in (0, 1))


def query_feature_halves(run: Run, images: Tensor, settings, keys: Sequence[int], *, unet=None, device=None,
                         progress: Progress = None, grad_fn=None, query_set: Optional[str] = None,
                         query_indices: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    """Projected query gradient halves ``([Q, k], [Q, k])`` float32.

    ``query_set`` (TRAK only): the images are queries ``query_indices`` of that sample set, whose
    K-FAC query gradients (the same draws) are then shared instead of recomputed.
    """
    unet = unet if unet is not None else run.load_unet(device)
    projector = projector_for(unet, settings, device)
    if query_set is not None and settings.variant == "trak":
        from attribution.influence import query_gradient_halves as kfac_query_halves

        qa, qb = kfac_query_halves(run, query_set, list(query_indices), settings.influence_settings(), progress)
    else:
        qa, qb = query_gradient_halves(run, images, settings, keys, unet=unet, progress=progress, grad_fn=grad_fn)
    fa, fb = projector.project(qa).cpu(), projector.project(qb).cpu()
    if not (torch.isfinite(fa).all() and torch.isfinite(fb).all()):
        raise UserError("TRAK query features contain NaN or inf (diverged model?); check the model and the images")
    return fa, fb
