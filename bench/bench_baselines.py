"""Benchmark TRAK / D-TRAK featurisation and scoring on the demo run (CPU, one thread).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_baselines.py

Measures, at projection dims 2048 and 8192:
- featurisation throughput (training examples / s: per-example gradients + SJLT projection) for
  TRAK (loss, random t) and D-TRAK (square norm, K = 10 uniform timesteps), each with 10 (t, eps)
  draws per example (the paper used 250 on a GPU), on the first ``--n-feat`` training images;
- scoring time for the 16 query samples against all N = 1000 training examples: Gram
  eigendecomposition (once per feature set, cached in practice) and the score product, from
  real features of all 1000 training images computed with 1 draw (timing depends only on shapes).
Nothing is written into the demo run (features are not cached). Results: bench/results/baselines_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attribution import baselines as bl  # noqa: E402
from attribution.gradients import kfac_parameters  # noqa: E402
from attribution.projection import make_projector  # noqa: E402
from attribution.runs import Run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(ROOT / "demo" / "run"))
    ap.add_argument("--n-feat", type=int, default=256, help="training images for the throughput measurement")
    ap.add_argument("--draws", type=int, default=10)
    args = ap.parse_args()
    run = Run(Path(args.run))
    unet = run.load_unet(torch.device("cpu"))
    schedule = run.schedule()
    images = run.dataset().tensors()
    queries = run.load_samples("queries")[0]["images"]
    N, Q = images.shape[0], queries.shape[0]
    P = sum(p.numel() for p in kfac_parameters(unet))
    dims = (2048, 8192)
    res = {"device": "cpu", "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "num_train": N, "num_queries": Q, "num_params": P, "draws": args.draws, "n_feat": args.n_feat,
           "featurisation": [], "scoring": []}
    for variant in ("trak", "dtrak"):
        s = bl.TrakSettings(variant=variant, proj_dim=dims[0], projection="identity", num_timesteps=args.draws,
                            train_draws=2 * args.draws, query_draws=2 * args.draws)
        ident = make_projector("identity", P, P)
        t0 = time.perf_counter()
        g = bl.featurize(unet, schedule, images[:args.n_feat], s, ident, num_draws=args.draws)
        t_grad = time.perf_counter() - t0
        for k in dims:
            proj = make_projector("sjlt", P, k, seed=0)
            proj.project(g[:1])  # build the hash once (part of setup, cached by the projector)
            t0 = time.perf_counter()
            proj.project(g)
            t_proj = time.perf_counter() - t0
            row = {"variant": variant, "proj_dim": k, "examples": args.n_feat, "gradient_s": round(t_grad, 3),
                   "projection_s": round(t_proj, 3),
                   "examples_per_s": round(args.n_feat / (t_grad + t_proj), 2)}
            res["featurisation"].append(row)
            print(row, flush=True)
    # scoring: real features of all N training images (1 draw) and the Q queries
    s1 = bl.TrakSettings(variant="trak", proj_dim=dims[0], projection="identity")
    t0 = time.perf_counter()
    G = bl.featurize(unet, schedule, images, s1, make_projector("identity", P, P), num_draws=1)
    Gq = bl.featurize(unet, schedule, queries, s1, make_projector("identity", P, P), num_draws=1,
                      offset=bl.QUERY_INDEX_OFFSET)
    res["scoring_feature_s"] = round(time.perf_counter() - t0, 2)
    for k in dims:
        proj = make_projector("sjlt", P, k, seed=0)
        phi, phi_q = proj.project(G), proj.project(Gq)
        t0 = time.perf_counter()
        eig = bl.gram_eigen(phi)
        t_eig = time.perf_counter() - t0
        t0 = time.perf_counter()
        sc = bl.scores_from_features(phi_q, phi, eig.default_damping(), eig)
        t_score = time.perf_counter() - t0
        assert sc.shape == (Q, N) and torch.isfinite(sc).all()
        row = {"proj_dim": k, "num_train": N, "num_queries": Q, "gram_eigh_s": round(t_eig, 3),
               "score_s": round(t_score, 4), "mode": eig.mode}
        res["scoring"].append(row)
        print(row, flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "baselines_cpu.json").write_text(json.dumps(res, indent=2))
    lines = [
        "# TRAK / D-TRAK on the demo run (CPU, 1 thread)",
        "",
        f"`OMP_NUM_THREADS=1 .venv/bin/python bench/bench_baselines.py` on {res['cpu']} (torch {res['torch']}, "
        f"1 thread; machine shared with other jobs, so times are upper bounds). Model: demo run, tiny preset, "
        f"{P} Linear/Conv2d parameters; N = {N} training images at 16x16; {Q} queries. SJLT projection (s = 1).",
        "",
        f"## Featurisation ({args.draws} (t, eps) draws per example, first {args.n_feat} training images)",
        "",
        "| variant | proj dim | gradients (s) | projection (s) | examples / s |",
        "|---|---|---|---|---|",
    ]
    for r in res["featurisation"]:
        lines.append(f"| {r['variant']} | {r['proj_dim']} | {r['gradient_s']} | {r['projection_s']} | {r['examples_per_s']} |")
    lines += [
        "",
        f"Extrapolated: featurising all {N} training images costs about N / (examples/s); "
        "cost grows linearly with the number of draws (the paper's 250 draws is 25x).",
        "",
        f"## Scoring ({Q} queries x {N} training examples, float64 solve)",
        "",
        "| proj dim | Gram eigendecomposition (s, once per cached feature set) | scores (s) | space |",
        "|---|---|---|---|",
    ]
    for r in res["scoring"]:
        lines.append(f"| {r['proj_dim']} | {r['gram_eigh_s']} | {r['score_s']} | {r['mode']} (N <= k: N x N Gram) |")
    lines += ["", f"Scoring features: all {N} training images with 1 draw ({res['scoring_feature_s']} s incl. queries); "
              "the timing depends only on the shapes, not on the number of draws."]
    (out / "baselines_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
