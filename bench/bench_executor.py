"""Executor benchmark: LDS retraining throughput with 1 and 2 workers, local pool vs Ray, and
the per-unit overhead of each engine.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_executor.py [--units 4] [--steps 20]

On a copy of the demo run (tiny preset, 1,000 digits at 16x16) it runs the same small LDS job
(``--units`` subsets x 1 seed, ``--steps``-step retrains at batch 64, loss with 8 draws) in this
process, on a local pool of 1 and 2 processes, and on a local Ray cluster with 1 and 2 CPUs,
and checks that every engine gives the same ground truth. Every engine is warmed up first
(workers started, imports done); the start-up is reported on its own. Overhead per unit: the
wall time of ``--noop`` trivial units per worker on the warm engine. Writes
bench/results/executor_cpu.{json,md}; the load average is recorded (a shared machine inflates
everything). GPU rows: measured only when CUDA is present, otherwise marked not measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from attribution import evaluation as ev
from attribution.executor import LocalExecutor, RayExecutor
from attribution.runs import Run

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "run"
OUT = ROOT / "bench" / "results"


def copy_run(dest: Path) -> Run:
    shutil.copytree(DEMO, dest, ignore=shutil.ignore_patterns("artifacts", "lds", "lds_truth", "jobs", "train_state"))
    return Run(dest)


def noop_wall(executor, n: int) -> float:
    """Seconds per trivial unit (math.fsum of one number) on a warm executor, per worker."""
    t0 = time.perf_counter()
    executor.run(math.fsum, [((1.0,),)] * n, lambda i, r: None)
    return (time.perf_counter() - t0) / n * executor.slots


def lds_job(args) -> ev.LDSJob:
    return ev.LDSJob(num_subsets=args.units, num_seeds=1, steps=args.steps, warmup_steps=5, measurements=("loss",),
                     num_draws=8)


def time_engine(name: str, make, args, tmp: Path) -> dict:
    """Start-up + warm-up, then the LDS job on a fresh run copy, then the no-op overhead."""
    t0 = time.perf_counter()
    executor = make()
    warm = copy_run(tmp / f"{name}-warm")
    wjob = ev.LDSJob(num_subsets=executor.slots, num_seeds=1, steps=1, warmup_steps=1, measurements=("loss",),
                     num_draws=1, subset_seed=99)
    ev.run_lds_job(warm, wjob, executor=executor, device=torch.device("cpu"))
    startup = time.perf_counter() - t0
    run = copy_run(tmp / name)
    job = lds_job(args)
    t0 = time.perf_counter()
    assert ev.run_lds_job(run, job, executor=executor, device=torch.device("cpu"))
    wall = time.perf_counter() - t0
    overhead = None if executor.inline else noop_wall(executor, args.noop)
    truth = ev.collect_ground_truth(run, job, save=False)["loss"]
    desc = executor.describe()
    executor.close()
    return {"engine": name, "executor": desc, "workers": executor.slots, "startup_s": startup, "wall_s": wall,
            "units": args.units, "units_per_s": args.units / wall, "overhead_per_unit_s": overhead,
            "truth": truth.values.flatten().tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=4, help="retrained models per engine (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="training steps per model (default: %(default)s)")
    p.add_argument("--noop", type=int, default=40, help="trivial units for the overhead (default: %(default)s)")
    p.add_argument("--engines", default="inline,pool1,pool2,ray1,ray2")
    args = p.parse_args()
    torch.set_num_threads(1)
    engines = {
        "inline": lambda: LocalExecutor(1),
        "pool1": lambda: LocalExecutor(1, in_process=False),
        "pool2": lambda: LocalExecutor(2),
        "ray1": lambda: RayExecutor(workers=1),
        "ray2": lambda: RayExecutor(workers=2),
    }
    rows = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-executor-") as tmp:
        for name in args.engines.split(","):
            row = time_engine(name, engines[name], args, Path(tmp))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "truth"}), flush=True)
    same = all(r["truth"] == rows[0]["truth"] for r in rows)
    by = {r["engine"]: r for r in rows}
    for r in rows:
        r.pop("truth")
        base = by.get("pool1") if r["workers"] == 1 else by.get("pool2")
        if r["engine"].startswith("ray") and base and base["overhead_per_unit_s"]:
            r["overhead_ratio_to_local_pool"] = r["overhead_per_unit_s"] / base["overhead_per_unit_s"]
            r["throughput_ratio_to_local_pool"] = r["units_per_s"] / base["units_per_s"]
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_before": load0, "load_after": os.getloadavg(), "cuda": torch.cuda.is_available(),
              "job": {"run": "demo/run copy (tiny, 1,000 images, 16x16)", "units": args.units, "steps": args.steps,
                      "batch": 64, "measurement": "loss, 8 draws, 16 queries"},
              "identical_ground_truth": same, "rows": rows,
              "gpu": "measured" if torch.cuda.is_available() else "not measured: no GPU on this machine"}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "executor_cpu.json").write_text(json.dumps(result, indent=2))
    (OUT / "executor_cpu.md").write_text(markdown(result))
    print(markdown(result))


def markdown(res: dict) -> str:
    j = res["job"]
    lines = [
        "# Executor benchmark (CPU)", "",
        "`OMP_NUM_THREADS=1 .venv/bin/python bench/bench_executor.py` on a copy of the demo run: "
        f"{j['units']} retrained models of {j['steps']} steps at batch {j['batch']}, each measured ({j['measurement']}). "
        f"{res['cpus']} CPUs; load average {res['load_before'][0]:.1f} before, {res['load_after'][0]:.1f} after "
        "(other jobs shared the machine: figures are upper bounds).", "",
        f"Identical ground truth on every engine: **{res['identical_ground_truth']}**.", "",
        "| engine | workers | start-up + warm-up (s) | LDS job wall (s) | models / s | overhead per unit (ms) | "
        "Ray / local pool: overhead | Ray / local pool: throughput |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        ov = "" if r["overhead_per_unit_s"] is None else f"{1e3 * r['overhead_per_unit_s']:.1f}"
        ro = f"{r['overhead_ratio_to_local_pool']:.1f}x" if "overhead_ratio_to_local_pool" in r else ""
        rt = f"{r['throughput_ratio_to_local_pool']:.2f}" if "throughput_ratio_to_local_pool" in r else ""
        lines.append(f"| {r['engine']} | {r['workers']} | {r['startup_s']:.1f} | {r['wall_s']:.1f} | "
                     f"{r['units_per_s']:.3f} | {ov} | {ro} | {rt} |")
    lines += [
        "", "inline = in this process (the default `--executor local`); pool1 / pool2 = `concurrent.futures` "
        "process pool (`--executor local --workers N`); ray1 / ray2 = local Ray cluster with 1 / 2 CPUs "
        "(`--executor ray --workers N`). Overhead per unit = wall time of trivial units on the warm engine, "
        "per worker.", "",
        "| GPU (`ho-cifar10` store / factor throughput, LDS retrain time per model) | " + res["gpu"] + " |",
        "|---|---|", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
