"""LDS benchmark jobs and counterfactual retraining (method.md §7): retrain, measure, store.

Layout inside a run directory::

    lds/<job-key>/subset_<m>_seed_<r>/      retrained run directories (ordinary runs)
        measurements/<meas-key>.safetensors   {"values": [Q] float64}
    lds/<job-key>/full_model/measurements/   the original model's measurements (same draws)
    lds/<job-key>/progress_<shard>.json      {"stage", "done", "total", "eta_s", ...}
    lds/cf-<job-key>/...                     counterfactual retraining (attribution.counterfactual)
    lds_truth/<job-key>/<meas-key>_M<M>_R<R>.safetensors   assembled ground truth (masks, values, base)

The job key hashes only what changes the retrained models (model fingerprint, training recipe,
alpha, subset seed, steps), so a job can be extended with more subsets or seeds, and measured
with new measurements, without retraining anything. Every file is written atomically and a
finished model or measurement is never redone; several processes may work on one job, each on
its own shard of the (subset, seed) units.

Steps rule (stated in every job's args): by default a retrained model trains for
``round(alpha * run_steps)`` steps at the run's batch size, the paper's rule (half the data,
half the steps, i.e. the same number of epochs); ``steps=`` overrides it for a cheaper benchmark.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from attribution.errors import UserError
from attribution.lds import GroundTruth, draw_subset_masks
from attribution.runs import Run, config_hash, load_tensors, read_json, save_tensors, write_json

DEFAULT_LT_GRID = (0, 49, 99, 199, 499, 799)  # 0-indexed timesteps (paper's t = 1, 50, 100, 200, 500, 800)
DEFAULT_MEASUREMENTS = ("loss", "elbo", "elbo-simple", "trajectory") + tuple(f"lt:{t}" for t in DEFAULT_LT_GRID)

RETRAIN_CHECKPOINT_EVERY = 50  # steps between checkpoints of a retrained model (cheap: tiny models)
# Ground-truth and counterfactual measurements draw their (t, eps) with keys TRUTH_OFFSET + query
# index: a stream of their own, shared neither with training example i's draws (keys 0..N-1) nor
# with the query gradients' (influence.QUERY_OFFSET + i). The stream's tag is part of every
# measurement key, so files measured on the old stream (key = query index, "legacy") are never
# mixed with new ones; stored ground truth says which stream it used in its "draw_stream".
TRUTH_OFFSET = 2 * 10**9
TRUTH_STREAM = "t2e9"
LEGACY_STREAM = "legacy"
ProgressFn = Callable[[int, int, str], None]  # (done, total, stage)
# measure_fn(unet, schedule, images [Q,C,H,W], measurement text, num_draws, seed, trajectory) -> [Q] float64
MeasureFn = Callable[..., Tensor]


def _default_measure(unet, schedule, images, text, num_draws, seed, trajectory=None, batch_size=256):
    """The measurement on the ground-truth draw stream (query q keyed TRUTH_OFFSET + q)."""
    from attribution.measurements import measurement_values, parse_measurement

    return measurement_values(unet, schedule, images, parse_measurement(text), num_draws, seed,
                              trajectory=trajectory, batch_size=batch_size, offset=TRUTH_OFFSET)


def canonical_measurement(text: str) -> str:
    """``"LT=500"`` -> ``"lt:500"`` (validated by measurements.parse_measurement)."""
    from attribution.measurements import parse_measurement

    return str(parse_measurement(text))


# ----------------------------------------------------------------------------- job spec


@dataclass(frozen=True)
class LDSJob:
    """One LDS benchmark: M subsets x R seeds, measured on a query sample set."""

    num_subsets: int = 32
    num_seeds: int = 2
    alpha: float = 0.5
    subset_seed: int = 0
    steps: Optional[int] = None  # None: round(alpha * the run's steps) (paper's rule)
    warmup_steps: Optional[int] = None  # None: the run's learning-rate warm-up
    query_set: str = "queries"
    measurements: tuple[str, ...] = DEFAULT_MEASUREMENTS
    num_draws: int = 1000  # MC draws per query and measurement (paper: 5000)
    measure_seed: int = 0  # the same (t, eps) draws for every model
    batch_size: int = 256  # forward-pass batch of the measurements (no effect on values)
    # Paired seeds: seed r of every subset uses the same initialisation and the same stream of
    # batch positions, timesteps and noise, so models of different subsets differ only by their
    # data. Noise common to all subsets then shifts every subset's measurement alike and drops out
    # of the Spearman correlation across subsets (common random numbers for training). The LDS
    # target, the seed-averaged measurement, is the same quantity either way.
    paired_seeds: bool = True

    def __post_init__(self):
        if self.num_subsets < 1 or self.num_seeds < 1:
            raise UserError("the numbers of subsets and seeds must be positive")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"steps must be positive, got {self.steps}")
        if self.num_draws < 1:
            raise UserError(f"the number of MC draws must be positive, got {self.num_draws}")
        if not self.measurements:
            raise UserError("give at least one measurement")


def retrain_steps(run: Run, job: LDSJob) -> int:
    return job.steps if job.steps is not None else max(1, round(job.alpha * run.config["train"]["steps"]))


def train_indices(run: Run) -> list[int]:
    """Dataset indices of the run's training set (its own subset, if it was trained on one)."""
    sub = run.config.get("subset")
    if sub is not None:
        return [int(i) for i in sub]
    return list(range(len(_dataset_images(json.dumps(run.dataset_spec(), sort_keys=True)))))


