"""Benchmark of the K-FAC influence engine on the demo run (CPU).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_influence.py [--run demo/run]

Measures (a) gradient-store build throughput against raw batched forward+backward throughput of
the same model (plus the per-example-gradient alternatives: vmap, per-example loop); (b) time to
re-score all 16 demo queries after changing damping, variant or measurement with the store
built; (c) K-FAC / EK-FAC factor time per variant; (d) peak memory. Works on a fresh copy of the
run (config, model, samples) so every build is cold and demo/run is left untouched. Writes
bench/results/influence_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attribution.curvature import CurvatureConfig, build_factors  # noqa: E402
from attribution.ddpm import predict_eps  # noqa: E402
from attribution.gradients import per_example_gradients  # noqa: E402
from attribution.influence import (  # noqa: E402
    InfluenceSettings,
    _CACHE,
    clear_cache,
    gradient_store,
    influence_scores,
    preconditioner,
    query_gradients,
    training_images,
)
from attribution.measurements import Measurement, draw_plan  # noqa: E402
from attribution.runs import Run  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CPU_TIMES: dict = {}


def timed(fn, *a, **kw):
    """(result, wall seconds); the process CPU seconds go to CPU_TIMES[fn name] (robust to other
    jobs competing for the shared cores)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*a, **kw)
    CPU_TIMES[getattr(fn, "__name__", str(fn))] = time.process_time() - c0
    return out, time.perf_counter() - t0


