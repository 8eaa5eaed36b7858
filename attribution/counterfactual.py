"""Counterfactual retraining (method.md §7): remove each method's top-k training examples for
chosen queries, retrain with the run's recipe, and report the change of the measurement.

Layout inside a run directory::

    lds/cf-<job-key>/<method>_q<q>_seed_<r>_<hash>/   retrained runs (ordinary runs)
        measurements/<meas-key>.safetensors         {"values": [Q] float64}
    lds/cf-<job-key>/report_<hash>.json             the report

The job key hashes the model and the training recipe, so new measurements or methods reuse
retrained models; the measurement key names the query set's digest and the draw stream
(evaluation.measurement_key). Retraining runs in this process or as executor units.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from attribution.errors import UserError
from attribution.evaluation import (
    TRUTH_STREAM,
    MeasureFn,
    ProgressFn,
    _default_measure,
    _Progress,
    _retrain,
    measurement_key,
    measurement_meta,
    queries_digest,
    train_indices,
)
from attribution.runs import Run, config_hash, load_tensors, save_tensors, write_json


@dataclass(frozen=True)
class CounterfactualJob:
    """Retrain without each method's top-k examples for chosen queries; measure the change."""

    query_indices: tuple[int, ...]
    k: int
    num_seeds: int = 1
    steps: Optional[int] = None  # None: the run's own steps (same procedure as the full model)
    warmup_steps: Optional[int] = None  # None: the run's learning-rate warm-up
    measurement: str = "loss"
    num_draws: int = 1000
    measure_seed: int = 0
    random_seed: int = 0
    query_set: str = "queries"
    batch_size: int = 256

    def __post_init__(self):
        if not self.query_indices:
            raise UserError("choose at least one query")
        if self.k < 1 or self.num_seeds < 1 or self.num_draws < 1:
            raise UserError("k, the number of seeds and of MC draws must be positive")


def counterfactual_removals(scores: dict[str, Tensor], job: CounterfactualJob, num_train: int) -> dict[str, Tensor]:
    """``{method: [len(queries), k]}`` indices to remove: top-k by each method, plus "random"."""
    from attribution.lds import random_removal, top_k_removal

    q = torch.as_tensor(job.query_indices)
    out = {}
    for name, s in scores.items():
        if s.dim() != 2 or s.shape[1] != num_train:
            raise UserError(f"scores of {name} must be [num_queries, {num_train}], got {tuple(s.shape)}")
        if int(q.max()) >= s.shape[0]:
            raise UserError(f"query index {int(q.max())} is out of range for {name}'s {s.shape[0]} queries")
        out[name] = top_k_removal(s[q], job.k)
    out["random"] = random_removal(num_train, job.k, len(job.query_indices), job.random_seed)
    return out


def counterfactual_plan(run: Run, job: CounterfactualJob, removals: dict[str, Tensor]) -> list[tuple]:
    """``[(method, query or None, seed, kept positions)]``: the references (all data) first."""
    n = len(train_indices(run))
    plan = [("reference", None, r, list(range(n))) for r in range(job.num_seeds)]
    for name, idx in removals.items():
        for qi, q in enumerate(job.query_indices):
            keep = sorted(set(range(n)) - set(idx[qi].tolist()))
            for r in range(job.num_seeds):
                plan.append((name, q, r, keep))
    return plan


def counterfactual_unit_dir(root: Path, name: str, q: Optional[int], r: int, keep: Sequence[int]) -> Path:
    tag = "reference" if q is None else f"{name}_q{q}"
    return root / f"{tag}_seed_{r}_{config_hash(list(keep), 10)}"


def run_counterfactual(
    run: Run,
    job: CounterfactualJob,
    scores: dict[str, Tensor],
    progress: Optional[ProgressFn] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    device: Optional[torch.device] = None,
    measure_fn: Optional[MeasureFn] = None,
    train_fn=None,
    executor=None,
) -> Optional[dict]:
    """Train the reference (all data) and the removal models, measure, and report the changes.

    Per method: ``{"mean", "sem", "per_query": [...], "removed": [[k indices] per query]}`` where a
    query's change is m(model without the removed examples) - m(reference model), both trained
    with the same recipe and seed, averaged over seeds. Returns None if stopped early.
    ``executor`` (not inline: a local pool or Ray) trains and measures every model as a task.
    """
    from attribution.ddpm import default_device
    from attribution.lds import summarize

    device = device or default_device()
    n = len(train_indices(run))
    removals = counterfactual_removals(scores, job, n)
    steps = job.steps or run.config["train"]["steps"]
    args = {"model": run.model_fingerprint(), "train": run.config["train"], "steps": steps,
            "warmup_steps": job.warmup_steps if job.warmup_steps is not None else run.config["train"]["warmup_steps"]}
    root = run.path / "lds" / f"cf-{config_hash(args)}"
    write_json(root / "job.json", {**args, "run": str(run.path)})
    queries, _ = run.load_samples(job.query_set)
    qd = queries_digest(run, job)
    schedule = run.schedule()
    fn = measure_fn or _default_measure
    key = measurement_key(job, job.measurement, qd)
    plan = counterfactual_plan(run, job, removals)
    rec = _Progress(root / "progress.json", progress)
    total = len(plan) * (steps + 1)

    def measured(path: Path) -> Tensor:
        out = path / "measurements" / f"{key}.safetensors"
        if not out.exists():
            unet = Run(path).load_unet(device)
            with torch.no_grad():
                vals = fn(unet, schedule, queries["images"], job.measurement, job.num_draws, job.measure_seed,
                          trajectory=queries.get("trajectory"), batch_size=job.batch_size)
            save_tensors(out, {"values": torch.as_tensor(vals).double().cpu()},
                         {**measurement_meta(job, job.measurement), "queries_digest": qd})
        return load_tensors(out)[0]["values"]

    values = {}
    if executor is not None and not executor.inline:
        from attribution.retrain_units import run_counterfactual_units

        if not run_counterfactual_units(run, job, root, plan, steps, key, qd, executor, progress, should_stop):
            return None
        for name, q, r, keep in plan:
            values[(name, q, r)] = measured(counterfactual_unit_dir(root, name, q, r, keep))
    else:
        for i, (name, q, r, keep) in enumerate(plan):
            path = counterfactual_unit_dir(root, name, q, r, keep)
            cb = lambda s, _t, _l, base=i * (steps + 1): rec(base + s, total, "counterfactual")  # noqa: E731
            if not _retrain(run, path, keep, steps, r, cb, should_stop, device, train_fn, job.warmup_steps):
                return None
            values[(name, q, r)] = measured(path)
            rec((i + 1) * (steps + 1), total, "counterfactual", force=True)

    report = {"args": {**asdict(job), **args, "num_train": n, "queries_digest": qd, "draw_stream": TRUTH_STREAM},
              "methods": {}}
    for name, idx in removals.items():
        per_q = []
        for q in job.query_indices:
            diffs = [values[(name, q, r)][q] - values[("reference", None, r)][q] for r in range(job.num_seeds)]
            per_q.append(float(torch.stack(diffs).mean()))
        res = summarize(torch.tensor(per_q, dtype=torch.float64))
        report["methods"][name] = {"mean": res.mean, "sem": res.sem, "per_query": per_q,
                                   "removed": idx.tolist()}
    report["reference_values"] = {int(q): [float(values[("reference", None, r)][q]) for r in range(job.num_seeds)]
                                  for q in job.query_indices}
    write_json(root / f"report_{config_hash(report['args'], 10)}.json", report)
    return report
