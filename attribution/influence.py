"""Influence scores tau(x', x_j) = grad m(x')^T (G + lambda I)^{-1} grad l(x_j) (method.md §2, §5).

Sign: tau > 0 means removing x_j is predicted to INCREASE the measurement of x' (a proponent for
loss-like measurements); the predicted change of m after removing a set I is (1/N) sum_{j in I} tau_j.

Settings live in attribution/influence_settings.py and the scoring core in attribution/scoring.py
(both re-exported here); this module caches and combines the run's artifacts.

Pipeline (everything cached in the run, so re-scoring only re-preconditions the queries):
training-loss gradients -> gradient store (disk, fp16/int8); (E)KFAC factors -> run
(safetensors); query gradients of the *approximation measurement* -> run; preconditioned
queries @ store^T -> scores ``[Q, N]``. When the store would exceed a byte budget, scoring
streams the training gradients instead (queries preconditioned first, each training gradient
computed once and scored against all queries).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from attribution.curvature import CurvatureConfig, Preconditioner, curvature_factors, preconditioner_from_factors
from attribution.errors import UserError
from attribution.gradients import (
    GradientStore,
    build_gradient_store,
    kfac_parameters,
    num_parameters,
    per_example_gradients,
    store_nbytes,
)
from attribution.influence_settings import (  # noqa: F401 - public names of this module
    DEFAULT_DRAW_SCHEME,
    DEFAULT_FACTOR_DRAWS,
    DEFAULT_QUERY_DRAWS,
    DEFAULT_TRAIN_DRAWS,
    DEFAULT_PREVIEW_DRAWS,
    PREVIEW_ROUNDS,
    InfluenceSettings,
)
from attribution.measurements import PROPOSAL_SCHEMES, DrawOptions, DrawScheme, Measurement
from attribution.scoring import (  # noqa: F401 - public names of this module
    QUERY_INT8_BLOCK,
    check_scores,
    compress_int8,
    int8_blocks,
    precondition_queries,
    score_chunks,
    top_k,
)
from attribution.stability import Reliability, moderated_se, reliability

Progress = Optional[Callable[[int, int, str], None]]

# Query draws are keyed by (seed, QUERY_OFFSET + query index), so a query never shares its
# (t, eps) draws with the training example of the same index.
QUERY_OFFSET = 10**9
DEFAULT_STORE_BUDGET = 8 * 2**30  # bytes of disk a gradient store may take before streaming
TRAINING_LOSS = Measurement("loss")


# ----------------------------------------------------------------------------- run-level caching


class _RunCache:
    """In-process cache of what a run's scoring needs (keyed by run path + model fingerprint)."""

    def __init__(self):
        self.key = None
        self.items: dict = {}

    def get(self, run) -> dict:
        key = (str(Path(run.path).resolve()), run.model_fingerprint())
        if key != self.key:
            self.key, self.items = key, {}
        return self.items


_CACHE = _RunCache()


def clear_cache() -> None:
    _CACHE.key, _CACHE.items = None, {}


def _model(run, c: dict):
    if "unet" not in c:
        c["unet"] = run.load_unet(torch.device("cpu")).float().eval()
        c["schedule"] = run.schedule()
    return c["unet"], c["schedule"]


def training_images(run, c: Optional[dict] = None) -> Tensor:
    """The run's training images ``[N, C, H, W]`` in [-1, 1] (cached in-process)."""
    c = _CACHE.get(run) if c is None else c
    if "train_images" not in c:
        c["train_images"] = run.dataset().tensors().float()
    return c["train_images"]


def _samples(run, query_set: str, c: dict):
    key = ("samples", query_set)
    if key not in c:
        from attribution.runs import file_digest

        tensors, _ = run.load_samples(query_set)
        c[key] = (tensors["images"].float(), tensors.get("trajectory"),
                  file_digest(run.path / "samples" / f"{query_set}.safetensors"))
    return c[key]


def _check_indices(indices: Sequence[int], n: int, what: str) -> list[int]:
    idx = [int(i) for i in indices]
    if not idx:
        raise UserError(f"no {what} indices given")
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise UserError(f"{what} index {bad[0]} is out of range: the set has {n} entries (0..{n - 1})")
    return idx


def run_hflip(run) -> bool:
    """Whether the run was trained with random horizontal flips (its training-side draws flip too)."""
    return bool(run.config.get("train", {}).get("hflip", False))