def job_args(run: Run, job: LDSJob) -> dict:
    """What determines the retrained models (the job key hashes this).

    The full model's weights are not part of it: retrained models depend only on the data, the
    recipe and the subsets, so retraining can start while the full model is still training.
    """
    cfg = run.config
    return {"dataset": cfg["dataset"], "run_subset": cfg.get("subset"), "train": cfg["train"],
            "alpha": job.alpha, "subset_seed": job.subset_seed, "steps": retrain_steps(run, job),
            "warmup_steps": job.warmup_steps if job.warmup_steps is not None else cfg["train"]["warmup_steps"],
            "steps_rule": "explicit" if job.steps is not None else "alpha * run steps",
            # only when set, so jobs with independent seeds keep the keys they had before the option
            **({"paired_seeds": True} if job.paired_seeds else {})}


def job_dir(run: Run, job: LDSJob) -> Path:
    return run.path / "lds" / config_hash(job_args(run, job))


def unit_dir(run: Run, job: LDSJob, m: int, r: int) -> Path:
    return job_dir(run, job) / f"subset_{m}_seed_{r}"


def unit_seed(m: int, r: int, paired: bool = False) -> int:
    """Training seed of subset m, seed r (never the usual seed 0).

    Paired: the same for every subset (depends on r only); otherwise distinct for every (m, r).
    """
    return 10_000 * (r + 1) + (0 if paired else m)


def measurement_key(job, text: str, queries_digest: str) -> str:
    """File stem of one measurement: measurement, MC draws, draw seed, query set, its digest and
    the draw stream (``job``: an :class:`LDSJob` or :class:`CounterfactualJob`)."""
    return (f"{text.replace(':', '-')}_d{job.num_draws}_s{job.measure_seed}_{job.query_set}_{queries_digest}"
            f"_{TRUTH_STREAM}")


def measurement_meta(job, text: str) -> dict:
    """Metadata stored with one model's measurement file."""
    return {"measurement": text, "num_draws": job.num_draws, "seed": job.measure_seed, "query_set": job.query_set,
            "draw_stream": TRUTH_STREAM, "draw_offset": TRUTH_OFFSET}


def queries_digest(run: Run, job) -> str:
    """Short digest of the query sample file (a redrawn query set gets new measurements)."""
    from attribution.runs import file_digest

    path = run.path / "samples" / f"{job.query_set}.safetensors"
    if not path.exists():
        run.load_samples(job.query_set)  # raises the usual "no sample set" error
    return file_digest(path, 8)


def subset_masks(run: Run, job: LDSJob) -> Tensor:
    """``[M, N]`` bool, True = kept (N = the run's training-set size)."""
    return draw_subset_masks(len(train_indices(run)), job.num_subsets, job.alpha, job.subset_seed)


def units(job: LDSJob, shard: tuple[int, int] = (0, 1)) -> list[tuple[int, int]]:
    """(subset, seed) pairs of this shard, seed-major so every subset gets its first seed first."""
    i, k = shard
    if not 0 <= i < k:
        raise UserError(f"shard must be i/k with 0 <= i < k, got {i}/{k}")
    allu = [(m, r) for r in range(job.num_seeds) for m in range(job.num_subsets)]
    return [u for n, u in enumerate(allu) if n % k == i]


# ----------------------------------------------------------------------------- progress


