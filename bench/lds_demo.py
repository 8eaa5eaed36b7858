"""Rebuild the shipped LDS benchmark of the demo run (ground truth, then the LDS table).

One command rebuilds everything (resumable; re-run it after an interruption)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/lds_demo.py            # ground truth (+ table)
    OMP_NUM_THREADS=1 .venv/bin/python bench/lds_demo.py --table    # only the LDS table

Ground truth is built seed by seed: all subsets' first seed is trained and measured before the
second seed is trained, so a partial run already gives a usable (R = 1) benchmark.
Retrained models go to demo/run/lds/<job-key>/ (git-ignored), the assembled ground truth to
demo/run/lds_truth/<job-key>/ (committed), the table to bench/results/lds_demo.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)

from attribution.evaluation import LDSJob, collect_ground_truth, run_lds_job  # noqa: E402
from attribution.runs import DEMO_RUN, Run  # noqa: E402

# The shipped benchmark's scale (see the report in bench/results/lds_demo.md).
JOB = LDSJob(
    num_subsets=32,
    num_seeds=2,
    alpha=0.5,
    subset_seed=0,
    steps=100,  # explicit steps rule: 100 steps at batch 64 (the full model: 4000 steps on twice the data)
    warmup_steps=20,  # the run's 100-step warm-up scaled down with the steps
    query_set="queries",
    measurements=("loss", "elbo", "elbo-simple", "trajectory", "lt:49", "lt:199", "lt:499", "lt:799"),
    num_draws=256,
    measure_seed=0,
)

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def progress_printer():
    state = {"t": 0.0, "stage": None, "t0": time.time(), "d0": 0}

    def progress(done, total, stage):
        now = time.time()
        if stage != state["stage"]:
            state.update(stage=stage, t0=now, d0=done)
        if now - state["t"] > 60 or done >= total:
            rate = (done - state["d0"]) / max(now - state["t0"], 1e-9)
            eta = (total - done) / rate / 60 if rate > 0 else float("nan")
            log(f"{stage}: {done}/{total} ({eta:.1f} min left)")
            state["t"] = now

    return progress


def queries_ready(run: Run) -> bool:
    return run.has_model() and (run.path / "samples" / f"{JOB.query_set}.safetensors").exists()


def build_ground_truth(run: Run) -> None:
    prog = progress_printer()
    measured = 0
    for r in range(JOB.num_seeds):
        part = replace(JOB, num_seeds=r + 1)
        log(f"train seed {r} of every subset")
        run_lds_job(run, part, stages=("train",), progress=prog, device=torch.device("cpu"))
        if queries_ready(run):
            log(f"measure seeds 0..{r}")
            run_lds_job(run, part, stages=("measure",), progress=prog, device=torch.device("cpu"))
            collect_ground_truth(run, part)
            measured = r + 1
            log(f"ground truth with {r + 1} seed(s) saved")
    if measured < JOB.num_seeds:
        while not queries_ready(run):
            log("waiting for the demo model and its query samples")
            time.sleep(60)
        run_lds_job(run, JOB, stages=("measure",), progress=prog, device=torch.device("cpu"))
        collect_ground_truth(run, JOB)
        log("ground truth saved")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", action="store_true", help="only (re)compute the LDS table")
    args = ap.parse_args()
    run = Run(DEMO_RUN)
    if not args.table:
        build_ground_truth(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