def _store_args(run, settings: InfluenceSettings, p: int) -> dict:
    args = {"measurement": str(TRAINING_LOSS), "round_draws": settings.round_draws, "seed": settings.seed,
            "dtype": settings.store_dtype, "params": "kfac", "p": p, "layout": "rounds",
            "scheme": settings.draw_scheme}
    if run_hflip(run):
        args["hflip"] = True
    if settings.draw_scheme in PROPOSAL_SCHEMES:
        args["proposal_from"] = _proposal_reference(settings).key()  # the pilot depends on these factors
    return args


def _proposal_reference(settings: InfluenceSettings, hflip: bool = False) -> CurvatureConfig:
    """The factors the timestep proposal's pilot preconditions with: always K-FAC (MC, expand), so
    the store, shared by every variant and damping, does not depend on which one was asked first."""
    return CurvatureConfig("kfac", "mc", "expand", settings.factor_draws, settings.seed, hflip=hflip)


def draw_options(run, settings: InfluenceSettings, progress: Progress = None) -> DrawOptions:
    """The training-side draw options of ``settings`` on ``run`` (its augmentation; for the importance
    scheme the run's timestep proposal, measured once on a pilot and saved with the store)."""
    from attribution.runs import read_json

    from attribution.gradients import has_dropout

    hflip = run_hflip(run)
    c = _CACHE.get(run)
    train_mode = has_dropout(_model(run, c)[0])  # dropout presets: training gradients in train() mode
    if settings.draw_scheme not in PROPOSAL_SCHEMES:
        return DrawOptions(settings.draw_scheme, hflip, train_mode=train_mode)
    d = _store_dir(run, settings, c)
    if (d / "store.json").exists():
        return DrawOptions(settings.draw_scheme, hflip, proposal=tuple(read_json(d / "store.json")["proposal"]),
                           train_mode=train_mode)
    key = ("proposal", str(d))
    if key not in c:
        from attribution.proposal import pilot_proposal

        unet, schedule = _model(run, c)
        ref = _proposal_reference(settings, hflip)
        tensors, meta = curvature_factors(run, lambda: training_images(run, c), ref, progress, unet=unet)
        pre = preconditioner_from_factors(unet, schedule, tensors, meta, 1e-8)
        if progress is not None:
            progress(0, 1, "timestep proposal (pilot)")
        c[key] = pilot_proposal(unet, schedule, training_images(run, c), pre.apply, settings.seed,
                                antithetic=settings.draw_scheme == DrawScheme.ANTITHETIC.value)
        if progress is not None:
            progress(1, 1, "timestep proposal (pilot)")
    return DrawOptions(settings.draw_scheme, hflip, proposal=c[key], train_mode=train_mode)


def _store_dir(run, settings: InfluenceSettings, c: dict) -> Path:
    from attribution.gradients import has_dropout

    unet, _ = _model(run, c)
    args = _store_args(run, settings, num_parameters(kfac_parameters(unet)))
    if has_dropout(unet):
        args["train_mode"] = True  # dropout active in the training gradients (the official code's choice)
    return run.artifact_dir("grad_store", args)


def store_rounds_done(run, settings: InfluenceSettings) -> int:
    """Completed rounds of the store for ``settings`` (0 = none yet). Builds nothing."""
    from attribution.runs import read_json

    d = _store_dir(run, settings, _CACHE.get(run))
    return int(read_json(d / "progress.json")["rounds_done"]) if (d / "progress.json").exists() else 0


def gradient_store(run, settings: InfluenceSettings, progress: Progress = None,
                   rounds: Optional[int] = None) -> Optional[GradientStore]:
    """The run's training-loss gradient store for ``settings`` with at least ``rounds`` completed
    rounds (default: all ``settings.rounds``), built / resumed / grown as needed; None when
    it would exceed the byte budget (then :func:`influence_result` streams). A store that already
    has the rounds is opened without loading the training set."""
    c = _CACHE.get(run)
    unet, schedule = _model(run, c)
    want = settings.rounds if rounds is None else min(int(rounds), settings.rounds)
    d = _store_dir(run, settings, c)
    key = ("store", str(d))
    store = c.get(key)
    if store is not None and store.rounds_done >= want:
        return store
    if store_rounds_done(run, settings) >= want:
        store = GradientStore(d)
        c[key] = store
        return store
    images = training_images(run, c)
    budget = settings.store_budget_bytes if settings.store_budget_bytes is not None else DEFAULT_STORE_BUDGET
    if store_nbytes(images.shape[0], num_parameters(kfac_parameters(unet)), settings.store_dtype) > budget:
        return None
    store = build_gradient_store(d, unet, schedule, images, TRAINING_LOSS, 0, settings.seed,
                                 dtype=settings.store_dtype, progress=progress, rounds=want,
                                 round_draws=settings.round_draws,
                                 options=draw_options(run, settings, progress))
    c[key] = store
    return store


