"""Gallery stability vs Monte-Carlo budget: how much do two independent seeds agree?

For each estimator choice (draw scheme x training draws x query draws) it computes K-FAC
influence scores ``[Q, N]`` twice, with two independent seeds, and reports the mean over queries
of the Spearman correlation and of the top-16 proponent / opponent overlaps, with the wall time of
one seed's gradients. The preconditioner (factors at ``--factor-draws``) is shared by both seeds:
its noise was measured negligible (issue 11: Spearman 1.00 when only the factors are redrawn).
Training gradients are streamed (no store), so this measures the estimator, not the cache.

    OMP_NUM_THREADS=1 python bench/bench_stability.py --run demo/run --schemes iid,stratified,common \
        --train-draws 8 --query-draws 256 --out bench/results/stability_demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution.curvature import CurvatureConfig, curvature_factors, preconditioner_from_factors  # noqa: E402
from attribution.gradients import per_example_gradients  # noqa: E402
from attribution.influence import QUERY_OFFSET, training_images  # noqa: E402
from attribution.measurements import DrawOptions, Measurement  # noqa: E402
from attribution.runs import open_run, write_json  # noqa: E402
from attribution.stability import agreement  # noqa: E402

LOSS = Measurement("loss")


def scores_for_seed(run, unet, schedule, pre, queries, images, scheme, train_draws, query_draws, seed, hflip,
                    proposal=None):
    """``(scores [Q, N], seconds)`` for one seed of one estimator."""
    t0 = time.perf_counter()
    opts_q = DrawOptions(scheme=scheme)
    gq = per_example_gradients(unet, schedule, queries, LOSS, query_draws, seed,
                               offset=[QUERY_OFFSET + i for i in range(len(queries))], options=opts_q)
    pq = pre.apply(gq).float()
    opts_t = DrawOptions(scheme=scheme, hflip=hflip, proposal=proposal if scheme == "importance" else None)
    parts = []
    for start in range(0, images.shape[0], 64):
        g = per_example_gradients(unet, schedule, images[start:start + 64], LOSS, train_draws, seed,
                                  offset=start, options=opts_t)
        parts.append(pq @ g.T)
    return torch.cat(parts, 1), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="demo/run")
    ap.add_argument("--schemes", default="iid,stratified,common")
    ap.add_argument("--train-draws", default="8", help="comma-separated list")
    ap.add_argument("--query-draws", default="256", help="comma-separated list")
    ap.add_argument("--factor-draws", type=int, default=2)
    ap.add_argument("--damping", type=float, default=1e-8)
    ap.add_argument("--seeds", default="1,2", help="the two seeds compared")
    ap.add_argument("--top", type=int, default=16)
    ap.add_argument("--out", default="bench/results/stability_demo")
    a = ap.parse_args(argv)
    run = open_run(a.run)
    unet = run.load_unet(torch.device("cpu")).float().eval()
    schedule = run.schedule()
    images = training_images(run)
    queries = run.load_samples("queries")[0]["images"].float()
    hflip = bool(run.config["train"].get("hflip", False))
    t0 = time.perf_counter()
    tensors, meta = curvature_factors(run, images, CurvatureConfig("kfac", "mc", "expand", a.factor_draws, 0), unet=unet)
    factor_s = time.perf_counter() - t0
    pre = preconditioner_from_factors(unet, schedule, tensors, meta, a.damping)
    s1, s2 = (int(x) for x in a.seeds.split(","))
    proposal, proposal_s = None, 0.0
    if "importance" in a.schemes:
        from attribution.proposal import pilot_proposal

        t0 = time.perf_counter()
        proposal = pilot_proposal(unet, schedule, images, pre.apply, 0)
        proposal_s = time.perf_counter() - t0
        print("proposal", [round(x, 4) for x in proposal], f"{proposal_s:.0f} s", flush=True)
    out = Path(a.out)
    results = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").exists() else []
    done = {(r["run"], r["scheme"], r["train_draws"], r["query_draws"]) for r in results}
    for scheme in a.schemes.split(","):
        for td in (int(x) for x in a.train_draws.split(",")):
            for qd in (int(x) for x in a.query_draws.split(",")):
                if (a.run, scheme, td, qd) in done:
                    continue
                sa, ta = scores_for_seed(run, unet, schedule, pre, queries, images, scheme, td, qd, s1, hflip, proposal)
                sb, tb = scores_for_seed(run, unet, schedule, pre, queries, images, scheme, td, qd, s2, hflip, proposal)
                ag = agreement(sa, sb, a.top)
                row = {"run": a.run, "scheme": scheme, "train_draws": td, "query_draws": qd,
                       "factor_draws": a.factor_draws, "seconds_per_seed": round((ta + tb) / 2, 1), **ag}
                print(json.dumps(row), flush=True)
                results.append(row)
                write_json(out.with_suffix(".json"), {"factor_seconds": round(factor_s, 1), "rows": results,
                                                      "damping": a.damping, "top": a.top, "proposal": proposal,
                                                      "proposal_seconds": round(proposal_s, 1)})
    lines = [f"# Stability of K-FAC galleries vs MC budget ({a.run})", "",
             f"Two seeds ({a.seeds}), K-FAC mc expand, damping {a.damping:g} (paper units), factors at "
             f"{a.factor_draws} draws shared (built in {factor_s:.0f} s or cached). Mean over queries; "
             f"top-{a.top} overlaps out of {a.top}. Seconds: one seed's query + training gradients on this CPU.", "",
             "| run | scheme | train draws | query draws | Spearman | top-16 proponents | top-16 opponents | s / seed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['run']} | {r['scheme']} | {r['train_draws']} | {r['query_draws']} | {r['spearman']:.3f} | "
                     f"{r['top_pos']:.1f} | {r['top_neg']:.1f} | {r['seconds_per_seed']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
