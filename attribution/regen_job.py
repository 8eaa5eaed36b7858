"""The counterfactual-regeneration job: remove a query's top-k proponents, retrain, regenerate.

For each query and removal method (K-FAC / EK-FAC, TRAK, D-TRAK, pixel cosine, and k random
images as the control) the run is retrained without the k chosen images with the same seed and
recipe as the full model (``evaluation._retrain``), and the query is regenerated from its own
sampling noise (:mod:`attribution.regenerate`). A reference model retrained on all the data with
the same seed and recipe is the baseline of the measurement change, and its regeneration's
distance to the query is the retraining noise floor (0 when training is bitwise reproducible).

Layout: the models live in the counterfactual folder of ``evaluation.run_counterfactual`` (same
key: model, recipe, steps, warm-up), so a model trained there for the same kept set and seed is
reused::

    lds/cf-<key>/<tag>_seed_<s>_<hash(kept)>/            retrained run directory
        regen/<set>_<digest>_q<q>.image.safetensors        {"image": [C, H, W]}
        regen/<set>_<digest>_q<q>_<measurement>.value.safetensors   {"value": [1] float64}
    lds/cf-<key>/regen_<job>.removals.json     removed training positions per method and query
    lds/cf-<key>/regen_<job>.json              the report (L2, SSIM, measurement change; mean ± SE)
    lds/cf-<key>/regen_<job>.safetensors       images: "original", "reference", one per method [Q, C, H, W]

Everything is written atomically and nothing finished is redone, so the job resumes where it
stopped; ``shard=(i, k)`` splits the models between processes (:func:`collect_report` then
assembles the report).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from attribution.errors import UserError
from attribution.regenerate import RemovalMethod, image_distances, recover_noise, regenerate
from attribution.runs import Run, config_hash, file_digest, load_tensors, read_json, save_tensors, write_json

ProgressFn = Callable[[float, float, str], None]  # (done, total, stage)
DEFAULT_METHODS = ("kfac", "dtrak", "random")


@dataclass(frozen=True)
class RegenJob:
    """Which queries, how many images to remove, by which methods, and the retraining recipe."""

    query_indices: tuple[int, ...]
    k: int
    methods: tuple[str, ...] = DEFAULT_METHODS  # "random" (the control) is always added
    query_set: str = "queries"
    steps: Optional[int] = None  # None: the run's own steps (the full model's recipe)
    warmup_steps: Optional[int] = None  # None: the run's learning-rate warm-up
    measurement: str = "loss"  # whose change is reported (and what K-FAC / EK-FAC attribute)
    num_draws: int = 128  # MC draws of the measurement (the same draws for every model)
    measure_seed: int = 0
    random_seed: int = 0  # of the random control
    damping: float = 1e-8  # K-FAC / EK-FAC (paper's lambda)
    trak_relative_damping: Optional[float] = None  # TRAK / D-TRAK: x mean eigenvalue; None: each one's default

    def __post_init__(self):
        from attribution.measurements import parse_measurement

        q = tuple(int(i) for i in self.query_indices)
        if not q:
            raise UserError("choose at least one query")
        if len(set(q)) != len(q):
            raise UserError(f"query indices must be distinct, got {list(q)}")
        chosen = {RemovalMethod.parse(m) for m in self.methods}
        chosen.add(RemovalMethod.RANDOM)
        object.__setattr__(self, "query_indices", q)
        object.__setattr__(self, "methods", tuple(m.value for m in RemovalMethod if m in chosen))
        object.__setattr__(self, "measurement", str(parse_measurement(self.measurement)))
        if self.k < 1:
            raise UserError(f"k (images removed per query) must be positive, got {self.k}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"steps must be positive, got {self.steps}")
        if self.num_draws < 1:
            raise UserError(f"the number of MC draws must be positive, got {self.num_draws}")
        if not self.damping >= 0 or not (self.trak_relative_damping is None or self.trak_relative_damping > 0):
            raise UserError("damping must be >= 0 and the TRAK relative damping > 0")

    @classmethod
    def from_args(cls, args: dict) -> "RegenJob":
        """From JSON-like job arguments (lists for tuples); a UserError for unknown keys."""
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(args) - known)
        if bad:
            raise UserError(f"unknown regeneration argument(s) {bad}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})

    def to_args(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Unit:
    """One retrained model: the kept training positions and the queries it regenerates."""

    keep: tuple[int, ...]
    queries: tuple[int, ...]
    uses: tuple[tuple[str, Optional[int]], ...] = field(default=())  # (method or "reference", query)

    @property
    def tag(self) -> str:
        method, q = self.uses[0]
        return "reference" if method == "reference" else f"{method}_q{q}"


# ----------------------------------------------------------------------------- paths


def recipe(run: Run, job: RegenJob) -> dict:
    """The retraining recipe (the counterfactual folder's key, as in ``run_counterfactual``)."""
    train = run.config["train"]
    return {"model": run.model_fingerprint(), "train": train, "steps": job.steps or train["steps"],
            "warmup_steps": job.warmup_steps if job.warmup_steps is not None else train["warmup_steps"]}


def cf_root(run: Run, job: RegenJob) -> Path:
    return run.path / "lds" / f"cf-{config_hash(recipe(run, job))}"


def job_key(job: RegenJob) -> str:
    return config_hash(job.to_args(), 10)


def report_path(run: Run, job: RegenJob) -> Path:
    return cf_root(run, job) / f"regen_{job_key(job)}.json"


def _seed(run: Run) -> int:
    return int(run.config["train"]["seed"])


def unit_dir(run: Run, job: RegenJob, unit: Unit) -> Path:
    """The unit's run directory; an existing model for the same kept set and seed is reused."""
    root = cf_root(run, job)
    suffix = f"_seed_{_seed(run)}_{config_hash(list(unit.keep), 10)}"
    for p in sorted(root.glob(f"*{suffix}")):
        if (p / "config.json").exists():
            return p
    return root / f"{unit.tag}{suffix}"


def _queries_digest(run: Run, query_set: str) -> str:
    path = run.path / "samples" / f"{query_set}.safetensors"
    if not path.exists():
        run.load_samples(query_set)  # raises the usual "no sample set" error
    return file_digest(path, 8)


def _image_file(path: Path, job: RegenJob, digest: str, q: int) -> Path:
    return path / "regen" / f"{job.query_set}_{digest}_q{q}.image.safetensors"


def _value_file(path: Path, job: RegenJob, digest: str, q: int) -> Path:
    meas = job.measurement.replace(":", "-")
    return path / "regen" / f"{job.query_set}_{digest}_q{q}_{meas}_d{job.num_draws}_s{job.measure_seed}.value.safetensors"


# ----------------------------------------------------------------------------- queries, noise, removals


def load_queries(run: Run, job: RegenJob) -> dict:
    """``{"images": [Q, C, H, W], "trajectory": [T+1, Q, C, H, W]}`` of the job's queries."""
    tensors, _ = run.load_samples(job.query_set)
    if "trajectory" not in tensors:
        raise UserError(f"sample set {job.query_set!r} has no trajectories, which regeneration needs "
                        f"(its sampling noise); draw queries with `attribution sample --trajectory`")
    n = tensors["images"].shape[0]
    bad = [q for q in job.query_indices if not 0 <= q < n]
    if bad:
        raise UserError(f"query indices {bad} are out of range for sample set {job.query_set!r} ({n} samples)")
    idx = list(job.query_indices)
    return {"images": tensors["images"][idx], "trajectory": tensors["trajectory"][:, idx]}


def query_noise(run: Run, job: RegenJob, queries: dict, device=None, progress: Optional[ProgressFn] = None) -> Tensor:
    """Scaled sampling noise of the job's queries ``[T, Q, C, H, W]``, recovered with the run's
    model once and cached per query in ``artifacts/regen_noise/``."""
    d = run.artifact_dir("regen_noise", {"query_set": job.query_set, "digest": _queries_digest(run, job.query_set)})
    files = [d / f"q{q}.safetensors" for q in job.query_indices]
    missing = [i for i, f in enumerate(files) if not f.exists()]
    if missing:
        unet = run.load_unet(device)
        cb = None if progress is None else (lambda s, T: progress(s, T, "recovering the queries' sampling noise"))
        noise = recover_noise(unet, run.schedule(), queries["trajectory"][:, missing], progress=cb)
        for j, i in enumerate(missing):
            save_tensors(files[i], {"noise": noise[:, j]}, {"query": job.query_indices[i]})
    return torch.stack([load_tensors(f)[0]["noise"] for f in files], dim=1)


def _influence_settings(job: RegenJob, method: RemovalMethod):
    """K-FAC / EK-FAC at the library defaults with the job's damping and measurement."""
    from attribution.influence import InfluenceSettings

    return InfluenceSettings(method=method.value, damping=job.damping, measurement=job.measurement)


def _method_scores(run: Run, job: RegenJob, method: RemovalMethod, images: Tensor, progress, device) -> Tensor:
    """Scores ``[Q, N]`` of one method for the job's queries (largest = strongest proponent)."""
    from attribution import baselines

    if method in (RemovalMethod.KFAC, RemovalMethod.EKFAC):
        from attribution.influence import influence_scores

        return influence_scores(run, job.query_set, list(job.query_indices), _influence_settings(job, method),
                                progress=progress)
    if method in (RemovalMethod.TRAK, RemovalMethod.DTRAK):
        return baselines.trak_scores(run, images, variant=method.value, relative_damping=job.trak_relative_damping,
                                     device=device, progress=progress, query_indices=list(job.query_indices))
    if method == RemovalMethod.PIXEL:
        return baselines.pixel_scores(run, images)
    raise UserError(f"{method.value} has no scores")


def removal_sets(run: Run, job: RegenJob, progress: Optional[ProgressFn] = None, device=None) -> dict[str, list[list[int]]]:
    """``{method: [Q lists of k training positions]}``, computed once and stored beside the report."""
    from attribution.evaluation import train_indices
    from attribution.lds import random_removal, top_k_removal

    path = cf_root(run, job) / f"regen_{job_key(job)}.removals.json"
    if path.exists():
        return read_json(path)["methods"]
    n = len(train_indices(run))
    if not 0 < job.k < n:
        raise UserError(f"k must lie in 1..{n - 1} (the run has {n} training images), got {job.k}")
    queries = load_queries(run, job)
    out, made_with = {}, {}
    for name in job.methods:
        m = RemovalMethod(name)
        if m == RemovalMethod.RANDOM:
            idx = random_removal(n, job.k, len(job.query_indices), job.random_seed)
        else:
            if progress is not None:
                progress(0, 1, f"scoring the training images with {m.label}")
            scores = _method_scores(run, job, m, queries["images"], progress, device)
            if scores.shape != (len(job.query_indices), n):
                raise UserError(f"{m.label} scores have shape {tuple(scores.shape)}, expected "
                                f"[{len(job.query_indices)}, {n}]")
            idx = top_k_removal(scores, job.k)
            if m in (RemovalMethod.KFAC, RemovalMethod.EKFAC):  # the estimator's settings, for the record
                made_with[name] = _influence_settings(job, m).to_dict()
        out[name] = [[int(i) for i in row] for row in idx.tolist()]
    write_json(path, {"methods": out, "job": job.to_args(), "settings": made_with})
    return out


def plan(job: RegenJob, removals: dict[str, list[list[int]]], num_train: int) -> list[Unit]:
    """The models to train: the reference (all data) first, then one per distinct kept set."""
    groups: dict[tuple[int, ...], dict] = {}
    everything = tuple(range(num_train))
    groups[everything] = {"queries": list(job.query_indices), "uses": [("reference", None)]}
    for qi, q in enumerate(job.query_indices):
        for name in job.methods:
            removed = set(removals[name][qi])
            keep = tuple(i for i in everything if i not in removed)
            g = groups.setdefault(keep, {"queries": [], "uses": []})
            if q not in g["queries"]:
                g["queries"].append(q)
            g["uses"].append((name, q))
    return [Unit(keep, tuple(g["queries"]), tuple(g["uses"])) for keep, g in groups.items()]


# ----------------------------------------------------------------------------- running


def _unit_done(run: Run, job: RegenJob, unit: Unit, digest: str) -> bool:
    path = unit_dir(run, job, unit)
    return all(_image_file(path, job, digest, q).exists() and _value_file(path, job, digest, q).exists()
               for q in unit.queries)


def _describe(unit: Unit, job: RegenJob) -> str:
    method, q = unit.uses[0]
    if method == "reference":
        return "retraining on all the data (the reference)"
    return f"retraining without the {job.k} images {RemovalMethod(method).label} ranks highest for query {q}"


def _run_unit(run: Run, job: RegenJob, unit: Unit, i: int, count: int, ctx: dict, progress, should_stop,
              device, train_fn) -> bool:
    from attribution.evaluation import _retrain
    from attribution.measurements import measurement_values, parse_measurement

    path = unit_dir(run, job, unit)
    rec = recipe(run, job)
    head = f"model {i} of {count}: "
    cb = None if progress is None else (lambda s, total, _loss: progress(s, total, head + _describe(unit, job)))
    if not _retrain(run, path, list(unit.keep), rec["steps"], _seed(run), cb, should_stop, device, train_fn,
                    rec["warmup_steps"]):
        return False
    unet = Run(path).load_unet(device)
    schedule = run.schedule()
    pos = {q: j for j, q in enumerate(job.query_indices)}
    if should_stop is not None and should_stop():
        return False
    # all of this model's queries in one batch (the reference regenerates every query)
    todo = [q for q in unit.queries if not _image_file(path, job, ctx["digest"], q).exists()]
    if todo:
        cols = [pos[q] for q in todo]
        rcb = None if progress is None else (lambda s, T: progress(s, T, f"{head}regenerating query "
                                                                          f"{', '.join(map(str, todo))}"))
        imgs = regenerate(unet, schedule, ctx["queries"]["trajectory"][0, cols], ctx["noise"][:, cols], progress=rcb)
        for q, img in zip(todo, imgs):
            save_tensors(_image_file(path, job, ctx["digest"], q), {"image": img}, {"query": q, "query_set": job.query_set})
    todo = [q for q in unit.queries if not _value_file(path, job, ctx["digest"], q).exists()]
    if todo:
        cols = [pos[q] for q in todo]
        vals = measurement_values(unet, schedule, ctx["queries"]["images"][cols], parse_measurement(job.measurement),
                                  job.num_draws, job.measure_seed, trajectory=ctx["queries"]["trajectory"][:, cols],
                                  offset=todo)
        for q, v in zip(todo, vals):
            save_tensors(_value_file(path, job, ctx["digest"], q), {"value": v.reshape(1).double()},
                         {"query": q, "measurement": job.measurement})
    return True


def units_of_shard(units: Sequence[Unit], shard: tuple[int, int]) -> list[Unit]:
    i, k = shard
    if not 0 <= i < k:
        raise UserError(f"shard must be i/k with 0 <= i < k, got {i}/{k}")
    return [u for n, u in enumerate(units) if n % k == i]


def prepare(run: Run, job: RegenJob, progress: Optional[ProgressFn] = None, device=None) -> dict:
    """Removal sets, the plan and the queries' noise (computed once; cached)."""
    from attribution.evaluation import train_indices

    queries = load_queries(run, job)
    removals = removal_sets(run, job, progress, device)
    units = plan(job, removals, len(train_indices(run)))
    noise = query_noise(run, job, queries, device, progress)
    write_json(cf_root(run, job) / "job.json", {**recipe(run, job), "run": str(run.path)})
    return {"queries": queries, "removals": removals, "units": units, "noise": noise,
            "digest": _queries_digest(run, job.query_set)}


def run_regeneration(run: Run, job: RegenJob, shard: tuple[int, int] = (0, 1), progress: Optional[ProgressFn] = None,
                     should_stop: Optional[Callable[[], bool]] = None, device=None, train_fn=None,
                     report: bool = True) -> Optional[dict]:
    """Train, regenerate and measure this shard's models; then (``report``) assemble the report.

    Returns the report, or None when ``should_stop`` ended the work early (call again to resume)
    or, with ``report=False``, when this shard is done. ``progress(done, total, stage)`` counts
    training steps and denoising steps of the current model; its stage says which model.
    """
    from attribution.ddpm import default_device

    device = device or default_device()
    ctx = prepare(run, job, progress, device)
    mine = units_of_shard(ctx["units"], shard)
    status = cf_root(run, job) / f"regen_{job_key(job)}.progress_{shard[0]}of{shard[1]}.json"
    count = len(ctx["units"])
    for unit in mine:
        i = ctx["units"].index(unit) + 1
        if _unit_done(run, job, unit, ctx["digest"]):
            continue
        write_json(status, {"unit": i, "units": count, "stage": _describe(unit, job)})
        if not _run_unit(run, job, unit, i, count, ctx, progress, should_stop, device, train_fn):
            return None
    write_json(status, {"unit": count, "units": count, "stage": "done"})
    return collect_report(run, job, ctx) if report else None


def progress_of(run: Run, job: RegenJob) -> tuple[int, int]:
    """(finished models, all models) of a prepared job (its removal sets exist); (0, 0) otherwise."""
    from attribution.evaluation import train_indices

    path = cf_root(run, job) / f"regen_{job_key(job)}.removals.json"
    if not path.exists():
        return 0, 0
    units = plan(job, read_json(path)["methods"], len(train_indices(run)))
    digest = _queries_digest(run, job.query_set)
    return sum(_unit_done(run, job, u, digest) for u in units), len(units)


# ----------------------------------------------------------------------------- report


def _stat(values: Tensor) -> dict:
    from attribution.lds import summarize

    res = summarize(values.double())
    return {"mean": res.mean, "sem": res.sem, "per_query": [float(v) for v in values]}


def collect_report(run: Run, job: RegenJob, ctx: Optional[dict] = None) -> dict:
    """Assemble and write the report and the images (every model must be finished)."""
    from attribution.measurements import measurement_values, parse_measurement

    ctx = ctx or prepare(run, job)
    digest = ctx["digest"]
    undone = [u for u in ctx["units"] if not _unit_done(run, job, u, digest)]
    if undone:
        raise UserError(f"{len(undone)} of {len(ctx['units'])} models are not finished yet; run the same "
                        f"command again to resume")
    by_use = {use: u for u in ctx["units"] for use in u.uses}
    ref = by_use[("reference", None)]

    def result(unit: Unit, q: int) -> tuple[Tensor, Tensor]:
        path = unit_dir(run, job, unit)
        return (load_tensors(_image_file(path, job, digest, q))[0]["image"],
                load_tensors(_value_file(path, job, digest, q))[0]["value"][0])

    original = ctx["queries"]["images"].float()
    ref_imgs, ref_vals = zip(*(result(ref, q) for q in job.query_indices))
    images = {"original": original, "reference": torch.stack(ref_imgs)}
    ref_vals = torch.stack(ref_vals)
    unet = run.load_unet()
    with torch.no_grad():
        base = measurement_values(unet, run.schedule(), original, parse_measurement(job.measurement), job.num_draws,
                                  job.measure_seed, trajectory=ctx["queries"]["trajectory"],
                                  offset=list(job.query_indices))
    d_ref = image_distances(images["reference"], original)
    rows = {"reference": {"label": "all data, retrained", "l2": _stat(d_ref["l2"]), "ssim": _stat(d_ref["ssim"]),
                          "change": _stat(torch.zeros(len(job.query_indices), dtype=torch.float64))}}
    per = {}
    for name in job.methods:
        imgs, vals = zip(*(result(by_use[(name, q)], q) for q in job.query_indices))
        images[name] = torch.stack(imgs)
        d = image_distances(images[name], original)
        per[name] = {"l2": d["l2"], "ssim": d["ssim"], "change": torch.stack(vals) - ref_vals}
        rows[name] = {"label": RemovalMethod(name).label, **{k: _stat(v) for k, v in per[name].items()},
                      "removed": ctx["removals"][name]}
    paired = {}
    for a, b in itertools.combinations(job.methods, 2):
        paired[f"{a} - {b}"] = {k: {kk: vv for kk, vv in _stat(per[a][k] - per[b][k]).items()}
                                for k in ("l2", "ssim", "change")}
    rec = recipe(run, job)
    out = {"job": job.to_args(), "recipe": {**rec, "seed": _seed(run)}, "queries": list(job.query_indices),
           "num_train": len(ref.keep), "methods": rows, "paired": paired,
           "measurement_original": [float(v) for v in base], "measurement_reference": [float(v) for v in ref_vals],
           "units": {"l2": "Euclidean distance of images in [-1, 1] over C*H*W values", "ssim": "structural similarity",
                     "change": f"{job.measurement} of the retrained model minus the reference's (same MC draws)"}}
    path = report_path(run, job)
    save_tensors(path.with_suffix(".safetensors"), images, {"report": path.name})
    write_json(path, out)
    return {**out, "path": str(path)}


def list_reports(run: Run) -> list[Path]:
    """Regeneration reports of a run (newest last)."""
    paths = [p for p in (run.path / "lds").glob("cf-*/regen_*.json")
             if p.name.count(".") == 1]  # not the .removals.json / .progress_*.json files
    return sorted(paths, key=lambda p: p.stat().st_mtime)


def load_report(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """A report and its images (``{"original", "reference", <method>: [Q, C, H, W]}``)."""
    report = read_json(Path(path))
    tensors, _ = load_tensors(Path(path).with_suffix(".safetensors"))
    return report, tensors


def run_job(run_dir: Path, args: dict, progress) -> dict:
    """The ``regenerate`` kind of :mod:`attribution.jobs` (``progress``: a ``jobs.JobProgress``)."""
    from attribution.jobs import JobCancelled
    from attribution.runs import open_run

    run = open_run(run_dir)
    job = RegenJob.from_args(args)
    report = run_regeneration(run, job, progress=progress.report, should_stop=progress.cancelled)
    if report is None:
        raise JobCancelled("stopped at a checkpoint; start the same job again to resume")
    return {"report": report["path"],
            "methods": {name: {k: r[k]["mean"] for k in ("l2", "ssim", "change")} for name, r in report["methods"].items()}}
