"""Rebuild the shipped LDS benchmark of the demo run (ground truth, then the LDS table).

One command rebuilds everything (resumable; re-run it after an interruption)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/lds_demo.py            # ground truth, then the table
    OMP_NUM_THREADS=1 .venv/bin/python bench/lds_demo.py --table    # only the LDS table

Ground truth is built seed by seed: every subset's first seed is trained and measured before any
second seed is trained, so a partial run already gives a usable (R = 1) benchmark. The loss
measurement (the main table) is measured before the diagnostic measurements.
Retrained models go to demo/run/lds/<job-key>/ (git-ignored), the assembled ground truth to
demo/run/lds_truth/<job-key>/, the table to bench/results/lds_demo.{json,md}.

Shipped state (built 2026-11-23 on this 2-core CPU in 81 min wall clock): ground truth for all
32 subsets x 2 paired seeds of 500-step models (loss, 128 draws), the diagnostic measurements on
seed 0, every K-FAC / EK-FAC variant, TRAK and D-TRAK score matrix, and the counterfactual for
queries 0 and 1 (``--counterfactual-only`` redoes just that).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)

from attribution.evaluation import LDSJob, collect_ground_truth, run_lds_job  # noqa: E402
from attribution.runs import DEMO_RUN, Run, write_json  # noqa: E402

# The shipped benchmark's scale. Training (shared by both jobs: the job key ignores measurements):
# 32 subsets of 500 of the 1000 digits, R = 2 paired seeds, 500 steps at batch 64 with a 50-step
# warm-up (the full model: 4000 steps with a 100-step warm-up on all 1000). 500 steps = 64 epochs
# of the half-size subset; it is what fits the 2-hour budget on this 2-core CPU (64 models).
TRAIN = dict(num_subsets=32, num_seeds=2, alpha=0.5, subset_seed=0, steps=500, warmup_steps=50,
             query_set="queries", measure_seed=0)
WORKERS = 2  # training processes, one thread each
LOSS_JOB = LDSJob(**TRAIN, measurements=("loss",), num_draws=128)
# Diagnostics (observations 1-3): the first seed of every subset only, fewer draws (CPU time).
RUN_DIR = DEMO_RUN
STEM = "lds_demo"  # bench/results/<STEM>.{json,md}
DIAG_JOB = LDSJob(**{**TRAIN, "num_seeds": 1},
                  measurements=("elbo", "trajectory", "lt:49", "lt:199", "lt:499", "lt:799"), num_draws=32)

REFERENCE = ("K-FAC mc expand", 1e-8)  # the paper's default; other methods are compared with it, paired
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


def measure_and_collect(run: Run, job: LDSJob, prog) -> None:
    log(f"measure {', '.join(job.measurements)} on seeds 0..{job.num_seeds - 1}")
    run_lds_job(run, job, stages=("measure",), progress=prog, device=DEVICE)
    collect_ground_truth(run, job)
    log(f"ground truth ({job.num_seeds} seed(s)) saved: {', '.join(job.measurements)}")


def train_in_workers(job: LDSJob) -> None:
    """Train the job's models with the CLI's worker processes (one thread each; resumable)."""
    import subprocess

    cmd = [sys.executable, "-m", "attribution", "lds", "--run", str(RUN_DIR), "--stage", "train",
           "--workers", str(WORKERS), "--subsets", str(job.num_subsets), "--seeds", str(job.num_seeds),
           "--alpha", str(job.alpha), "--subset-seed", str(job.subset_seed), "--steps", str(job.steps),
           "--warmup-steps", str(job.warmup_steps), "--measurements", ",".join(job.measurements),
           "--draws", str(job.num_draws)]
    if not job.paired_seeds:
        cmd.append("--independent-seeds")
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])


def build_ground_truth(run: Run) -> None:
    """Per seed: train every subset, measure the loss; then the diagnostic measurements."""
    prog = progress_printer()
    for r in range(LOSS_JOB.num_seeds):
        part = replace(LOSS_JOB, num_seeds=r + 1)
        log(f"train seed {r} of every subset ({WORKERS} worker processes)")
        train_in_workers(part)
        while not queries_ready(run):
            log("waiting for the demo model and its query samples")
            time.sleep(60)
        measure_and_collect(run, part, prog)
    measure_and_collect(run, DIAG_JOB, prog)


# ----------------------------------------------------------------------------- table


CACHED_ONLY = False  # --cached-only: skip score matrices that are not computed yet


class NotCached(Exception):
    pass


def _score_path(run: Run, name: str) -> Path:
    d = run.artifact_dir("lds_bench_scores", {"version": 1})
    return d / (name.replace(" ", "_").replace(":", "-").replace("/", "-") + ".safetensors")


def cached_scores(run: Run, name: str, fn, force: bool = False) -> tuple[torch.Tensor, dict]:
    """Score matrix ``[Q, N]`` of ``name`` and its metadata, cached in the run's artifacts (git-ignored).

    ``fn() -> scores`` or ``(scores, extra metadata)``.
    """
    from attribution.runs import load_tensors, save_tensors

    path = _score_path(run, name)
    if path.exists():
        tensors, meta = load_tensors(path)
        return tensors["scores"], meta
    if CACHED_ONLY and not force:
        raise NotCached(name)
    t0 = time.time()
    scores = fn()
    extra = {}
    if isinstance(scores, tuple):
        scores, extra = scores
    meta = {"name": name, "seconds": time.time() - t0, **extra}
    save_tensors(path, {"scores": scores.float()}, meta)
    log(f"scores {name}: {time.time() - t0:.0f} s")
    return scores, meta


def method_scores(run: Run, q_idx: list[int], only=None):
    """Yield ``(method, damping or None, relative or None, scores [Q, N])``, computing missing ones."""
    from attribution.baselines import pixel_scores, trak_attribution
    from attribution.influence import InfluenceSettings, influence_scores

    def want(name):
        return only is None or any(o in name for o in only)

    queries, _ = run.load_samples("queries")
    images = queries["images"][q_idx]
    yield "pixel cosine", None, None, cached_scores(run, "pixel", lambda: pixel_scores(run, images))[0]
    for method, fisher, kt in [("kfac", "mc", "expand"), ("ekfac", "mc", "expand"), ("kfac", "empirical", "expand"),
                               ("kfac", "mc", "reduce"), ("ekfac", "empirical", "expand"), ("ekfac", "mc", "reduce"),
                               ("kfac", "empirical", "reduce"), ("ekfac", "empirical", "reduce")]:
        name = f"{'K-FAC' if method == 'kfac' else 'EK-FAC'} {fisher} {kt}"
        if not want(name):
            continue
        for d in KFAC_DAMPINGS:
            settings = InfluenceSettings(method=method, fisher=fisher, kfac_type=kt, damping=d)
            try:
                yield name, d, None, cached_scores(run, f"{name} {d:g}",
                                                   lambda: influence_scores(run, "queries", q_idx, settings))[0]
            except NotCached:
                continue
    for variant, name in (("trak", "TRAK"), ("dtrak", "D-TRAK")):
        if not want(name):
            continue
        for rel in TRAK_RELATIVE_DAMPINGS:
            def compute():
                r = trak_attribution(run, images, variant=variant, relative_damping=rel, device=DEVICE,
                                     query_indices=q_idx)
                return r.scores, {"damping": r.damping}

            try:
                sc, meta = cached_scores(run, f"{name} rel {rel:g}", compute)
            except NotCached:
                continue
            yield name, meta["damping"], rel, sc
    if want("CLIP"):
        from attribution.baselines import ClipUnavailable, clip_scores

        try:
            yield "CLIP cosine", None, None, cached_scores(run, "clip", lambda: clip_scores(run, images, device=DEVICE))[0]
        except ClipUnavailable as exc:
            yield "CLIP cosine", None, None, exc
        except NotCached:
            pass


def table(run: Run, only: set[str] | None = None, scores_only: bool = False) -> dict:
    """LDS of every method on the stored ground truth; writes results after each method."""
    from attribution import lds as L
    from attribution.evaluation import find_ground_truth

    if scores_only:
        queries, _ = run.load_samples("queries")
        for name, d, _, _ in method_scores(run, list(range(queries["images"].shape[0])), only):
            log(f"have {name} {d}")
        return {}
    out_json = RESULTS / f"{STEM}.json"
    old = json.loads(out_json.read_text()) if out_json.exists() else {}
    # keep only a counterfactual result made with this benchmark's recipe; everything else is redone
    res = {k: v for k, v in old.items() if k == "counterfactual" and v.get("steps") == TRAIN["steps"]}
    gt = find_ground_truth(run, "loss")
    q_idx = list(range(gt.num_queries))
    res["run"] = "the demo run" if RUN_DIR == DEMO_RUN else f"{RUN_DIR.name} ({describe_dataset(run)})"
    res["scale"] = {"images": gt.num_train, "resolution": run.config["image_size"], "queries": gt.num_queries,
                    **{k: v for k, v in gt.meta.items() if k in ("num_subsets", "num_seeds", "num_draws", "steps",
                                                                  "warmup_steps", "alpha", "measure_seed")},
                    "full_model_steps": run.config["train"]["steps"], "batch_size": run.config["train"]["batch_size"]}
    res["methods"] = {}

    def save():
        write_json(out_json, res)
        (RESULTS / f"{STEM}.md").write_text(markdown(res))

    ex = None
    if gt.num_seeds >= 2:
        ex = L.exact_retraining_lds(gt)
        res["methods"]["exact retraining"] = {"lds": ex.mean, "sem": ex.sem, "damping": None}
    sweeps: dict[str, list] = {}
    for name, d, rel, sc in method_scores(run, q_idx, only):
        if isinstance(sc, Exception):
            res["methods"][name] = {"error": f"not run: {sc}"}
            save()
            continue
        r = L.lds(sc, gt)
        sweeps.setdefault(name, []).append({"damping": d, "relative": rel, "mean": r.mean, "sem": r.sem,
                                            "per_query": r.per_query})
    reference = next((r["per_query"] for r in sweeps.get(REFERENCE[0], []) if r["damping"] == REFERENCE[1]), None)
    for name, rows in sweeps.items():
        best = max(rows, key=lambda r: -math.inf if math.isnan(r["mean"]) else r["mean"])
        entry = {"lds": best["mean"], "sem": best["sem"], "damping": best["damping"]}
        if reference is not None:
            # paired over queries: the same queries and ground truth for both methods
            diff = L.summarize(best["per_query"] - reference)
            entry.update({"minus_reference": diff.mean, "minus_reference_sem": diff.sem})
        for r in rows:
            r.pop("per_query")
        if len(rows) > 1:
            entry["sweep"] = rows
        at = [r for r in rows if r["damping"] == 1e-8 and r["relative"] is None]
        if at:
            entry.update({"lds_at_1e-8": at[0]["mean"], "sem_at_1e-8": at[0]["sem"]})
        res["methods"][name] = entry
    if ex is not None and reference is not None:
        diff = L.summarize(ex.per_query - reference)
        res["methods"]["exact retraining"].update({"minus_reference": diff.mean, "minus_reference_sem": diff.sem})
    save()
    seeded = seeded_benchmark(run, res["methods"])
    if seeded and (seeded["num_subsets"], seeded["num_seeds"]) != (gt.num_subsets, gt.num_seeds):
        res["seeded"] = seeded
        save()
    res["diagnostics"] = diagnostics(run, gt, q_idx)
    save()
    return res


def seeded_benchmark(run: Run, methods: dict) -> dict | None:
    """On the stored loss ground truth with >= 2 seeds (possibly fewer subsets): exact retraining and
    every method at the damping that was best on the main benchmark."""
    from attribution import lds as L
    from attribution.evaluation import list_ground_truth, load_ground_truth

    rows = [r for r in list_ground_truth(run) if r.get("measurement") == "loss" and r.get("num_seeds", 0) >= 2]
    if not rows:
        return None
    best = max(rows, key=lambda r: (r["num_subsets"] * r["num_seeds"], r["num_draws"]))
    gt = load_ground_truth(Path(best["path"]), run)
    ex = L.exact_retraining_lds(gt)
    out = {"num_subsets": gt.num_subsets, "num_seeds": gt.num_seeds,
           "methods": {"exact retraining": {"lds": ex.mean, "sem": ex.sem}}}
    names = {"pixel cosine": "pixel"}
    for name, m in methods.items():
        if "error" in m or name == "exact retraining":
            continue
        if name in names:
            key = names[name]
        elif name in ("TRAK", "D-TRAK"):
            rel = next(r["relative"] for r in m["sweep"] if r["damping"] == m["damping"])
            key = f"{name} rel {rel:g}"
        elif name == "CLIP cosine":
            key = "clip"
        else:
            key = f"{name} {m['damping']:g}"
        sc = cached_scores(run, key, lambda: None)[0]
        r = L.lds(sc, gt)
        out["methods"][name] = {"lds": r.mean, "sem": r.sem, "damping": m["damping"]}
        if "lds_at_1e-8" in m:
            r8 = L.lds(cached_scores(run, f"{name} 1e-08", lambda: None)[0], gt)
            out["methods"][name].update({"lds_at_1e-8": r8.mean, "sem_at_1e-8": r8.sem})
    return out


def diagnostics(run: Run, gt, q_idx) -> dict:
    """Observations 1-3 (paper §4.1) with K-FAC (MC, expand) at damping 1e-8."""
    from attribution import lds as L
    from attribution.evaluation import find_ground_truth
    from attribution.influence import InfluenceSettings, influence_scores

    def kfac(meas, approx=None):
        st = InfluenceSettings(damping=1e-8, measurement=meas, approx_measurement=approx)
        return cached_scores(run, f"K-FAC mc expand 1e-08 {meas} {approx}",
                             lambda: influence_scores(run, "queries", q_idx, st), force=True)[0]

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
    out["model_vs_model_correlation"] = {m: {k: v for k, v in L.model_correlation(t).items()
                                             if k not in ("matrix", "labels")} for m, t in truths.items()}
    lts = [m for m in truths if m.startswith("lt:")]
    if lts:
        rows, cols, mat = L.cross_lds({m: kfac(m) for m in lts}, {m: truths[m] for m in lts})
        out["cross_lds_lt"] = {"attributed": rows, "true": cols, "matrix": mat.tolist()}
    for meas in ("elbo", "trajectory"):
        if meas in truths:
            out[f"lds_{meas}"] = {"own gradient": L.lds(kfac(meas), truths[meas]).mean,
                                  "loss gradient (m. loss)": L.lds(loss_scores, truths[meas]).mean}
    return out


CF_QUERIES = (0, 1)
CF_K = 100  # 10% of the 1000 training images


def counterfactual(run: Run) -> dict:
    """Retrain without each method's top-100 for 2 queries (the same recipe as the LDS models)."""
    from attribution.evaluation import CounterfactualJob, run_counterfactual

    out_json = RESULTS / f"{STEM}.json"
    res = json.loads(out_json.read_text())
    scores = {"K-FAC mc expand (1e-8)": cached_scores(run, "K-FAC mc expand 1e-08", lambda: None)[0]}
    for name in ("TRAK", "D-TRAK"):
        sweep = res["methods"].get(name, {}).get("sweep", [])
        if sweep:
            best = max(sweep, key=lambda r: -math.inf if math.isnan(r["mean"]) else r["mean"])
            scores[f"{name} (best, rel {best['relative']:g})"] = cached_scores(run, f"{name} rel {best['relative']:g}",
                                                                               lambda: None)[0]
    scores["pixel cosine"] = cached_scores(run, "pixel", lambda: None)[0]
    job = CounterfactualJob(query_indices=CF_QUERIES, k=CF_K, num_seeds=1, steps=TRAIN["steps"],
                            warmup_steps=TRAIN["warmup_steps"], measurement="loss", num_draws=LOSS_JOB.num_draws)
    log("counterfactual retraining")
    from attribution.executor import make_executor

    with make_executor("local", workers=WORKERS) as executor:  # WORKERS training processes, resumable
        report = run_counterfactual(run, job, scores, progress=progress_printer(), device=DEVICE, executor=executor)
    res = json.loads(out_json.read_text())  # the table may have been rewritten meanwhile
    res["counterfactual"] = {"k": CF_K, "queries": list(CF_QUERIES), "steps": TRAIN["steps"], "seeds": 1,
                             "measurement": "loss", "num_draws": LOSS_JOB.num_draws,
                             "change": {m: {"mean": r["mean"], "sem": r["sem"], "per_query": r["per_query"]}
                                        for m, r in report["methods"].items()},
                             "reference_loss": report["reference_values"]}
    write_json(out_json, res)
    (RESULTS / f"{STEM}.md").write_text(markdown(res))
    return res


