"""CLI commands of the evaluation: ``lds`` (ground-truth job), ``lds-score`` and ``counterfactual``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from attribution.errors import UserError


def _shard(text: str) -> tuple[int, int]:
    try:
        i, k = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes i/k (e.g. 0/2), got {text!r}") from None
    return i, k


def _job_from_args(args):
    from attribution.evaluation import DEFAULT_MEASUREMENTS, LDSJob, canonical_measurement

    meas = DEFAULT_MEASUREMENTS if not args.measurements else tuple(
        canonical_measurement(m) for m in args.measurements.split(",") if m.strip())
    return LDSJob(num_subsets=args.subsets, num_seeds=args.seeds, alpha=args.alpha, subset_seed=args.subset_seed,
                  steps=args.steps, warmup_steps=args.warmup_steps, query_set=args.query_set, measurements=meas, num_draws=args.draws,
                  measure_seed=args.measure_seed, batch_size=args.batch_size,
                  paired_seeds=not args.independent_seeds)


def _tqdm_progress():
    from tqdm import tqdm

    bars = {}

    def progress(done, total, stage):
        bar = bars.get(stage)
        if bar is None:
            for b in bars.values():
                b.close()
            unit = {"measure": "meas", "train": "step"}.get(stage, "unit")
            bar = bars[stage] = tqdm(total=total, desc=stage, unit=unit,
                                     initial=done, dynamic_ncols=True)
        bar.total = total
        bar.update(done - bar.n)

    def close():
        for b in bars.values():
            b.close()

    return progress, close


def add_executor_args(p) -> None:
    """``--executor``, ``--ray-address`` and ``--workers`` (shared by lds, counterfactual, build)."""
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this machine (one process, or --workers processes); ray: Ray tasks on the "
                        "cluster at --ray-address, or on a local Ray cluster started here (default: %(default)s)")
    p.add_argument("--ray-address", default=None,
                   help="existing Ray cluster: auto, HOST:6379 or ray://HOST:10001 (implies --executor ray)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel workers, one thread each: local processes (default 1 = in this process) or "
                        "the CPUs of a local Ray cluster (default: all cores)")


def executor_from_args(args):
    """The executor for the parsed flags (None: the in-process path)."""
    from attribution.executor import make_executor

    kind = "ray" if args.ray_address else args.executor
    if kind == "local" and (args.workers or 1) == 1:
        return None
    ex = make_executor(kind, args.ray_address, args.workers)
    print(f"running on the {ex.describe()}", file=sys.stderr)
    return ex


def cmd_lds(args) -> int:
    from attribution.evaluation import collect_ground_truth, job_dir, run_lds_job, truth_dir
    from attribution.runs import open_run

    stages = ["train", "measure"] if args.stage == "all" else [args.stage]
    run = open_run(args.run)
    job = _job_from_args(args)
    shard = _shard(args.shard) if args.shard else (0, 1)
    executor = executor_from_args(args) if args.shard is None else None
    progress, close = (None, lambda: None) if args.quiet else _tqdm_progress()
    try:
        run_lds_job(run, job, stages=stages, shard=shard, progress=progress, executor=executor)
    except KeyboardInterrupt:
        print("\ninterrupted; finished models and measurements are kept. Re-run to resume.", file=sys.stderr)
        return 130
    finally:
        close()
        if executor is not None:
            executor.close()
    print(f"job folder: {job_dir(run, job)}")
    if "measure" in stages and not args.no_collect:
        collect_ground_truth(run, job)
        print(f"ground truth ({len(job.measurements)} measurements, {job.num_subsets} subsets x "
              f"{job.num_seeds} seeds) saved in {truth_dir(run, job)}")
    return 0


def _load_scores(path: str):
    """A score matrix ``[Q, N]`` from a safetensors file (tensor "scores", or its only tensor)."""
    from attribution.runs import load_tensors

    tensors, _ = load_tensors(Path(path))
    if "scores" in tensors:
        return tensors["scores"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise UserError(f"{path} holds several tensors ({', '.join(tensors)}); name the score matrix 'scores'")


def cmd_lds_score(args) -> int:
    from attribution.evaluation import canonical_measurement, find_ground_truth, load_ground_truth
    from attribution.lds import exact_retraining_lds, lds
    from attribution.runs import open_run

    run = open_run(args.run)
    gt = (load_ground_truth(Path(args.truth), run) if args.truth
          else find_ground_truth(run, canonical_measurement(args.measurement)))
    rows = {}
    for path in args.scores:
        res = lds(_load_scores(path), gt)
        rows[path] = {"mean": res.mean, "sem": res.sem}
    if gt.num_seeds >= 2:
        ex = exact_retraining_lds(gt)
        rows["exact retraining"] = {"mean": ex.mean, "sem": ex.sem}
    print(json.dumps({"measurement": gt.measurement, "subsets": gt.num_subsets, "seeds": gt.num_seeds,
                      "queries": gt.num_queries, "lds": rows}, indent=2))
    return 0


def cmd_counterfactual(args) -> int:
    from attribution.counterfactual import CounterfactualJob, run_counterfactual
    from attribution.evaluation import canonical_measurement
    from attribution.runs import open_run

    run = open_run(args.run)
    scores = {}
    for item in args.scores:
        if "=" not in item:
            raise UserError(f"--scores takes NAME=FILE, got {item!r}")
        name, path = item.split("=", 1)
        scores[name] = _load_scores(path)
    try:
        queries = tuple(int(q) for q in args.queries.split(","))
    except ValueError:
        raise UserError(f"--queries takes comma-separated indices, got {args.queries!r}") from None
    job = CounterfactualJob(query_indices=queries, k=args.k, num_seeds=args.seeds, steps=args.steps,
                            warmup_steps=args.warmup_steps,
                            measurement=canonical_measurement(args.measurement), num_draws=args.draws,
                            measure_seed=args.measure_seed, random_seed=args.random_seed, query_set=args.query_set)
    executor = executor_from_args(args)
    progress, close = _tqdm_progress()
    try:
        report = run_counterfactual(run, job, scores, progress=progress, executor=executor)
    except KeyboardInterrupt:
        print("\ninterrupted; finished models are kept. Re-run to resume.", file=sys.stderr)
        return 130
    finally:
        close()
        if executor is not None:
            executor.close()
    if report is None:
        return 130
    summary = {name: {"mean": r["mean"], "sem": r["sem"], "per_query": r["per_query"]}
               for name, r in report["methods"].items()}
    print(json.dumps({"measurement": job.measurement, "k": job.k, "change": summary}, indent=2))
    return 0


def add_commands(sub) -> None:
    from attribution.evaluation import DEFAULT_MEASUREMENTS

    p = sub.add_parser(
        "lds", help="build LDS ground truth: retrain on random subsets and measure the query samples",
        description="Retrain M subsets x R seeds with the run's recipe, measure every retrained model on the "
                    "query samples (the same Monte-Carlo draws for every model) and store the ground truth in "
                    "RUN/lds_truth/. Resumable: re-run the same command after an interruption. Steps rule: "
                    "round(alpha x the run's steps) unless --steps is given.")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--subsets", type=int, default=32, help="M, random subsets (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=2, help="R, training seeds per subset (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="fraction of the data kept (default: %(default)s)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the subset draw (default: %(default)s)")
    p.add_argument("--independent-seeds", action="store_true",
                   help="give every (subset, seed) its own training seed; by default seed r of every subset "
                        "shares its initialisation and noise stream (paired seeds: less seed noise in the LDS)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per retrained model (default: alpha x the run's steps)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="learning-rate warm-up of the retrained models (default: the run's)")
    p.add_argument("--query-set", default="queries", help="sample set to measure (default: %(default)s)")
    p.add_argument("--measurements", default=None,
                   help=f"comma-separated (default: {','.join(DEFAULT_MEASUREMENTS)})")
    p.add_argument("--draws", type=int, default=1000, help="MC draws per query and measurement (default: %(default)s)")
    p.add_argument("--measure-seed", type=int, default=0, help="seed of the shared MC draws (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="measurement batch size (default: %(default)s)")
    p.add_argument("--stage", choices=("train", "measure", "all"), default="all",
                   help="retrain only, measure only, or both (default: %(default)s)")
    add_executor_args(p)
    p.add_argument("--shard", default=None, help=argparse_suppress())
    p.add_argument("--quiet", action="store_true", help=argparse_suppress())
    p.add_argument("--no-collect", action="store_true", help=argparse_suppress())
    p.set_defaults(func=cmd_lds)

    p = sub.add_parser("lds-score", help="LDS of score matrices against a run's stored ground truth",
                       description="Spearman LDS (mean over queries +- standard error) of each score file "
                                   "(safetensors, tensor 'scores' [Q, N], tau > 0 = removal raises the measurement).")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--measurement", default="loss", help="true measurement (default: %(default)s)")
    p.add_argument("--truth", default=None, help="a specific RUN/lds_truth/... file instead")
    p.add_argument("scores", nargs="+", help="score files")
    p.set_defaults(func=cmd_lds_score)

    p = sub.add_parser("counterfactual", help="retrain without each method's top-k influences and measure the change",
                       description="For each query, remove the k training examples with the largest scores of each "
                                   "method (and k random ones), retrain with the run's recipe, and report the change "
                                   "of the measurement against a model retrained on all the data with the same seed.")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--scores", nargs="+", required=True, help="NAME=FILE score matrices [Q, N] (safetensors)")
    p.add_argument("--queries", required=True, help="comma-separated query indices")
    p.add_argument("-k", type=int, required=True, help="examples removed per query")
    p.add_argument("--seeds", type=int, default=1, help="training seeds (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the run's own)")
    p.add_argument("--warmup-steps", type=int, default=None, help="learning-rate warm-up (default: the run's)")
    p.add_argument("--measurement", default="loss", help="(default: %(default)s)")
    p.add_argument("--draws", type=int, default=1000, help="MC draws (default: %(default)s)")
    p.add_argument("--measure-seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the random-removal control (default: %(default)s)")
    p.add_argument("--query-set", default="queries", help="(default: %(default)s)")
    add_executor_args(p)
    p.set_defaults(func=cmd_counterfactual)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS
