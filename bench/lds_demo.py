"""Rebuild the shipped LDS benchmark of the demo run (ground truth, then the LDS table).

One command rebuilds everything (resumable; re-run it after an interruption)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/lds_demo.py            # ground truth, then the table
    OMP_NUM_THREADS=1 .venv/bin/python bench/lds_demo.py --table    # only the LDS table

Ground truth is built seed by seed: every subset's first seed is trained and measured before any
second seed is trained, so a partial run already gives a usable (R = 1) benchmark. The loss
measurement (the main table) is measured before the diagnostic measurements.
Retrained models go to demo/run/lds/<job-key>/ (git-ignored), the assembled ground truth to
demo/run/lds_truth/<job-key>/, the table to bench/results/lds_demo.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)

from attribution.evaluation import LDSJob, collect_ground_truth, run_lds_job  # noqa: E402
from attribution.runs import DEMO_RUN, Run, write_json  # noqa: E402

# The shipped benchmark's scale. Training (shared by both jobs: the job key ignores measurements):
# 32 subsets of 500 of the 1000 digits, R seeds, 100 steps at batch 64 with a 20-step warm-up
# (the full model: 4000 steps with a 100-step warm-up on all 1000).
TRAIN = dict(num_subsets=32, num_seeds=2, alpha=0.5, subset_seed=0, steps=100, warmup_steps=20,
             query_set="queries", measure_seed=0)
LOSS_JOB = LDSJob(**TRAIN, measurements=("loss",), num_draws=128)
DIAG_JOB = LDSJob(**TRAIN, measurements=("elbo", "elbo-simple", "trajectory", "lt:49", "lt:199", "lt:499", "lt:799"),
                  num_draws=64)
JOBS = (LOSS_JOB, DIAG_JOB)

KFAC_DAMPINGS = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
TRAK_RELATIVE_DAMPINGS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # x mean eigenvalue of the projected GGN
RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = torch.device("cpu")


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
    return run.has_model() and (run.path / "samples" / f"{TRAIN['query_set']}.safetensors").exists()


def measure_and_collect(run: Run, num_seeds: int, prog) -> None:
    for job in JOBS:
        part = replace(job, num_seeds=num_seeds)
        log(f"measure {', '.join(part.measurements)} on seeds 0..{num_seeds - 1}")
        run_lds_job(run, part, stages=("measure",), progress=prog, device=DEVICE)
        collect_ground_truth(run, part)
        log(f"ground truth ({num_seeds} seed(s)) saved: {', '.join(part.measurements)}")


def build_ground_truth(run: Run) -> None:
    prog = progress_printer()
    measured = 0
    for r in range(LOSS_JOB.num_seeds):
        part = replace(LOSS_JOB, num_seeds=r + 1)
        log(f"train seed {r} of every subset")
        run_lds_job(run, part, stages=("train",), progress=prog, device=DEVICE)
        if queries_ready(run):
            measure_and_collect(run, r + 1, prog)
            measured = r + 1
    if measured < LOSS_JOB.num_seeds:
        while not queries_ready(run):
            log("waiting for the demo model and its query samples")
            time.sleep(60)
        measure_and_collect(run, LOSS_JOB.num_seeds, prog)


# ----------------------------------------------------------------------------- table


def best_truth(run: Run, measurement: str):
    from attribution.evaluation import find_ground_truth

    return find_ground_truth(run, measurement)


def table(run: Run, only: set[str] | None = None) -> dict:
    """LDS of every method on the stored ground truth; writes results after each method."""
    from attribution import lds as L
    from attribution.influence import InfluenceSettings, influence_scores

    out_json = RESULTS / "lds_demo.json"
    res = json.loads(out_json.read_text()) if out_json.exists() else {}
    gt = best_truth(run, "loss")
    queries, _ = run.load_samples("queries")
    q_idx = list(range(gt.num_queries))
    res["scale"] = {"images": gt.num_train, "resolution": run.config["image_size"], "queries": gt.num_queries,
                    **{k: v for k, v in gt.meta.items() if k in ("num_subsets", "num_seeds", "num_draws", "steps",
                                                                  "warmup_steps", "alpha", "measure_seed")},
                    "full_model_steps": run.config["train"]["steps"], "batch_size": run.config["train"]["batch_size"]}
    res.setdefault("methods", {})

    def save():
        write_json(out_json, res)
        (RESULTS / "lds_demo.md").write_text(markdown(res))

    def want(name):
        return only is None or any(o in name for o in only)

    if gt.num_seeds >= 2:
        ex = L.exact_retraining_lds(gt)
        res["methods"]["exact retraining"] = {"lds": ex.mean, "sem": ex.sem, "damping": None}
    pix = L.lds(__import__("attribution.baselines", fromlist=["pixel_scores"]).pixel_scores(run, queries["images"]), gt)
    res["methods"]["pixel cosine"] = {"lds": pix.mean, "sem": pix.sem, "damping": None}
    save()

    for method in ("kfac", "ekfac"):
        for fisher in ("mc", "empirical"):
            for kt in ("expand", "reduce"):
                name = f"{'K-FAC' if method == 'kfac' else 'EK-FAC'} {fisher} {kt}"
                if not want(name):
                    continue
                t0 = time.time()
                log(f"{name}: scores")
                try:
                    fn = lambda d: influence_scores(run, "queries", q_idx, InfluenceSettings(  # noqa: E731
                        method=method, fisher=fisher, kfac_type=kt, damping=d))
                    rows, best = L.damping_sweep(fn, KFAC_DAMPINGS, gt)
                except Exception as exc:  # record and go on with the other methods
                    res["methods"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                    save()
                    continue
                at_default = next(r for r in rows if r["damping"] == 1e-8)
                res["methods"][name] = {"lds_at_1e-8": at_default["mean"], "sem_at_1e-8": at_default["sem"],
                                        "lds": best["mean"], "sem": best["sem"], "damping": best["damping"],
                                        "sweep": [{k: r.get(k) for k in ("damping", "mean", "sem", "error")} for r in rows],
                                        "seconds": time.time() - t0}
                save()

    from attribution.baselines import ClipUnavailable, clip_scores, trak_attribution

    for variant, name in (("trak", "TRAK"), ("dtrak", "D-TRAK")):
        if not want(name):
            continue
        t0 = time.time()
        log(f"{name}: scores")
        rows = []
        for rel in TRAK_RELATIVE_DAMPINGS:
            r = trak_attribution(run, queries["images"], variant=variant, relative_damping=rel, device=DEVICE)
            s = L.lds(r.scores, gt)
            rows.append({"damping": r.damping, "relative": rel, "mean": s.mean, "sem": s.sem})
        best = max(rows, key=lambda r: -math.inf if math.isnan(r["mean"]) else r["mean"])
        res["methods"][name] = {"lds": best["mean"], "sem": best["sem"], "damping": best["damping"],
                                "sweep": rows, "seconds": time.time() - t0}
        save()

    if want("CLIP"):
        try:
            s = L.lds(clip_scores(run, queries["images"], device=DEVICE), gt)
            res["methods"]["CLIP cosine"] = {"lds": s.mean, "sem": s.sem, "damping": None}
        except ClipUnavailable as exc:
            res["methods"]["CLIP cosine"] = {"error": f"not run: {exc}"}
        save()

    if want("diagnostics"):
        res["diagnostics"] = diagnostics(run, gt, q_idx)
        save()
    return res


def diagnostics(run: Run, gt, q_idx) -> dict:
    """Observations 1-3 (paper §4.1) with K-FAC (MC, expand) at damping 1e-8."""
    from attribution import lds as L
    from attribution.evaluation import find_ground_truth
    from attribution.influence import InfluenceSettings, influence_scores

    def kfac(meas, approx=None):
        return influence_scores(run, "queries", q_idx, InfluenceSettings(damping=1e-8, measurement=meas,
                                                                         approx_measurement=approx))

    out = {}
    loss_scores = kfac("loss")
    pva = L.predicted_vs_actual(loss_scores, gt)
    out["predicted_vs_actual_loss"] = {"fraction_predicted_increase": pva["fraction_predicted_increase"],
                                       "fraction_actual_increase": pva["fraction_actual_increase"],
                                       "predicted": pva["predicted"].tolist(), "actual": pva["actual"].tolist()}
    truths = {}
    for meas in ("loss",) + DIAG_JOB.measurements:
        try:
            truths[meas] = find_ground_truth(run, meas)
        except Exception:
            continue
    out["model_vs_model_correlation"] = {m: {k: v for k, v in L.model_correlation(t).items() if k != "matrix" and k != "labels"}
                                         for m, t in truths.items()}
    lts = [m for m in truths if m.startswith("lt:")]
    if lts:
        rows, cols, mat = L.cross_lds({m: kfac(m) for m in lts}, {m: truths[m] for m in lts})
        out["cross_lds_lt"] = {"attributed": rows, "true": cols, "matrix": mat.tolist()}
    for meas in ("elbo", "trajectory"):
        if meas in truths:
            out[f"lds_{meas}"] = {"own gradient": L.lds(kfac(meas), truths[meas]).mean,
                                  "loss gradient (m. loss)": L.lds(loss_scores, truths[meas]).mean}
    return out


def markdown(res: dict) -> str:
    sc = res.get("scale", {})
    lines = ["# LDS benchmark of the demo run (loss measurement)", "",
             "Scale: " + ", ".join(f"{k} = {v}" for k, v in sc.items()), "",
             "| method | LDS at damping 1e-8 | LDS at best damping | best damping |", "|---|---|---|---|"]
    for name, r in res.get("methods", {}).items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | |")
            continue
        d = r.get("damping")
        at = f"{r['lds_at_1e-8']:.3f} ± {r['sem_at_1e-8']:.3f}" if "lds_at_1e-8" in r else ""
        lines.append(f"| {name} | {at} | {r['lds']:.3f} ± {r['sem']:.3f} | {'' if d is None else f'{d:.0e}'} |")
    if "counterfactual" in res:
        lines += ["", "## Retraining without top influences", "", "```", json.dumps(res["counterfactual"], indent=1), "```"]
    if "diagnostics" in res:
        d = {k: v for k, v in res["diagnostics"].items() if k != "predicted_vs_actual_loss"}
        p = res["diagnostics"].get("predicted_vs_actual_loss", {})
        lines += ["", "## Diagnostics", "",
                  f"Predicted vs actual loss change: predicted increase in {p.get('fraction_predicted_increase')} "
                  f"of (query, subset) pairs, actual increase in {p.get('fraction_actual_increase')}.", "",
                  "```", json.dumps(d, indent=1), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", action="store_true", help="only (re)compute the LDS table")
    ap.add_argument("--only", default=None, help="comma-separated name fragments of the methods to (re)compute")
    args = ap.parse_args()
    run = Run(DEMO_RUN)
    if not args.table:
        build_ground_truth(run)
    table(run, set(args.only.split(",")) if args.only else None)
    log("table written to bench/results/lds_demo.{json,md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