def describe_dataset(run: Run) -> str:
    d = run.config["dataset"]
    classes = f", classes {d['classes']}" if d.get("classes") else ""
    return f"{d['source']} {Path(d['path']).name if d.get('path') else ''}{classes}".replace("  ", " ")


def markdown(res: dict) -> str:
    sc = res.get("scale", {})
    lines = [f"# LDS benchmark of {res.get('run', 'the demo run')} (loss measurement)", "",
             "Scale: " + ", ".join(f"{k} = {v}" for k, v in sc.items()), "",
             "| method | LDS at damping 1e-8 | LDS at best damping | best damping | best minus K-FAC mc expand at 1e-8 (paired) |",
             "|---|---|---|---|---|"]
    for name, r in res.get("methods", {}).items():
        if "error" in r:
            lines.append(f"| {name} | {r['error'].split('. ')[0]} | | | |")
            continue
        d = r.get("damping")
        at = f"{r['lds_at_1e-8']:.3f} ± {r['sem_at_1e-8']:.3f}" if "lds_at_1e-8" in r else ""
        diff = f"{r['minus_reference']:+.3f} ± {r['minus_reference_sem']:.3f}" if "minus_reference" in r else ""
        lines.append(f"| {name} | {at} | {r['lds']:.3f} ± {r['sem']:.3f} | {'' if d is None else f'{d:.0e}'} | {diff} |")
    expected = [f"{a} {f} {k}" for a in ("K-FAC", "EK-FAC") for f in ("mc", "empirical") for k in ("expand", "reduce")]
    expected += ["TRAK", "D-TRAK", "pixel cosine", "CLIP cosine"]
    missing = [m for m in expected if m not in res.get("methods", {})]
    if missing:
        lines += ["", f"Not computed (no cached score matrix when the table was made): {', '.join(missing)}."]
    if "seeded" in res:
        ex = res["seeded"]["methods"]["exact retraining"]
        lines += ["", f"Exact-retraining reference (one seed against the other): {ex['lds']:.3f} ± {ex['sem']:.3f}."]
        if abs(ex["lds"]) < 2 * ex["sem"]:
            lines[-1] += (" Near 0 means the ground truth at this scale is dominated by training-seed noise, so no "
                          "method can score above noise here.")
    if "seeded" in res:
        sd = res["seeded"]
        lines += ["", f"## Sub-benchmark with {sd['num_seeds']} seeds per subset ({sd['num_subsets']} subsets)", "",
                  "Target: the seed-averaged loss; methods at the damping that was best above.", "",
                  "| method | LDS at damping 1e-8 | LDS at that damping | damping |", "|---|---|---|---|"]
        for name, r in sd["methods"].items():
            d = r.get("damping")
            at = f"{r['lds_at_1e-8']:.3f} ± {r['sem_at_1e-8']:.3f}" if "lds_at_1e-8" in r else ""
            lines.append(f"| {name} | {at} | {r['lds']:.3f} ± {r['sem']:.3f} | {'' if d is None else f'{d:.0e}'} |")
    if "counterfactual" in res:
        cf = res["counterfactual"]
        lines += ["", "## Retraining without top influences", "",
                  f"Remove each method's top-{cf['k']} training images (largest tau: proponents) for queries "
                  f"{cf['queries']}, retrain ({cf['steps']} steps, {cf['seeds']} seed) and report the change of the "
                  f"{cf['measurement']} against a model retrained on all the data with the same recipe and seed "
                  f"({cf['num_draws']} MC draws, shared).", "",
                  "| removed | mean change ± s.e. | per query |", "|---|---|---|"]
        for m, r in cf["change"].items():
            lines.append(f"| {m} | {r['mean']:.4f} ± {r['sem']:.4f} | {', '.join(f'{v:.4f}' for v in r['per_query'])} |")
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
    ap.add_argument("--scores", action="store_true",
                    help="only compute (and cache) the methods' score matrices (needs no ground truth)")
    ap.add_argument("--cached-only", action="store_true", help="table: use only score matrices computed already")
    ap.add_argument("--no-counterfactual", action="store_true", help="skip the counterfactual retraining")
    ap.add_argument("--counterfactual-only", action="store_true",
                    help="only the counterfactual retraining (needs the table for TRAK's best damping)")
    ap.add_argument("--only", default=None, help="comma-separated name fragments of the methods to include")
    ap.add_argument("--run", default=None,
                    help="another run directory (default: the demo run); needs its 'queries' sample set")
    ap.add_argument("--stem", default=None, help="results file stem (default: lds_demo, or lds_<run name>)")
    ap.add_argument("--subsets", type=int, default=None, help="M (default: 32)")
    ap.add_argument("--seeds", type=int, default=None, help="R (default: 2)")
    ap.add_argument("--steps", type=int, default=None, help="steps per retrained model (default: 500)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="their warm-up (default: 50)")
    args = ap.parse_args()
    global CACHED_ONLY, RUN_DIR, STEM, LOSS_JOB, DIAG_JOB
    CACHED_ONLY = args.cached_only
    if args.run:
        RUN_DIR = Path(args.run).resolve()
        STEM = f"lds_{RUN_DIR.name}"
    STEM = args.stem or STEM
    for key, value in (("num_subsets", args.subsets), ("num_seeds", args.seeds), ("steps", args.steps),
                       ("warmup_steps", args.warmup_steps)):
        if value is not None:
            TRAIN[key] = value
    LOSS_JOB = replace(LOSS_JOB, **TRAIN)
    DIAG_JOB = replace(DIAG_JOB, **{**TRAIN, "num_seeds": 1})
    run = Run(RUN_DIR)
    only = set(args.only.split(",")) if args.only else None
    if args.counterfactual_only:
        counterfactual(run)
        return 0
    if args.scores:
        table(run, only, scores_only=True)
        return 0
    if not args.table:
        build_ground_truth(run)
    table(run, only)
    if not args.no_counterfactual:
        counterfactual(run)
    log(f"table written to bench/results/{STEM}.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