class _Progress:
    """Forwards ``(done, total, stage)`` and records it (with an ETA) in a JSON file."""

    def __init__(self, path: Path, callback: Optional[ProgressFn], every_s: float = 5.0):
        self.path, self.callback, self.every_s = path, callback, every_s
        self.stage, self.t0, self.done0, self.last = None, time.time(), 0, 0.0

    def __call__(self, done: int, total: int, stage: str, force: bool = False) -> None:
        if stage != self.stage:
            self.stage, self.t0, self.done0 = stage, time.time(), done
        if self.callback is not None:
            self.callback(done, total, stage)
        now = time.time()
        if force or now - self.last >= self.every_s or done >= total:
            rate = (done - self.done0) / max(now - self.t0, 1e-9)
            eta = (total - done) / rate if rate > 0 else None
            write_json(self.path, {"stage": stage, "done": done, "total": total,
                                   "eta_s": eta, "updated": now})
            self.last = now


def read_progress(run: Run, job: LDSJob) -> list[dict]:
    """Progress records of every shard of the job."""
    return [read_json(p) for p in sorted(job_dir(run, job).glob("progress_*.json"))]


# ----------------------------------------------------------------------------- training


@lru_cache(maxsize=4)
def _dataset_images(spec_json: str) -> Tensor:
    """All images of a dataset spec ``[N, C, H, W]`` (cached: loading mnist5k takes seconds)."""
    from attribution.data import load_dataset

    return load_dataset(_spec(json.loads(spec_json))).tensors()


def _spec(d: dict):
    from attribution.data import DatasetSpec

    return DatasetSpec(**{k: tuple(v) if k == "classes" and v is not None else v for k, v in d.items()})


def _fit_subset(out: Path, spec_dict: dict, cfg, subset: list[int], progress, should_stop, device,
                images: Optional[Tensor] = None) -> None:
    """train.train_run's work (same config.json, same loop) on the cached dataset tensors
    (``images``: the dataset's ``[N, C, H, W]`` when they travelled with a task)."""
    from attribution.train import fit, run_config

    if images is None:
        images = _dataset_images(json.dumps(spec_dict, sort_keys=True))
    config = run_config(_spec(spec_dict), cfg, subset, images.shape[-1], images.shape[1])
    if (out / "config.json").exists():
        if read_json(out / "config.json") != json.loads(json.dumps(config)):
            raise UserError(f"{out} holds a run with a different configuration; delete it")
    else:
        write_json(out / "config.json", config)
    fit(Run(out), images[subset].to(device), cfg, progress=progress, should_stop=should_stop)


def retrain_config(run: Run, steps: int, seed: int, warmup_steps: Optional[int] = None):
    """The run's TrainConfig for a retrained model (``steps``, ``seed``, optional warm-up)."""
    from attribution.train import TrainConfig

    cfg = replace(TrainConfig(**run.config["train"]), steps=steps, seed=seed,
                  checkpoint_every=min(RETRAIN_CHECKPOINT_EVERY, steps))
    return replace(cfg, warmup_steps=warmup_steps) if warmup_steps is not None else cfg


def _retrain(run: Run, out: Path, indices: Sequence[int], steps: int, seed: int,
             progress: Optional[Callable[[int, int, float], None]], should_stop, device,
             train_fn=None, warmup_steps: Optional[int] = None) -> bool:
    """Train one model on ``indices`` (positions in the run's training set). True when finished.

    ``train_fn(out, spec_dict, cfg, subset, progress, should_stop, device)`` defaults to
    :func:`_fit_subset`.
    """
    if Run(out).has_model():
        return True
    base = train_indices(run)
    cfg = retrain_config(run, steps, seed, warmup_steps)
    (train_fn or _fit_subset)(out, run.dataset_spec(), cfg, sorted(base[i] for i in indices),
                              progress, should_stop, device)
    done = Run(out).has_model()
    if done:
        shutil.rmtree(out / "train_state", ignore_errors=True)  # optimizer state is not needed again
    return done