def raw_throughput(unet, schedule, images, rows=256, reps=4) -> tuple[float, float]:
    """(wall, CPU-time) rows/s of plain batched forward + backward (parameter gradients) of the
    diffusion loss on one batch of ``rows`` rows."""
    plan = draw_plan(schedule, images, Measurement("loss"), rows // 8, 0, list(range(8)))
    x, t, eps = plan.x_in.float(), plan.t, plan.target.float()

    def step():
        unet.zero_grad(set_to_none=True)
        (eps - predict_eps(unet, x, t)).pow(2).sum().backward()

    step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        step()
    unet.zero_grad(set_to_none=True)
    return rows * reps / (time.perf_counter() - t0), rows * reps / (time.process_time() - c0)


def per_example_alternatives(unet, schedule, images, K=32, B=8) -> dict:
    """Rows/s of three ways to get B per-example gradients of K draws each."""
    from torch.func import functional_call, grad, vmap

    imgs = images[:B]
    plan = draw_plan(schedule, imgs, Measurement("loss"), K, 0, list(range(B)))
    shape = imgs.shape[1:]
    x = plan.x_in.float().view(B, K, *shape)
    t = plan.t.view(B, K)
    eps = plan.target.float().view(B, K, *shape)
    params = {n: p.detach() for n, p in unet.named_parameters()}

    def f(p, xb, tb, eb):
        return (eb - functional_call(unet, p, (xb, tb)).sample).pow(2).sum() / K

    out = {}
    per_example_gradients(unet, schedule, imgs[:2], Measurement("loss"), K, 0)  # warm-up
    _, dt = timed(per_example_gradients, unet, schedule, imgs, Measurement("loss"), K, 0)
    out["hooks (ours): one batch, per-example weight grads from layer inputs x output-grads"] = B * K / dt
    try:
        _, dt = timed(vmap(grad(f), in_dims=(None, 0, 0, 0)), params, x, t, eps)
        out["torch.func vmap(grad) over examples"] = B * K / dt
    except Exception as exc:  # noqa: BLE001 - report, do not fail the benchmark
        out["torch.func vmap(grad) over examples"] = f"failed: {type(exc).__name__}"

    def loop():
        for i in range(B):
            grad(f)(params, x[i], t[i], eps[i])

    _, dt = timed(loop)
    out["autograd loop, one example (K draws) per batch"] = B * K / dt
    return out


def synthetic_score_time(n: int, p: int, q: int) -> float:
    """Seconds to score ``q`` queries against a random float16 store of ``n`` x ``p`` on disk."""
    from bench_rescore_scale import random_store  # same folder: the script's directory is on sys.path

    d = Path(tempfile.mkdtemp(prefix="bench_store_"))
    try:
        store = random_store(d, n, p)
        queries = torch.randn(q, p)
        store.score(queries)  # page cache warm, as for a store in use
        _, dt = timed(store.score, queries)
        return dt
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "demo" / "run"))
    ap.add_argument("--factor-subset", type=int, default=100,
                    help="training images used to time every factor variant (extrapolated to N)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "influence_cpu.json"))
    ap.add_argument("--keep", action="store_true", help="keep the working copy of the run")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tracemalloc.start()

    src = Path(args.run)
    work = Path(tempfile.mkdtemp(prefix="bench_influence_"))
    for name in ("config.json", "model", "samples"):
        s = src / name
        (shutil.copytree if s.is_dir() else shutil.copy)(s, work / name)
    run = Run(work)
    clear_cache()
    settings = InfluenceSettings()  # defaults: kfac, mc, expand, lambda 1e-8, 32 / 64 / 8 draws
    res: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                             "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                             "note": "2-core VM shared with other jobs; timings are noisy"},
                 "run": str(src), "settings": settings.to_dict()}
    c = _CACHE.get(run)
    from attribution.influence import _model

    unet, schedule = _model(run, c)
    images = training_images(run, c)
    n = int(images.shape[0])
    queries = list(range(min(16, int(run.load_samples("queries")[0]["images"].shape[0]))))
    res["model"] = {"params_kfac": sum(p.numel() for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                                       for p in m.parameters(recurse=False)),
                    "n_train": n, "image": list(images.shape[1:])}
    mem = {"start": rss_mib()}

    # (a) throughput
    raw_before = raw_throughput(unet, schedule, images)
    alts = per_example_alternatives(unet, schedule, images)
    store, dt_store = timed(gradient_store, run, settings)
    cpu_store = CPU_TIMES["gradient_store"]
    raw_after = raw_throughput(unet, schedule, images)
    raw = (raw_before[0] + raw_after[0]) / 2
    raw_cpu = (raw_before[1] + raw_after[1]) / 2
    rows = n * settings.train_draws
    res["a_throughput"] = {"raw_forward_backward_rows_per_s": raw, "raw_rows_per_cpu_s": raw_cpu,
                           "raw_before_after_store_rows_per_s": [raw_before[0], raw_after[0]],
                           "store_build_s": dt_store, "store_build_cpu_s": cpu_store,
                           "store_rows_per_s": rows / dt_store, "store_rows_per_cpu_s": rows / cpu_store,
                           "ratio_store_vs_raw": (rows / dt_store) / raw,
                           "ratio_store_vs_raw_cpu_time": (rows / cpu_store) / raw_cpu,
                           "store_bytes": os.path.getsize(store.dir / "grads.npy"),
                           "per_example_alternatives_rows_per_s": alts}
    mem["after store"] = rss_mib()
    print(json.dumps(res["a_throughput"], indent=1), flush=True)

    # (c) factor time per variant on a subset, and the default variant on all N
    sub = images[: args.factor_subset]
    per_variant = {}
    for method in ("kfac", "ekfac"):
        for fisher in ("mc", "empirical"):
            for kt in ("expand", "reduce"):
                cfg = CurvatureConfig(method, fisher, kt, draws=settings.factor_draws, seed=0)
                _, dt = timed(build_factors, unet, schedule, sub, cfg)
                per_variant[f"{method}/{fisher}/{kt}"] = {"s_subset": dt, "s_extrapolated_to_N": dt * n / len(sub)}
    mem["after factor variants"] = rss_mib()
    _, dt_full = timed(preconditioner, run, settings)
    res["c_factors"] = {"subset_images": len(sub), "draws_per_image": settings.factor_draws, "per_variant": per_variant,
                        "kfac_mc_expand_full_N_s (incl. eigendecomposition)": dt_full}
    print(json.dumps(res["c_factors"], indent=1), flush=True)

    # (b) re-scoring with the store built
    b = {}
    _, b["first scores: query gradients (loss, 64 draws) + precondition + score"] = timed(
        influence_scores, run, "queries", queries, settings)
    _, b["same settings again (in-process score cache)"] = timed(influence_scores, run, "queries", queries, settings)
    _, b["change damping 1e-8 -> 1e-3"] = timed(influence_scores, run, "queries", queries,
                                                InfluenceSettings(damping=1e-3))
    reduce = InfluenceSettings(kfac_type="reduce")
    _, b["build factors of a 2nd variant (kfac/mc/reduce, all N) [not a re-score]"] = timed(preconditioner, run, reduce)
    clear_cache()
    _, b["cold process: load model, store, factors (eigh), query grads from the run"] = timed(
        influence_scores, run, "queries", queries, settings)
    _, b["change variant expand -> reduce (factors on disk, first use: load + eigh)"] = timed(
        influence_scores, run, "queries", queries, reduce)
    _, b["change variant reduce -> expand, new damping 1e-5 (factors in memory)"] = timed(
        influence_scores, run, "queries", queries, InfluenceSettings(damping=1e-5))
    _, b["change measurement loss -> elbo (first time: 16 x 64-draw query gradients) [not a re-score]"] = timed(
        influence_scores, run, "queries", queries, InfluenceSettings(measurement="elbo"))
    _, b["change measurement elbo -> loss, new damping 1e-4 (query gradients cached)"] = timed(
        influence_scores, run, "queries", queries, InfluenceSettings(damping=1e-4))
    _, b["change measurement loss -> elbo at damping 1e-4 (query gradients cached)"] = timed(
        influence_scores, run, "queries", queries, InfluenceSettings(measurement="elbo", damping=1e-4))
    _, b["measurement substitution: elbo explained by the loss gradient, damping 1e-7"] = timed(
        influence_scores, run, "queries", queries,
        InfluenceSettings(measurement="elbo", approx_measurement="loss", damping=1e-7))
    _, b["int8-compressed queries"] = timed(influence_scores, run, "queries", queries,
                                            InfluenceSettings(compress_queries=True))
    pre = preconditioner(run, settings)
    qg = query_gradients(run, "queries", queries, Measurement("loss"), settings.query_draws, settings.seed)
    pq, t_pre = timed(pre.apply, qg)
    _, t_score = timed(store.score, pq.float())
    b["parts: precondition 16 queries"] = t_pre
    b["parts: score 16 x N against the fp16 store"] = t_score
    b["N=5000 (synthetic fp16 store, demo P): precondition + score"] = t_pre + synthetic_score_time(
        5000, store.p, len(queries))
    res["b_rescore_s"] = b
    print(json.dumps(b, indent=1), flush=True)
    mem["end"] = rss_mib()
    _, peak_py = tracemalloc.get_traced_memory()
    res["d_memory"] = {"max_rss_mib_by_stage": mem, "tracemalloc_peak_python_mib": peak_py / 2**20,
                       "note": "ru_maxrss is the process peak so far (includes torch buffers); tracemalloc sees "
                               "Python allocations only"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(markdown(res))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def markdown(res: dict) -> str:
    a, c, b, d = res["a_throughput"], res["c_factors"], res["b_rescore_s"], res["d_memory"]
    lines = [
        "# Influence engine benchmark (CPU)", "",
        f"Demo run ({res['model']['n_train']} training images {res['model']['image']}, "
        f"{res['model']['params_kfac']:,} K-FAC parameters), torch {res['machine']['torch']}, "
        f"OMP_NUM_THREADS={res['machine']['OMP_NUM_THREADS']} ({res['machine']['threads']} thread), "
        f"{res['machine']['note']}. Default settings: kfac / mc / expand, lambda = 1e-8, "
        f"32 train draws, 64 query draws, 8 factor draws.", "",
        "## (a) Gradient-store throughput", "",
        "| what | rows/s (wall) | rows/s (CPU time) |", "|---|---|---|",
        f"| raw batched forward+backward (256 rows; mean of before/after the store build) | "
        f"{a['raw_forward_backward_rows_per_s']:.0f} | {a['raw_rows_per_cpu_s']:.0f} |",
        f"| store build (N x 32 draws, fp16, incl. quantisation and disk) | {a['store_rows_per_s']:.0f} | "
        f"{a['store_rows_per_cpu_s']:.0f} |",
    ]
    for k, v in a["per_example_alternatives_rows_per_s"].items():
        lines.append(f"| {k} | {v if isinstance(v, str) else f'{v:.0f}'} | |")
    lines += ["", f"**Ratio store / raw = {a['ratio_store_vs_raw']:.2f} by wall clock, "
              f"{a['ratio_store_vs_raw_cpu_time']:.2f} by process CPU time** (target >= 0.7); store build "
              f"{a['store_build_s']:.0f} s, {a['store_bytes'] / 2**20:.0f} MiB.", "",
              "## (b) Re-scoring all 16 queries (store built)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in b.items()]
    lines += ["", "## (c) Factor time per variant", "",
              f"Timed on the first {c['subset_images']} training images x {c['draws_per_image']} draws, "
              "linearly extrapolated to all N.", "", "| variant | s (subset) | s (extrapolated to N) |", "|---|---|---|"]
    lines += [f"| {k} | {v['s_subset']:.1f} | {v['s_extrapolated_to_N']:.0f} |" for k, v in c["per_variant"].items()]
    lines += ["", f"kfac/mc/expand on all N (measured, incl. eigendecomposition): "
              f"{c['kfac_mc_expand_full_N_s (incl. eigendecomposition)']:.0f} s", "",
              "## (d) Memory", "", "| stage | max RSS (MiB) |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in d["max_rss_mib_by_stage"].items()]
    lines += ["", f"tracemalloc peak (Python objects only): {d['tracemalloc_peak_python_mib']:.1f} MiB", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