def _query_dir(run, query_set: str, digest: str, m: Measurement, draws: int, seed: int, scheme: str, half: int):
    args = {"samples": query_set, "samples_digest": digest, "measurement": str(m), "draws": draws, "seed": seed}
    if scheme != DrawScheme.IID.value or half:
        args.update(scheme=scheme, half=half)  # plain i.i.d. draws keep the keys they had
    return run.artifact_dir("query_grads", args)


def query_gradients(run, query_set: str, indices: Sequence[int], m: Measurement, draws: int, seed: int,
                    progress: Progress = None, scheme: str = "iid", half: int = 0) -> Tensor:
    """Gradients of ``m`` for the queries ``indices`` of sample set ``query_set``: ``[Q, P]``
    float32, cached in the run per (samples file, measurement, draws, seed, scheme, half).
    ``half`` selects the draw round (0 or 1: the two independent halves of a query's draws)."""
    from attribution.runs import load_tensors, save_tensors

    c = _CACHE.get(run)
    unet, schedule = _model(run, c)
    images, traj, digest = _samples(run, query_set, c)
    idx = _check_indices(indices, images.shape[0], f"query (sample set {query_set!r})")
    d = _query_dir(run, query_set, digest, m, draws, seed, scheme, half)
    key = ("qgrads", str(d))
    have: dict[int, Tensor] = c.get(key)
    if have is None:
        have = {}
        if (d / "grads.safetensors").exists():
            t, _ = load_tensors(d / "grads.safetensors")
            have = {int(i): row for i, row in zip(t["indices"].tolist(), t["grads"])}
        c[key] = have
    missing = sorted(set(idx) - set(have))
    if missing:
        stage = f"query gradients ({m}, {2 * draws} draws in two halves)"
        if progress is not None:
            progress(0, len(missing), stage)
        for start in range(0, len(missing), 4):
            part = missing[start:start + 4]
            g = per_example_gradients(unet, schedule, images[part], m, draws, seed,
                                      trajectory=None if traj is None else traj[:, part],
                                      offset=[QUERY_OFFSET + i for i in part],
                                      options=DrawOptions(scheme=scheme, draw_round=half))
            have.update(zip(part, g))
            if progress is not None:
                progress(start + len(part), len(missing), stage)
        order = sorted(have)
        save_tensors(d / "grads.safetensors",
                     {"indices": torch.tensor(order), "grads": torch.stack([have[i] for i in order])},
                     {"measurement": str(m), "draws": draws, "seed": seed, "scheme": scheme, "half": half})
    return torch.stack([have[i] for i in idx])


def query_gradient_halves(run, query_set: str, indices: Sequence[int], settings: InfluenceSettings,
                          progress: Progress = None) -> tuple[Tensor, Tensor]:
    """The two independent halves (``query_draws / 2`` draws each) of the queries' gradients of the
    approximation measurement: ``([Q, P], [Q, P])``; their mean is the full gradient."""
    m = settings.gradient_measurement
    half = settings.query_draws // 2
    return tuple(query_gradients(run, query_set, indices, m, half, settings.seed, progress,
                                 settings.draw_scheme, h) for h in (0, 1))


def preconditioner(run, settings: InfluenceSettings, progress: Progress = None) -> Preconditioner:
    """The run's (E)KFAC preconditioner for ``settings`` (factors built and saved on first use)."""
    c = _CACHE.get(run)
    unet, schedule = _model(run, c)
    cfg = settings.curvature(run_hflip(run))
    key = ("pre", tuple(sorted(cfg.key().items())))
    pre = c.get(key)
    if pre is None:
        tensors, meta = curvature_factors(run, lambda: training_images(run, c), cfg, progress, unet=unet)
        pre = preconditioner_from_factors(unet, schedule, tensors, meta, settings.damping)
        c[key] = pre
    return pre if pre.damping == settings.damping else pre.with_damping(settings.damping)


