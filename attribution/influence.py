"""Influence scores tau(x', x_j) = grad m(x')^T (G + lambda I)^{-1} grad l(x_j) (method.md §2, §5).

Sign: tau > 0 means removing x_j is predicted to INCREASE the measurement of x' (a proponent for
loss-like measurements); the predicted change of m after removing a set I is (1/N) sum_{j in I} tau_j.

Pipeline (everything cached in the run, so re-scoring only re-preconditions the queries):
training-loss gradients -> gradient store (disk, fp16/int8); (E)KFAC factors -> run
(safetensors); query gradients of the *approximation measurement* -> run; preconditioned
queries @ store^T -> scores ``[Q, N]``. When the store would exceed a byte budget, scoring
streams the training gradients instead (queries preconditioned first, each training gradient
computed once and scored against all queries).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from attribution.curvature import CurvatureConfig, Preconditioner, curvature_factors, preconditioner_from_factors
from attribution.errors import UserError
from attribution.gradients import (
    GradientStore,
    build_gradient_store,
    dequantize_rows,
    kfac_parameters,
    num_parameters,
    per_example_gradients,
    quantize_rows,
    store_nbytes,
)
from attribution.measurements import Measurement, parse_measurement

Progress = Optional[Callable[[int, int, str], None]]

# Query draws are keyed by (seed, QUERY_OFFSET + query index), so a query never shares its
# (t, eps) draws with the training example of the same index.
QUERY_OFFSET = 10**9
DEFAULT_STORE_BUDGET = 8 * 2**30  # bytes of disk a gradient store may take before streaming
TRAINING_LOSS = Measurement("loss")


@dataclass(frozen=True)
class InfluenceSettings:
    method: str = "kfac"  # "kfac" | "ekfac"
    fisher: str = "mc"  # "mc" | "empirical"
    kfac_type: str = "expand"  # "expand" | "reduce"
    damping: float = 1e-8  # the paper's lambda: added to the GGN of the loss averaged over examples AND pixels
    measurement: str = "loss"  # measurement being explained (parse_measurement syntax)
    approx_measurement: Optional[str] = None  # measurement whose gradient is used; None = same
    train_draws: int = 32  # (t, eps) draws per training gradient (the store)
    query_draws: int = 64  # draws per query gradient
    seed: int = 0
    compress_queries: bool = False  # int8 preconditioned queries
    factor_draws: int = 8  # (t, eps) draws per training example for the Kronecker factors
    store_dtype: str = "float16"  # "float16" | "int8"
    store_budget_bytes: Optional[int] = None  # None = DEFAULT_STORE_BUDGET

    def __post_init__(self):
        if self.method not in ("kfac", "ekfac"):
            raise UserError(f"unknown influence method {self.method!r}; choose kfac or ekfac")
        CurvatureConfig(self.method, self.fisher, self.kfac_type)  # validates the names
        parse_measurement(self.measurement)
        if self.approx_measurement is not None:
            parse_measurement(self.approx_measurement)
        if not (self.damping >= 0 and math.isfinite(self.damping)):
            raise UserError(f"damping must be a finite number >= 0, got {self.damping}")
        if min(self.train_draws, self.query_draws, self.factor_draws) < 1:
            raise UserError("the numbers of draws must be >= 1")

    @property
    def gradient_measurement(self) -> Measurement:
        """The measurement whose gradient enters the scores (measurement substitution)."""
        return parse_measurement(self.approx_measurement or self.measurement)

    def curvature(self) -> CurvatureConfig:
        return CurvatureConfig(self.method, self.fisher, self.kfac_type, self.factor_draws, self.seed)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- scoring core


# int8 query compression: one float32 scale per QUERY_INT8_BLOCK consecutive entries of a parameter
# tensor (3.2x smaller than float32). Preconditioned queries at small damping span many orders of
# magnitude even within a layer; on the micro fixture at lambda = 1e-8 the mean Spearman with the
# float32 scores is 0.79 with one scale per row, 0.97 per tensor, 0.985 / 0.99 with 64 / 16 blocks.
QUERY_INT8_BLOCK = 16


def int8_blocks(sizes: Sequence[int], block: int = QUERY_INT8_BLOCK) -> list[int]:
    """Split each parameter tensor's ``size`` into blocks of ``block`` entries (last one shorter)."""
    out: list[int] = []
    for n in sizes:
        out += [block] * (n // block) + ([n % block] if n % block else [])
    return out


def compress_int8(x: Tensor, blocks: Optional[Sequence[int]] = None) -> Tensor:
    """int8 round trip with one absmax scale per row and block (parameter tensor): ``[Q, P]``."""
    values, scales = quantize_rows(x, "int8", blocks)
    return dequantize_rows(values, scales, blocks).to(x.dtype)


def precondition_queries(pre: Preconditioner, query_grads: Tensor, compress: bool = False,
                         blocks: Optional[Sequence[int]] = None) -> Tensor:
    """(G + lambda I)^{-1} grad m for each query row: ``[Q, P]`` float64 (int8 round trip if asked,
    with per-parameter-tensor scales ``blocks``)."""
    out = pre.apply(query_grads)
    return compress_int8(out, blocks) if compress else out


def score_chunks(precond_queries: Tensor, train_chunks: Iterable[Tensor]) -> Tensor:
    """Streaming scores: each chunk ``[n_k, P]`` of training gradients is scored once: ``[Q, N]``."""
    parts = [precond_queries @ chunk.to(precond_queries.dtype).T for chunk in train_chunks]
    return torch.cat(parts, dim=1)


def check_scores(scores: Tensor) -> Tensor:
    """Guardrails: NaN / inf scores, or identical scores for every query, raise a UserError."""
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise UserError(f"{bad} influence scores are NaN or infinite: the damping is probably too small "
                        "for these factors (try a larger --damping) or the gradients overflowed")
    if scores.shape[0] > 1 and scores.shape[1] > 1:
        spread = (scores - scores[:1]).abs().max()
        if float(spread) <= 1e-12 * float(scores.abs().max().clamp_min(1e-300)):
            raise UserError("every query got identical influence scores; the query gradients do not depend "
                            "on the query (check the measurement and the query samples)")
    return scores


def top_k(scores_row: Tensor, k: int) -> dict[str, list[tuple[int, float]]]:
    """The ``k`` most positive (tau > 0, largest first), most negative (tau < 0, most negative first)
    and most neutral (smallest |tau|) training examples of one query's scores ``[N]``."""
    s = scores_row.detach().double().cpu()
    k = max(0, min(int(k), s.numel()))
    pos_idx = torch.argsort(s, descending=True)[:k]
    neg_idx = torch.argsort(s)[:k]
    neu_idx = torch.argsort(s.abs())[:k]
    return {
        "positive": [(int(i), float(s[i])) for i in pos_idx if s[i] > 0],
        "negative": [(int(i), float(s[i])) for i in neg_idx if s[i] < 0],
        "neutral": [(int(i), float(s[i])) for i in neu_idx],
    }


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


def gradient_store(run, settings: InfluenceSettings, progress: Progress = None) -> Optional[GradientStore]:
    """The run's training-loss gradient store for ``settings`` (built / resumed as needed), or
    None when it would exceed the byte budget (then :func:`influence_scores` streams).
    A complete store is opened without loading the training set."""
    c = _CACHE.get(run)
    unet, schedule = _model(run, c)
    p = num_parameters(kfac_parameters(unet))
    args = {"measurement": str(TRAINING_LOSS), "draws": settings.train_draws, "seed": settings.seed,
            "dtype": settings.store_dtype, "params": "kfac", "p": p}
    key = ("store", tuple(sorted(args.items())))
    store = c.get(key)
    if store is not None and store.complete:
        return store
    d = run.artifact_dir("grad_store", args)
    if (d / "progress.json").exists() and (d / "store.json").exists():
        store = GradientStore(d)
        if store.complete:
            c[key] = store
            return store
    images = training_images(run, c)
    budget = settings.store_budget_bytes if settings.store_budget_bytes is not None else DEFAULT_STORE_BUDGET
    if store_nbytes(images.shape[0], p, settings.store_dtype) > budget:
        return None
    store = build_gradient_store(d, unet, schedule, images, TRAINING_LOSS, settings.train_draws,
                                 settings.seed, dtype=settings.store_dtype, progress=progress)
    c[key] = store
    return store


def query_gradients(run, query_set: str, indices: Sequence[int], m: Measurement, draws: int, seed: int,
                    progress: Progress = None) -> Tensor:
    """Gradients of ``m`` for the queries ``indices`` of sample set ``query_set``: ``[Q, P]``
    float32, cached in the run per (samples file, measurement, draws, seed)."""
    from attribution.runs import load_tensors, save_tensors

    c = _CACHE.get(run)
    unet, schedule = _model(run, c)
    images, traj, digest = _samples(run, query_set, c)
    idx = _check_indices(indices, images.shape[0], f"query (sample set {query_set!r})")
    d = run.artifact_dir("query_grads", {"samples": query_set, "samples_digest": digest,
                                         "measurement": str(m), "draws": draws, "seed": seed})
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
        if progress is not None:
            progress(0, len(missing), f"query gradients ({m})")
        for start in range(0, len(missing), 4):
            part = missing[start:start + 4]
            g = per_example_gradients(unet, schedule, images[part], m, draws, seed,
                                      trajectory=None if traj is None else traj[:, part],
                                      offset=[QUERY_OFFSET + i for i in part])
            have.update(zip(part, g))
            if progress is not None:
                progress(start + len(part), len(missing), f"query gradients ({m})")
        order = sorted(have)
        save_tensors(d / "grads.safetensors",
                     {"indices": torch.tensor(order), "grads": torch.stack([have[i] for i in order])},
                     {"measurement": str(m), "draws": draws, "seed": seed})
    return torch.stack([have[i] for i in idx])


def preconditioner(run, settings: InfluenceSettings, progress: Progress = None) -> Preconditioner:
    """The run's (E)KFAC preconditioner for ``settings`` (factors built and saved on first use)."""
    c = _CACHE.get(run)
    unet, schedule = _model(run, c)
    cfg = settings.curvature()
    key = ("pre", tuple(sorted(cfg.key().items())))
    pre = c.get(key)
    if pre is None:
        tensors, meta = curvature_factors(run, lambda: training_images(run, c), cfg, progress, unet=unet)
        pre = preconditioner_from_factors(unet, schedule, tensors, meta, settings.damping)
        c[key] = pre
    return pre if pre.damping == settings.damping else pre.with_damping(settings.damping)


def influence_scores(run, query_set: str, query_indices: Sequence[int], settings: InfluenceSettings,
                     progress: Progress = None) -> Tensor:
    """tau for each requested query (rows) and training example (columns): ``[Q, N]`` float32.

    Builds and caches in ``run`` whatever is missing (gradient store, factors, query gradients);
    once they exist a call only re-preconditions the queries and multiplies with the store.
    ``progress(done, total, stage)`` reports long stages.
    """
    c = _CACHE.get(run)
    unet, schedule = _model(run, c)
    m = settings.gradient_measurement
    idx = tuple(int(i) for i in query_indices)
    pq_key = ("pq", query_set, idx, str(m), settings.query_draws, settings.seed, settings.compress_queries,
              tuple(sorted(settings.curvature().key().items())), settings.damping)
    score_key = ("scores", pq_key, settings.train_draws, settings.store_dtype, settings.store_budget_bytes)
    lru = c.setdefault("lru", {})
    if score_key in lru:
        return lru[score_key].clone()
    pq = lru.get(pq_key)
    if pq is None:
        qgrads = query_gradients(run, query_set, idx, m, settings.query_draws, settings.seed, progress)
        pre = preconditioner(run, settings, progress)
        blocks = int8_blocks([p.numel() for p in kfac_parameters(unet)])
        pq = precondition_queries(pre, qgrads, settings.compress_queries, blocks).float()
        _remember(lru, pq_key, pq)
    store = gradient_store(run, settings, progress)
    if store is not None:
        scores = store.score(pq)
        if store.n != scores.shape[1]:
            raise UserError("the gradient store does not match the training set; delete it and rebuild")
    else:
        images = training_images(run, c)
        n, chunk = images.shape[0], 64

        def chunks():
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                yield per_example_gradients(unet, schedule, images[start:stop], TRAINING_LOSS, settings.train_draws,
                                            settings.seed, offset=start)
                if progress is not None:
                    progress(stop, n, "streaming training gradients")

        scores = score_chunks(pq, chunks())
    check_scores(scores)
    _remember(lru, score_key, scores)
    return scores.clone()


def influence_status(run, query_set: str, query_indices: Sequence[int], settings: InfluenceSettings) -> dict:
    """Which artifacts :func:`influence_scores` would reuse: ``{"store", "factors",
    "query_gradients": bool}`` (all True = scoring takes about a second; otherwise run it as a
    background job with a progress callback). Builds nothing."""
    from attribution.runs import load_tensors

    c = _CACHE.get(run)
    unet, _ = _model(run, c)
    p = num_parameters(kfac_parameters(unet))
    args = {"measurement": str(TRAINING_LOSS), "draws": settings.train_draws, "seed": settings.seed,
            "dtype": settings.store_dtype, "params": "kfac", "p": p}
    d = run.artifact_dir("grad_store", args)
    store_ok = (d / "progress.json").exists() and (d / "store.json").exists() and GradientStore(d).complete
    factors_ok = (run.artifact_dir("curvature", settings.curvature().key()) / "factors.safetensors").exists()
    _, _, digest = _samples(run, query_set, c)
    m = settings.gradient_measurement
    qd = run.artifact_dir("query_grads", {"samples": query_set, "samples_digest": digest, "measurement": str(m),
                                          "draws": settings.query_draws, "seed": settings.seed})
    q_ok = False
    if (qd / "grads.safetensors").exists():
        have = set(load_tensors(qd / "grads.safetensors")[0]["indices"].tolist())
        q_ok = set(int(i) for i in query_indices) <= have
    return {"store": bool(store_ok), "factors": factors_ok, "query_gradients": q_ok}


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
