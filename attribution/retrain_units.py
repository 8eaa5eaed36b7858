"""LDS and counterfactual retraining as executor units (a local process pool or Ray tasks).

A unit trains one model (or re-loads one that exists) and measures it on the query samples.
Everything it needs travels with it, so no shared file system is assumed:

- the :class:`RetrainUnit` itself: dataset spec (recorded in the model's config.json), training
  recipe, subset (dataset indices), measurements, draws, and an existing model's files when it
  is only to be measured;
- the dataset's images ``[N, C, H, W]`` and the query samples, shared once per job through
  :meth:`attribution.executor.Executor.share` (Ray's object store).

It returns the retrained run's files (config.json, loss_curve.json, model/), the weights'
digest and the measurements ``{text: [Q] float64}``. The driver writes them into the run with
the same layout as the in-process path (:mod:`attribution.evaluation`), atomically and model
last, and checks the digest; a re-run submits only units with something missing. Training is
deterministic given the seed, so a unit retried after its worker died (Ray retries it) returns
the same model and the same measurements: the ground truth is identical to an undisturbed run.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from attribution.errors import UserError
from attribution.runs import Run, atomic_write_bytes, save_tensors, write_json

RUN_FILES = ("config.json", "loss_curve.json")  # besides model/*: what a retrained run keeps


@dataclass(frozen=True)
class RetrainUnit:
    """One model to train (unless ``model_files`` is given) and measure."""

    name: str  # the unit directory's name (messages)
    spec: dict  # dataset spec
    train: dict  # TrainConfig fields
    subset: tuple[int, ...]  # dataset indices to train on
    schedule: dict  # the run's noise schedule (the measurements use the run's)
    measurements: tuple[str, ...] = ()
    num_draws: int = 1
    measure_seed: int = 0
    batch_size: int = 256
    model_files: Optional[dict] = None  # {relative path: bytes} of an existing model directory


def model_files(model_dir: Path) -> dict[str, bytes]:
    """``{"model/<name>": bytes}`` of a model directory (what travels to a measuring unit)."""
    return {f"model/{p.name}": p.read_bytes() for p in sorted(Path(model_dir).iterdir()) if p.is_file()}


def _measure_queries(unet, schedule, queries: dict, unit: RetrainUnit) -> dict[str, np.ndarray]:
    from attribution.evaluation import _default_measure

    out = {}
    with torch.no_grad():
        for text in unit.measurements:
            vals = torch.as_tensor(_default_measure(unet, schedule, queries["images"], text, unit.num_draws,
                                                    unit.measure_seed, trajectory=queries.get("trajectory"),
                                                    batch_size=unit.batch_size)).double().cpu()
            if vals.shape != (queries["images"].shape[0],) or not torch.isfinite(vals).all():
                raise UserError(f"measurement {text} of {unit.name} gave invalid values (NaN, inf or wrong shape)")
            out[text] = vals.numpy()
    return out


def retrain_unit(unit: RetrainUnit, dataset_images, queries) -> dict:
    """Worker side: train (or load) and measure one model in a scratch directory.

    ``dataset_images``: ``[N, C, H, W]`` float (numpy or torch) of the dataset; ``queries``:
    ``{"images", "trajectory"?}`` or None when nothing is measured. Returns ``{"files", "digest",
    "values"}``.
    """
    from attribution.ddpm import default_device, linear_schedule
    from attribution.evaluation import _fit_subset
    from attribution.train import TrainConfig

    device = default_device()
    with tempfile.TemporaryDirectory(prefix="attribution-unit-") as tmp:
        out = Path(tmp) / unit.name
        if unit.model_files is None:
            images = torch.as_tensor(np.asarray(dataset_images))
            _fit_subset(out, unit.spec, TrainConfig(**unit.train), list(unit.subset), None, None, device,
                        images=images)
            shutil.rmtree(out / "train_state", ignore_errors=True)
        else:
            for rel, data in unit.model_files.items():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(data)
        run = Run(out)
        values = {}
        if unit.measurements:
            q = {k: torch.as_tensor(np.asarray(v)) for k, v in queries.items()}
            values = _measure_queries(run.load_unet(device), linear_schedule(**unit.schedule), q, unit)
        files = {} if unit.model_files is not None else {
            **{name: (out / name).read_bytes() for name in RUN_FILES if (out / name).exists()},
            **model_files(run.model_dir)}
        return {"files": files, "digest": run.model_fingerprint(), "values": values}


def write_unit(path: Path, result: dict, keys: dict[str, str], meta: Callable[[str], dict],
               source: Optional[Run] = None) -> None:
    """Driver side: the unit's files (model directory last, atomically renamed into place) and
    its measurements ``path/measurements/<keys[text]>.safetensors``. ``source``: the run whose
    model a measuring-only unit measured (default: the one at ``path``)."""
    path = Path(path)
    files = result["files"]
    if files and not Run(path).has_model():
        for name, data in files.items():
            if not name.startswith("model/"):
                atomic_write_bytes(path / name, data)
        tmp = path / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, data in files.items():
            if name.startswith("model/"):
                (tmp / name[len("model/"):]).write_bytes(data)
        tmp.rename(path / "model")
    if (source or Run(path)).model_fingerprint() != result["digest"]:
        raise UserError(f"the model of {path} does not match the weights digest its unit sent; delete it")
    for text, vals in result["values"].items():
        save_tensors(path / "measurements" / f"{keys[text]}.safetensors",
                     {"values": torch.tensor(vals, dtype=torch.float64)}, meta(text))


def _queries_for(run: Run, query_set: str, measurements: Sequence[str]) -> dict:
    tensors, _ = run.load_samples(query_set)
    out = {"images": tensors["images"].float().numpy()}
    if "trajectory" in measurements:
        if "trajectory" not in tensors:
            raise UserError(f"sample set {query_set!r} has no trajectories; redraw it with --trajectory")
        out["trajectory"] = tensors["trajectory"].float().numpy()
    return out


def _dataset_array(run: Run) -> np.ndarray:
    import json

    from attribution.evaluation import _dataset_images

    return _dataset_images(json.dumps(run.dataset_spec(), sort_keys=True)).float().numpy()


def _execute(executor, units: list[RetrainUnit], paths: list[Path], run: Run, query_set: str,
             keys: dict[str, str], meta, record: Callable[[int], None], should_stop,
             sources: Optional[dict[int, Run]] = None) -> bool:
    """Submit ``units`` (images and queries shared once), write each result as it arrives."""
    if not units:
        return True
    images = executor.share(_dataset_array(run)) if any(u.model_files is None for u in units) else None
    meas = sorted({t for u in units for t in u.measurements})
    queries = executor.share(_queries_for(run, query_set, meas)) if meas else None
    done = [0]

    def on_result(i: int, result: dict) -> None:
        write_unit(paths[i], result, keys, meta, (sources or {}).get(i))
        done[0] += 1
        record(done[0])

    return executor.run(retrain_unit, [(u, images, queries) for u in units], on_result, should_stop)


def run_lds_units(run: Run, job, executor, stages: Sequence[str] = ("train", "measure"),
                  progress=None, should_stop=None) -> bool:
    """:func:`attribution.evaluation.run_lds_job` with every (subset, seed) unit as a task."""
    from attribution import evaluation as ev

    jd = ev.job_dir(run, job)
    write_json(jd / "job.json", {**ev.job_args(run, job), "run": str(run.path)})
    masks = ev.subset_masks(run, job)
    base = ev.train_indices(run)
    steps = ev.retrain_steps(run, job)
    measure = "measure" in stages
    qd = ev.queries_digest(run, job) if measure else ""
    keys = {t: ev.measurement_key(job, t, qd) for t in job.measurements}
    texts = tuple(job.measurements) if measure else ()
    common = dict(spec=run.dataset_spec(), schedule=run.config.get("schedule") or {}, num_draws=job.num_draws,
                  measure_seed=job.measure_seed, batch_size=job.batch_size)
    units, paths, sources = [], [], {}
    targets = [("full_model", None)] if measure else []
    targets += [(f"subset_{m}_seed_{r}", (m, r)) for m, r in ev.units(job)]
    for name, mr in targets:
        path = jd / name
        missing = tuple(t for t in texts if not (path / "measurements" / f"{keys[t]}.safetensors").exists())
        if mr is None:  # the full model: measured, never trained
            if missing:
                sources[len(units)] = run
                units.append(RetrainUnit(name, train={}, subset=(), measurements=missing,
                                         model_files=model_files(run.model_dir), **common))
                paths.append(path)
            continue
        has = Run(path).has_model()
        if has and not missing:
            continue
        if not has and "train" not in stages:
            raise UserError(f"retrained model {path} is missing; run the train stage first")
        m, r = mr
        cfg = ev.retrain_config(run, steps, ev.unit_seed(m, r, job.paired_seeds), job.warmup_steps)
        subset = tuple(sorted(base[i] for i in torch.nonzero(masks[m]).flatten().tolist()))
        units.append(RetrainUnit(name, train=_asdict(cfg), subset=subset, measurements=missing,
                                 model_files=model_files(path / "model") if has else None, **common))
        paths.append(path)
    rec = ev._Progress(jd / f"progress_{executor.kind.value}.json", progress)
    rec(0, len(units), "retrain and measure", force=True)
    return _execute(executor, units, paths, run, job.query_set, keys,
                    lambda t: ev.measurement_meta(job, t),
                    lambda d: rec(d, len(units), "retrain and measure", force=True), should_stop, sources)


def run_counterfactual_units(run: Run, job, root: Path, plan: Sequence[tuple], steps: int, key: str, qd: str,
                             executor, progress=None, should_stop=None) -> bool:
    """The counterfactual models of ``plan`` (see counterfactual.counterfactual_plan) as tasks."""
    from attribution import evaluation as ev
    from attribution.counterfactual import counterfactual_unit_dir

    base = ev.train_indices(run)
    common = dict(spec=run.dataset_spec(), schedule=run.config.get("schedule") or {}, num_draws=job.num_draws,
                  measure_seed=job.measure_seed, batch_size=job.batch_size)
    units, paths = [], []
    for name, q, r, keep in plan:
        path = counterfactual_unit_dir(root, name, q, r, keep)
        has = Run(path).has_model()
        measured = (path / "measurements" / f"{key}.safetensors").exists()
        if has and measured:
            continue
        cfg = ev.retrain_config(run, steps, r, job.warmup_steps)
        units.append(RetrainUnit(path.name, train=_asdict(cfg), subset=tuple(sorted(base[i] for i in keep)),
                                 measurements=() if measured else (job.measurement,),
                                 model_files=model_files(path / "model") if has else None, **common))
        paths.append(path)
    rec = ev._Progress(root / "progress.json", progress)
    rec(0, len(units), "counterfactual", force=True)
    return _execute(executor, units, paths, run, job.query_set, {job.measurement: key},
                    lambda t: {**ev.measurement_meta(job, t), "queries_digest": qd},
                    lambda d: rec(d, len(units), "counterfactual", force=True), should_stop)


def _asdict(cfg) -> dict:
    from dataclasses import asdict

    return asdict(cfg)



# ----------------------------------------------------------------------------- entry points for the app


def ground_truth_job(run: Run, job, progress=None, should_stop=None, workers: int = 1,
                     address: Optional[str] = None) -> Optional[dict]:
    """LDS ground truth for ``job`` on the configured executor, collected and saved.

    The executor is :func:`attribution.executor.configured_executor`: the Ray cluster at
    ``address`` or ``$ATTRIBUTION_RAY_ADDRESS`` when set, else local (``workers`` processes; 1 =
    in this process). Resumable. Returns ``{"truth_dir", "executor"}``, or None when
    ``should_stop`` ended it early (a progress callback that raises, like the app's JobProgress
    on cancel, stops it too, between units).
    """
    from attribution import evaluation as ev
    from attribution.executor import configured_executor

    with configured_executor(workers, address) as executor:
        desc = executor.describe()
        if not ev.run_lds_job(run, job, progress=progress, should_stop=should_stop, executor=executor):
            return None
    ev.collect_ground_truth(run, job)
    return {"truth_dir": str(ev.truth_dir(run, job)), "executor": desc}


def counterfactual_job(run: Run, job, scores: dict, progress=None, should_stop=None, workers: int = 1,
                       address: Optional[str] = None) -> Optional[dict]:
    """:func:`attribution.counterfactual.run_counterfactual` on the configured executor (as
    :func:`ground_truth_job`); returns the report (with ``"executor"``), or None if stopped."""
    from attribution.counterfactual import run_counterfactual
    from attribution.executor import configured_executor

    with configured_executor(workers, address) as executor:
        report = run_counterfactual(run, job, scores, progress=progress, should_stop=should_stop, executor=executor)
        return None if report is None else {**report, "executor": executor.describe()}