@dataclass
class InfluenceResult:
    """Scores with their reliability, estimated from two independent halves of the draws."""

    scores: Tensor  # [Q, N] float32: all completed rounds
    scores_a: Optional[Tensor]  # [Q, N] half A (None while the store has a single round)
    scores_b: Optional[Tensor]
    se: Optional[Tensor]  # [Q, N] moderated standard error of each score
    reliability: Optional[list[Reliability]]  # per query
    rounds_done: int
    rounds_total: int
    train_draws_done: int

    @property
    def preview(self) -> bool:
        return self.rounds_done < self.rounds_total

    def summary(self, q: int = 0) -> dict:
        """JSON-able stability figures of query row ``q``."""
        out = {"rounds_done": self.rounds_done, "rounds_total": self.rounds_total,
               "train_draws_done": self.train_draws_done, "preview": self.preview}
        if self.reliability is not None:
            out.update(self.reliability[q].as_dict())
        return out


def _precondition_halves(run, settings, idx, qset, progress, unet):
    qa, qb = query_gradient_halves(run, qset, idx, settings, progress)
    pre = preconditioner(run, settings, progress)
    blocks = int8_blocks([p.numel() for p in kfac_parameters(unet)])
    pa = precondition_queries(pre, qa, settings.compress_queries, blocks)
    pb = precondition_queries(pre, qb, settings.compress_queries, blocks)
    return pa.float(), pb.float(), ((pa + pb) / 2).float()


def influence_result(run, query_set: str, query_indices: Sequence[int], settings: InfluenceSettings,
                     progress: Progress = None, rounds: Optional[int] = None, k: int = 16) -> InfluenceResult:
    """tau for each requested query (rows) and training example (columns), with its reliability.

    Builds and caches in ``run`` whatever is missing (gradient store up to ``rounds`` rounds —
    default all of ``settings.rounds``; a store with more completed rounds is used whole —,
    factors, query gradients); once they exist a call only re-preconditions the queries and
    multiplies with the store. ``progress(done, total, stage)`` reports long stages.
    """
    c = _CACHE.get(run)
    unet, schedule = _model(run, c)
    idx = tuple(int(i) for i in query_indices)
    pq_key = ("pq", query_set, idx, str(settings.gradient_measurement), settings.query_draws, settings.seed,
              settings.compress_queries, settings.draw_scheme,
              tuple(sorted(settings.curvature(run_hflip(run)).key().items())), settings.damping)
    lru = c.setdefault("lru", {})
    pqs = lru.get(pq_key)
    if pqs is None:
        pqs = _precondition_halves(run, settings, idx, query_set, progress, unet)
        _remember(lru, pq_key, pqs)
    pa, pb, pq = pqs
    store = gradient_store(run, settings, progress, rounds)
    if store is not None:
        score_key = ("scores", pq_key, settings.train_draws, settings.preview_draws, settings.store_dtype,
                     store.dir.name, store.rounds_done)
        if score_key in lru:
            return lru[score_key]
        tau_a, tau_b, tau = store.score_halves((pa, pb), pq)
        if store.n != tau.shape[1]:
            raise UserError("the gradient store does not match the training set; delete it and rebuild")
        done = store.rounds_done
    else:
        score_key = None
        done = settings.rounds if rounds is None else min(int(rounds), settings.rounds)
        tau_a, tau_b, tau = _streamed_scores(run, settings, pa, pb, pq, done, progress, c)
    check_scores(tau)
    se = moderated_se(tau_a, tau_b) if tau_a is not None else None
    rel = reliability(tau_a, tau_b, tau, k) if tau_a is not None else None
    res = InfluenceResult(tau.float(), None if tau_a is None else tau_a.float(),
                          None if tau_b is None else tau_b.float(), None if se is None else se.float(), rel,
                          done, settings.rounds, sum(settings.round_draws[:done]))
    if score_key is not None:
        _remember(lru, score_key, res)
    return res


