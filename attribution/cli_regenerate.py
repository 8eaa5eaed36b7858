"""CLI command ``regenerate``: counterfactual regeneration of query samples (attribution.regen_job)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from attribution.errors import UserError

# attribution.trak.DEFAULT_RELATIVE_DAMPING, spelled out: importing it would load torch for --help (a test checks)
TRAK_DAMPING_HELP = "trak 1, dtrak 0.1"


def _indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(q) for q in text.split(",") if q.strip())
    except ValueError:
        raise UserError(f"--queries takes comma-separated indices, e.g. 0,1,2; got {text!r}") from None


def _shard(text: str) -> tuple[int, int]:
    try:
        i, k = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes i/k, got {text!r}") from None
    return i, k


def job_from_args(args):
    from attribution.regen_job import RegenJob

    return RegenJob(query_indices=_indices(args.queries), k=args.k,
                    methods=tuple(m for m in args.methods.split(",") if m.strip()), query_set=args.query_set,
                    steps=args.steps, warmup_steps=args.warmup_steps, measurement=args.measurement,
                    num_draws=args.draws, measure_seed=args.measure_seed, random_seed=args.random_seed,
                    damping=args.damping, trak_relative_damping=args.trak_damping)


def _progress():
    """tqdm bars, one per stage (each model's training and its regeneration)."""
    from tqdm import tqdm

    state = {"stage": None, "bar": None}

    def progress(done, total, stage):
        if stage != state["stage"]:
            if state["bar"] is not None:
                state["bar"].close()
            state["stage"], state["bar"] = stage, tqdm(total=total, desc=stage, dynamic_ncols=True, leave=False)
        bar = state["bar"]
        bar.total = total
        bar.update(done - bar.n)

    def close():
        if state["bar"] is not None:
            state["bar"].close()

    return progress, close


def _argv_for_worker(args, shard: str) -> list[str]:
    argv = [sys.executable, "-m", "attribution", "regenerate", "--run", str(args.run), "--queries", args.queries,
            "--k", str(args.k), "--methods", args.methods, "--query-set", args.query_set,
            "--measurement", args.measurement, "--draws", str(args.draws), "--measure-seed", str(args.measure_seed),
            "--random-seed", str(args.random_seed), "--damping", repr(args.damping),
            "--shard", shard, "--quiet"]
    for flag, value in (("--steps", args.steps), ("--warmup-steps", args.warmup_steps),
                        ("--trak-damping", args.trak_damping)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def _run_workers(args, run, job) -> int:
    """``--workers`` shard processes (one thread each) after the scores and noise are prepared."""
    from tqdm import tqdm

    from attribution.regen_job import prepare, progress_of

    progress, close = _progress()
    try:
        prepare(run, job, progress)
    finally:
        close()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen(_argv_for_worker(args, f"{i}/{args.workers}"), env=env) for i in range(args.workers)]
    done, total = progress_of(run, job)
    bar = tqdm(total=total, initial=done, desc=f"models ({args.workers} workers)", dynamic_ncols=True)
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(2)
            bar.n = progress_of(run, job)[0]
            bar.refresh()
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(2)
        for p in procs:
            p.wait()
        print("\ninterrupted; finished models are kept. Re-run the same command to resume.", file=sys.stderr)
        return 130
    finally:
        bar.close()
    if any(p.returncode != 0 for p in procs):
        raise UserError(f"a worker failed (exit codes {[p.returncode for p in procs]}); re-run to resume")
    return 0


def _summary(report: dict) -> dict:
    def mean_sem(s):
        return {"mean": s["mean"], "sem": s["sem"]}

    return {"report": report["path"], "queries": report["queries"], "k": report["job"]["k"],
            "measurement": report["job"]["measurement"],
            "methods": {name: {"label": r["label"], **{k: mean_sem(r[k]) for k in ("l2", "ssim", "change")}}
                        for name, r in report["methods"].items()},
            "paired": {pair: {k: mean_sem(v[k]) for k in ("l2", "ssim", "change")} for pair, v in report["paired"].items()}}


def _table(summary: dict) -> str:
    lines = [f"{'method':<22} {'L2 to original':>18} {'SSIM':>16} {'change of ' + summary['measurement']:>20}"]
    for r in summary["methods"].values():
        lines.append(f"{r['label']:<22} " + " ".join(f"{r[k]['mean']:>10.4f} ± {r[k]['sem']:<6.3f}"
                                                      for k in ("l2", "ssim", "change")))
    return "\n".join(lines) + f"\nreport: {summary['report']}"


def cmd_regenerate(args) -> int:
    from attribution.regen_job import collect_report, run_regeneration
    from attribution.runs import open_run

    run = open_run(args.run)
    job = job_from_args(args)
    if args.workers < 1:
        raise UserError(f"--workers must be positive, got {args.workers}")
    try:
        if args.shard is not None:
            run_regeneration(run, job, shard=_shard(args.shard), report=False)
            return 0
        if args.workers > 1:
            rc = _run_workers(args, run, job)
            if rc:
                return rc
            report = collect_report(run, job)
        else:
            progress, close = _progress() if not args.quiet else (None, lambda: None)
            try:
                report = run_regeneration(run, job, progress=progress)
            finally:
                close()
    except KeyboardInterrupt:
        print("\ninterrupted; finished models are kept. Re-run the same command to resume.", file=sys.stderr)
        return 130
    summary = _summary(report)
    print(json.dumps(summary, indent=2) if args.json else _table(summary))
    return 0


def add_commands(sub) -> None:
    from attribution.regen_job import DEFAULT_METHODS
    from attribution.regenerate import RemovalMethod

    p = sub.add_parser(
        "regenerate", help="what if these images had never been seen? retrain without a query's top-k, regenerate it",
        description="For each query, remove the k training images each method ranks highest (and k random ones), "
                    "retrain with the run's seed and recipe, and regenerate the query from its own sampling noise "
                    "(the same x_T and per-step noise, recovered from its trajectory). Reports the pixel L2 and SSIM "
                    "to the original and the change of the measurement (against a model retrained on all the data), "
                    "mean ± standard error over the queries. Resumable: re-run the same command.")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--queries", required=True, help="comma-separated query indices in the sample set")
    p.add_argument("--k", "-k", type=int, required=True, help="training images removed per query")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, of {', '.join(m.value for m in RemovalMethod)}; random is always "
                        "included (default: %(default)s)")
    p.add_argument("--query-set", default="queries", help="sample set with trajectories (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the run's own)")
    p.add_argument("--warmup-steps", type=int, default=None, help="learning-rate warm-up (default: the run's)")
    p.add_argument("--measurement", default="loss", help="measurement whose change is reported (default: %(default)s)")
    p.add_argument("--draws", type=int, default=128, help="MC draws of the measurement (default: %(default)s)")
    p.add_argument("--measure-seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the random control (default: %(default)s)")
    p.add_argument("--damping", type=float, default=1e-8, help="K-FAC / EK-FAC damping (default: %(default)s)")
    p.add_argument("--trak-damping", type=float, default=None,
                   help=f"TRAK / D-TRAK damping relative to the mean eigenvalue (default: each one's own, {TRAK_DAMPING_HELP})")
    p.add_argument("--workers", type=int, default=1, help="parallel training processes (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    import argparse

    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_regenerate)