def _measure_dir(path: Path, unet, run: Run, job: LDSJob, queries: dict, qd: str, measure_fn: MeasureFn,
                 on_done: Callable[[], None], should_stop) -> bool:
    """Measure every missing measurement of one model into ``path/measurements``. False if stopped."""
    schedule = run.schedule()
    for text in job.measurements:
        out = path / "measurements" / f"{measurement_key(job, text, qd)}.safetensors"
        if out.exists():
            continue
        if should_stop is not None and should_stop():
            return False
        with torch.no_grad():
            vals = measure_fn(unet, schedule, queries["images"], text, job.num_draws, job.measure_seed,
                              trajectory=queries.get("trajectory"), batch_size=job.batch_size)
        vals = torch.as_tensor(vals).double().cpu()
        if vals.shape != (queries["images"].shape[0],) or not torch.isfinite(vals).all():
            raise UserError(f"measurement {text} gave invalid values (shape {tuple(vals.shape)}, NaN or inf)")
        save_tensors(out, {"values": vals}, measurement_meta(job, text))
        on_done()
    return True


def run_lds_job(
    run: Run,
    job: LDSJob,
    stages: Sequence[str] = ("train", "measure"),
    shard: tuple[int, int] = (0, 1),
    progress: Optional[ProgressFn] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    device: Optional[torch.device] = None,
    measure_fn: Optional[MeasureFn] = None,
    train_fn=None,
    executor=None,
) -> bool:
    """Retrain (stage "train") and measure (stage "measure") this shard's models. Resumable.

    Returns True when this shard's requested stages are complete, False when ``should_stop``
    ended it early (call again to resume). ``progress(done, total, stage)``: training counts
    optimizer steps, measuring counts (model, measurement) pairs. ``executor``: an
    :class:`attribution.executor.Executor` that is not inline (a local pool or Ray) runs every
    (subset, seed) unit as a task instead (:func:`attribution.retrain_units.run_lds_units`;
    no shard, ``measure_fn`` or ``train_fn`` then).
    """
    from attribution.ddpm import default_device

    bad = set(stages) - {"train", "measure"}
    if bad:
        raise UserError(f"unknown stage(s) {sorted(bad)}; use train and/or measure")
    if executor is not None and not executor.inline:
        from attribution.retrain_units import run_lds_units

        return run_lds_units(run, job, executor, stages, progress, should_stop)
    device = device or default_device()
    jd = job_dir(run, job)
    write_json(jd / "job.json", {**job_args(run, job), "run": str(run.path)})
    masks = subset_masks(run, job)
    steps = retrain_steps(run, job)
    mine = units(job, shard)
    rec = _Progress(jd / f"progress_{shard[0]}of{shard[1]}.json", progress)

    if "train" in stages:
        todo = [u for u in mine if not Run(unit_dir(run, job, *u)).has_model()]
        total, finished = len(mine) * steps, (len(mine) - len(todo)) * steps
        rec(finished, total, "train", force=True)
        for m, r in todo:
            step_cb = lambda s, _t, _l, base=finished: rec(base + s, total, "train")  # noqa: E731
            ok = _retrain(run, unit_dir(run, job, m, r), torch.nonzero(masks[m]).flatten().tolist(),
                          steps, unit_seed(m, r, job.paired_seeds), step_cb, should_stop, device, train_fn, job.warmup_steps)
            if not ok:
                return False
            finished += steps
            rec(finished, total, "train", force=True)

    if "measure" in stages:
        queries, _ = run.load_samples(job.query_set)
        qd = queries_digest(run, job)
        if any(t == "trajectory" for t in job.measurements) and "trajectory" not in queries:
            raise UserError(f"sample set {job.query_set!r} has no trajectories; redraw it with --trajectory")
        targets = [(unit_dir(run, job, m, r), None) for m, r in mine]
        if shard[0] == 0:
            targets = [(jd / "full_model", run.model_dir)] + targets
        missing = [p for p, _ in targets if not (p / "model" / "config.json").exists()]
        missing = [p for p in missing if p.name != "full_model"]
        if missing:
            raise UserError(f"{len(missing)} retrained models are missing (e.g. {missing[0]}); run the train stage first")
        total = len(targets) * len(job.measurements)
        count = [sum(1 for p, _ in targets for t in job.measurements
                     if (p / "measurements" / f"{measurement_key(job, t, qd)}.safetensors").exists())]
        rec(count[0], total, "measure", force=True)

        def bump():
            count[0] += 1
            rec(count[0], total, "measure")

        fn = measure_fn or _default_measure
        for path, model_dir in targets:
            if all((path / "measurements" / f"{measurement_key(job, t, qd)}.safetensors").exists()
                   for t in job.measurements):
                continue
            unet = (run if model_dir is not None else Run(path)).load_unet(device)
            if not _measure_dir(path, unet, run, job, queries, qd, fn, bump, should_stop):
                return False
        rec(count[0], total, "measure", force=True)
    return True


# ----------------------------------------------------------------------------- ground truth


def truth_dir(run: Run, job: LDSJob) -> Path:
    return run.path / "lds_truth" / job_dir(run, job).name


def collect_ground_truth(run: Run, job: LDSJob, save: bool = True) -> dict[str, GroundTruth]:
    """Assemble ``{measurement: GroundTruth}`` from the measured models (all must be measured).

    With ``save``, each is written to ``lds_truth/<job-key>/<meas-key>_M<M>_R<R>.safetensors``.
    """
    jd = job_dir(run, job)
    masks = subset_masks(run, job)
    qd = queries_digest(run, job)
    out = {}
    for text in job.measurements:
        name = f"{measurement_key(job, text, qd)}.safetensors"
        grid = []
        for r in range(job.num_seeds):
            row = []
            for m in range(job.num_subsets):
                p = unit_dir(run, job, m, r) / "measurements" / name
                if not p.exists():
                    raise UserError(f"model subset {m} seed {r} has no {text} measurement yet; finish the LDS job first")
                row.append(load_tensors(p)[0]["values"])
            grid.append(torch.stack(row))
        base_path = jd / "full_model" / "measurements" / name
        base = load_tensors(base_path)[0]["values"] if base_path.exists() else None
        meta = {**job_args(run, job), "model": run.model_fingerprint(), "queries_digest": qd, "measurement": text, "num_draws": job.num_draws,
                "measure_seed": job.measure_seed, "query_set": job.query_set,
                "num_subsets": job.num_subsets, "num_seeds": job.num_seeds,
                "draw_stream": TRUTH_STREAM, "draw_offset": TRUTH_OFFSET}
        gt = GroundTruth(text, masks, torch.stack(grid), base, meta)
        out[text] = gt
        if save:
            tensors = {"masks": masks.to(torch.uint8), "values": gt.values}
            if base is not None:
                tensors["base"] = base
            save_tensors(truth_dir(run, job) / f"{Path(name).stem}_M{job.num_subsets}_R{job.num_seeds}.safetensors",
                         tensors, meta)
    return out


def list_ground_truth(run: Run) -> list[dict]:
    """Stored ground truths of a run: ``[{"path", "measurement", "num_subsets", ...}]``."""
    rows = []
    for p in sorted((run.path / "lds_truth").glob("*/*.safetensors")):
        try:
            _, meta = load_tensors(p)
        except UserError:
            continue
        rows.append({"path": str(p), "draw_stream": LEGACY_STREAM, **meta})
    return rows


def load_ground_truth(path: Path, run: Optional[Run] = None) -> GroundTruth:
    """Load one stored ground truth; with ``run``, refuse one built from another model."""
    tensors, meta = load_tensors(Path(path))
    meta = {"draw_stream": LEGACY_STREAM, **meta}  # files from before the stream was recorded
    if run is not None and meta.get("model") != run.model_fingerprint():
        raise UserError(f"{path} was measured for a different model than {run.path}'s; rebuild it")
    return GroundTruth(meta.get("measurement", Path(path).stem), tensors["masks"].bool(), tensors["values"],
                       tensors.get("base"), meta)


def find_ground_truth(run: Run, measurement: str) -> GroundTruth:
    """The stored ground truth for ``measurement`` with the most models (then most MC draws, then
    the current draw stream over the legacy one)."""
    rows = [r for r in list_ground_truth(run) if r.get("measurement") == measurement]
    if not rows:
        raise UserError(f"run {run.path} has no LDS ground truth for {measurement!r}; run `attribution lds` first")
    best = max(rows, key=lambda r: (r.get("num_subsets", 0) * r.get("num_seeds", 0), r.get("num_draws", 0),
                                    r.get("draw_stream") != LEGACY_STREAM))
    return load_ground_truth(Path(best["path"]), run)


# ----------------------------------------------------------------------------- counterfactual

_COUNTERFACTUAL = ("CounterfactualJob", "counterfactual_removals", "counterfactual_plan", "counterfactual_unit_dir",
                   "run_counterfactual")


def __getattr__(name: str):
    """The counterfactual lives in :mod:`attribution.counterfactual`; its names stay importable here."""
    if name in _COUNTERFACTUAL:
        from attribution import counterfactual

        return getattr(counterfactual, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