def _streamed_scores(run, settings, pa, pb, pq, rounds, progress, c):
    """Scores without a store (too large for the byte budget): each round's training gradients are
    computed once per chunk and scored against the stacked queries."""
    unet, schedule = _model(run, c)
    images = training_images(run, c)
    n, chunk, Q = images.shape[0], 64, pq.shape[0]
    sums = [torch.zeros(2 * Q, n), torch.zeros(2 * Q, n)]  # draw-weighted sums per half
    stacked = (torch.cat([pa, pq]), torch.cat([pb, pq]))
    base = draw_options(run, settings, progress)
    for r in range(rounds):
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            g = per_example_gradients(unet, schedule, images[start:stop], TRAINING_LOSS, settings.round_draws[r],
                                      settings.seed, offset=start,
                                      options=DrawOptions(base.scheme, base.hflip, r, base.proposal,
                                                          base.train_mode))
            sums[r % 2][:, start:stop] += settings.round_draws[r] * (stacked[r % 2] @ g.T)
            if progress is not None:
                progress(r * n + stop, rounds * n, "streaming training gradients")
    counts = [sum(d for i, d in enumerate(settings.round_draws[:rounds]) if i % 2 == h) for h in (0, 1)]
    means = [s / max(cnt, 1) for s, cnt in zip(sums, counts)]
    tau = (sums[0][Q:] + sums[1][Q:]) / sum(counts)
    if rounds < 2:
        return None, None, tau
    return means[0][:Q], means[1][:Q], tau


def influence_scores(run, query_set: str, query_indices: Sequence[int], settings: InfluenceSettings,
                     progress: Progress = None, rounds: Optional[int] = None) -> Tensor:
    """tau ``[Q, N]`` float32 (see :func:`influence_result`, which also gives the reliability)."""
    return influence_result(run, query_set, query_indices, settings, progress, rounds).scores.clone()


def influence_status(run, query_set: str, query_indices: Sequence[int], settings: InfluenceSettings,
                     rounds: Optional[int] = None) -> dict:
    """Which artifacts :func:`influence_scores` would reuse: ``{"store", "factors",
    "query_gradients": bool}`` (all True = scoring takes about a second; otherwise run it as a
    background job with a progress callback), plus ``"store_rounds_done"`` / ``"store_rounds_total"``
    and ``"preview"`` (a store with at least PREVIEW_ROUNDS rounds can already be scored).
    ``rounds``: "store" is True once that many rounds are complete (default: all of them).
    Builds nothing."""
    from attribution.runs import load_tensors

    c = _CACHE.get(run)
    done = store_rounds_done(run, settings)
    cfg = settings.curvature(run_hflip(run))
    factors_ok = (run.artifact_dir("curvature", cfg.key()) / "factors.safetensors").exists()
    _, _, digest = _samples(run, query_set, c)
    q_ok = True
    for h in (0, 1):
        qd = _query_dir(run, query_set, digest, settings.gradient_measurement, settings.query_draws // 2,
                        settings.seed, settings.draw_scheme, h)
        have = set(load_tensors(qd / "grads.safetensors")[0]["indices"].tolist()) \
            if (qd / "grads.safetensors").exists() else set()
        q_ok = q_ok and set(int(i) for i in query_indices) <= have
    want = settings.rounds if rounds is None else min(int(rounds), settings.rounds)
    return {"store": done >= want, "factors": factors_ok, "query_gradients": q_ok,
            "store_rounds_done": done, "store_rounds_total": settings.rounds,
            "preview": done >= min(PREVIEW_ROUNDS, settings.rounds)}


def _remember(lru: dict, key, value, size: int = 24) -> None:
    """Insert into a small in-process LRU (dicts keep insertion order)."""
    lru.pop(key, None)
    lru[key] = value
    while len(lru) > size:
        lru.pop(next(iter(lru)))


def run_training_table(run) -> list[dict]:
    """``[{"index", "id", "label"}]`` for the run's training set (cached in the run: loading the
    dataset itself can take seconds)."""
    from attribution.runs import read_json, write_json

    d = run.artifact_dir("train_table", {"dataset": run.config.get("dataset"), "subset": run.config.get("subset")})
    path = d / "table.json"
    if path.exists():
        return read_json(path)
    ds = run.dataset()
    table = [{"index": i, "id": ds.ids[i], "label": ds.label_name(int(ds.labels[i]))} for i in range(len(ds))]
    write_json(path, table)
    return table
