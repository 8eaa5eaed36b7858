"""Gallery stability vs Monte-Carlo budget: how much do two independent seeds agree?

``--methods`` picks what is measured (comma-separated):

- ``kfac`` (default): the K-FAC estimator grid below;
- ``kfac-default``, ``trak``, ``dtrak``: each method's DEFAULT library pipeline
  (InfluenceSettings() / TrakSettings(variant=...) with only the seed changed; for TRAK / D-TRAK
  the seed changes the draws AND the projection), run twice with the two ``--seeds``. The times
  are wall seconds of the stages each call built (bench/stability_methods.py); TRAK shares
  K-FAC's gradient store and query gradients, so its time from a fresh clone is K-FAC's plus its
  own projection and scoring. ``--proj-dims`` measures TRAK / D-TRAK at several projection
  dimensions (same draws); ``--dtrak-preview`` also scores D-TRAK after its store's first two
  rounds (half the training draws), before the rest is built.

For each estimator choice (draw scheme x training draws x query draws) it computes K-FAC
influence scores ``[Q, N]`` twice, with two independent seeds, and reports the mean over queries
of the Spearman correlation and of the top-16 proponent / opponent overlaps, with the wall time of
one seed's gradients. The preconditioner (factors at ``--factor-draws``) is shared by both seeds:
its noise was measured negligible (issue 11: Spearman 1.00 when only the factors are redrawn).
Training gradients are streamed (no store), so this measures the estimator, not the cache.

    OMP_NUM_THREADS=1 python bench/bench_stability.py --run demo/run --schemes iid,stratified,common \
        --train-draws 8 --query-draws 256 --out bench/results/stability_demo
    OMP_NUM_THREADS=1 python bench/bench_stability.py --run demo/run --methods kfac-default,trak,dtrak \
        --seeds 0,1 --proj-dims 2048,8192,16384 --dtrak-preview --out bench/results/stability_demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attribution.curvature import CurvatureConfig, curvature_factors, preconditioner_from_factors  # noqa: E402
from attribution.gradients import per_example_gradients  # noqa: E402
from attribution.influence import QUERY_OFFSET, training_images  # noqa: E402
from attribution.measurements import DrawOptions, Measurement  # noqa: E402
from attribution.runs import open_run, write_json  # noqa: E402
from attribution.stability import agreement  # noqa: E402

import stability_methods as sm  # noqa: E402

LOSS = Measurement("loss")


def scores_for_seed(run, unet, schedule, pre, queries, images, scheme, train_draws, query_draws, seed, hflip,
                    proposal=None):
    """``(scores [Q, N], seconds)`` for one seed of one estimator (``proposal``: per scheme)."""
    proposal = proposal or {}
    t0 = time.perf_counter()
    opts_q = DrawOptions(scheme=scheme)
    gq = per_example_gradients(unet, schedule, queries, LOSS, query_draws, seed,
                               offset=[QUERY_OFFSET + i for i in range(len(queries))], options=opts_q)
    pq = pre.apply(gq).float()
    opts_t = DrawOptions(scheme=scheme, hflip=hflip, proposal=proposal.get(scheme))
    parts = []
    for start in range(0, images.shape[0], 64):
        g = per_example_gradients(unet, schedule, images[start:start + 64], LOSS, train_draws, seed,
                                  offset=start, options=opts_t)
        parts.append(pq @ g.T)
    return torch.cat(parts, 1), time.perf_counter() - t0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="demo/run")
    ap.add_argument("--methods", default="kfac", help="comma-separated: kfac (the estimator grid), kfac-default, "
                    "trak, dtrak (the default pipelines)")
    ap.add_argument("--schemes", default="iid,stratified,common")
    ap.add_argument("--train-draws", default="8", help="comma-separated list (kfac grid)")
    ap.add_argument("--query-draws", default="256", help="comma-separated list (kfac grid)")
    ap.add_argument("--factor-draws", type=int, default=2)
    ap.add_argument("--damping", type=float, default=1e-8)
    ap.add_argument("--seeds", default="1,2", help="the two seeds compared")
    ap.add_argument("--proj-dims", default="", help="TRAK / D-TRAK projection dims (default: TrakSettings')")
    ap.add_argument("--dtrak-preview", action="store_true", help="also score D-TRAK after two store rounds")
    ap.add_argument("--jl-only", action="store_true", help="TRAK: two projection seeds on the SAME draws (the "
                    "first seed's store) at each --proj-dims: the projection's noise alone")
    ap.add_argument("--top", type=int, default=16)
    ap.add_argument("--out", default="bench/results/stability_demo")
    a = ap.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = set(a.methods) - {"kfac", "kfac-default", "trak", "dtrak"}
    if bad:
        ap.error(f"unknown method(s) {', '.join(sorted(bad))}")
    return a


def load_results(out: Path) -> dict:
    path = out.with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def save_results(out: Path, data: dict) -> None:
    write_json(out.with_suffix(".json"), data)
    write_markdown(out, data)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    data = load_results(out)
    if "kfac" in a.methods:
        kfac_grid(a, data, out)
    defaults = [m for m in a.methods if m != "kfac"]
    if defaults:
        default_pipelines(a, defaults, data, out)
    if a.jl_only:
        jl_only(a, data, out)
    save_results(out, data)
    return 0


def kfac_grid(a, data: dict, out: Path) -> None:
    """The K-FAC estimator grid: streamed training gradients, factors shared by both seeds."""
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
    proposal, proposal_s = {}, 0.0  # per scheme that samples t from a proposal
    for scheme in set(a.schemes.split(",")) & {"importance", "antithetic"}:
        from attribution.proposal import pilot_proposal

        t0 = time.perf_counter()
        proposal[scheme] = pilot_proposal(unet, schedule, images, pre.apply, 0, antithetic=scheme == "antithetic")
        proposal_s = time.perf_counter() - t0
        print(scheme, "proposal", [round(x, 4) for x in proposal[scheme]], f"{proposal_s:.0f} s", flush=True)
    results = data["rows"]
    done = {(r["run"], r["scheme"], r["train_draws"], r["query_draws"]) for r in results
            if r.get("method", "kfac") == "kfac"}
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
                data.update({"factor_seconds": round(factor_s, 1), "rows": results, "damping": a.damping, "seeds": a.seeds,
                             "top": a.top, "proposal": proposal, "proposal_seconds": round(proposal_s, 1)})
                save_results(out, data)


def _split_seconds(info: dict) -> tuple[float, float]:
    """(seconds of stages that build shared artifacts: gradients, factors, proposal; the rest:
    projection and scoring) of one call's recorded stages."""
    stages = info.get("stages", {})
    own = sum(v for k, v in stages.items() if k.startswith(("train features", "scores")))
    return float(sum(stages.values())) - own, float(own)


def default_pipelines(a, methods: list[str], data: dict, out: Path) -> None:
    """Two seeds of each method's default pipeline (K-FAC first: TRAK shares its store).

    Seconds "fresh" of a row: per seed, everything built for it so far (K-FAC's stages for TRAK;
    earlier calls of the same variant, e.g. D-TRAK's preview rounds) plus its own projection and
    scoring; the slower seed is reported.
    """
    from attribution.trak import DEFAULT_RELATIVE_DAMPING, TrakSettings

    run = open_run(a.run)
    Q = run.load_samples("queries")[0]["images"].shape[0]
    idx = list(range(Q))
    seeds = [int(x) for x in a.seeds.split(",")]
    dims = [int(x) for x in a.proj_dims.split(",") if x.strip()] or [None]
    rows = data["rows"]

    def emit(method, pair, extra, built, after_kfac=None):
        (sa, ia), (sb, ib) = pair
        ag = agreement(sa, sb, a.top)
        pred = {k: round(sum(i[k] for i in (ia, ib)) / 2, 3)
                for k in ("predicted_stability", "predicted_top_pos", "predicted_top_neg") if k in ia and k in ib}
        fresh = max(b + _split_seconds(i)[1] for b, i in zip(built, (ia, ib)))
        row = {"run": a.run, "method": method, "seeds": a.seeds, **extra, **ag, **pred,
               "seconds_fresh": round(fresh, 1), "seconds_after_kfac": after_kfac,
               "stages": [ia.get("stages"), ib.get("stages")]}
        rows[:] = [r for r in rows if not (r.get("method") == method and r["run"] == a.run
                                           and r.get("key") == row["key"])]
        rows.append(row)
        print(json.dumps(row), flush=True)
        save_results(out, data)

    kfac_built = None
    if "kfac-default" in methods or "trak" in methods:
        kfac = [sm.kfac_default(run, s, idx) for s in seeds]
        kfac_built = [_split_seconds(i)[0] for _, i in kfac]
        st = kfac[0][1]["settings"]
        emit("kfac-default", kfac, {"key": "default", "scheme": st["draw_scheme"], "train_draws": st["train_draws"],
                                    "query_draws": st["query_draws"], "proj_dim": None}, kfac_built)
    for variant in ("trak", "dtrak"):
        if variant not in methods:
            continue
        base = TrakSettings(variant=variant)
        plans = [(d, None) for d in dims]
        if variant == "dtrak" and a.dtrak_preview:
            plans = [(d, 2) for d in dims] + plans  # the preview first: before the store has more rounds
        built = list(kfac_built) if variant == "trak" else [0.0] * len(seeds)
        for d, rounds in plans:
            pair = [sm.trak_default(run, variant, s, idx, proj_dim=d, rounds=rounds) for s in seeds]
            built = [b + _split_seconds(i)[0] for b, (_, i) in zip(built, pair)]
            info = pair[0][1]
            after = round(max(sum(_split_seconds(i)) for _, i in pair), 1) if variant == "trak" else None
            emit(variant, pair, {"key": f"k{d or base.proj_dim}-r{rounds or 'all'}",
                                 "scheme": "fixed-timesteps" if variant == "dtrak" else base.draw_scheme,
                                 "train_draws": info["train_draws_done"], "query_draws": base.query_draws,
                                 "proj_dim": d or base.proj_dim, "damping": [i["damping"] for _, i in pair],
                                 "relative_damping": DEFAULT_RELATIVE_DAMPING[variant]},
                 built, after)


def jl_only(a, data: dict, out: Path) -> None:
    """TRAK scores from one seed's store and query gradients under two projection seeds (100, 101)."""
    from attribution import trak
    from attribution.influence import gradient_store, query_gradient_halves
    from attribution.projection import make_projector
    from attribution.trak_features import project_store

    run = open_run(a.run)
    seed = int(a.seeds.split(",")[0])
    s = trak.TrakSettings(seed=seed)
    store = gradient_store(run, s.influence_settings())
    Q = run.load_samples("queries")[0]["images"].shape[0]
    qa, qb = query_gradient_halves(run, "queries", list(range(Q)), s.influence_settings())
    for k in [int(x) for x in a.proj_dims.split(",") if x.strip()] or [s.proj_dim]:
        scores, secs = [], []
        for ps in (100, 101):
            t0 = time.perf_counter()
            proj = make_projector(s.projection, store.p, k, seed=ps)
            phi = sum(w * h for w, h in zip(store.weights(), project_store(store, proj)))
            eig = trak.gram_eigen(phi)
            scores.append(trak.scores_from_features(proj.project((qa + qb) / 2), phi, eig.default_damping(), eig))
            secs.append(time.perf_counter() - t0)
        row = {"run": a.run, "method": "trak-jl-only", "key": f"k{k}", "seeds": "100,101", "scheme": s.draw_scheme,
               "train_draws": s.train_draws, "query_draws": s.query_draws, "proj_dim": k,
               **agreement(scores[0], scores[1], a.top), "seconds_fresh": round(max(secs), 1),
               "seconds_after_kfac": round(max(secs), 1)}
        data["rows"] = [r for r in data["rows"] if not (r.get("method") == row["method"] and r["run"] == a.run
                                                          and r.get("key") == row["key"])] + [row]
        print(json.dumps(row), flush=True)
        save_results(out, data)


def write_markdown(out: Path, data: dict) -> None:
    rows = data["rows"]
    grid = [r for r in rows if r.get("method", "kfac") == "kfac"]
    defaults = [r for r in rows if r.get("method", "kfac") != "kfac"]
    top = data.get("top", 16)
    run = rows[0]["run"] if rows else "?"
    lines = [f"# Stability of the galleries vs Monte-Carlo budget ({run})", ""]
    if grid:
        lines += ["## K-FAC estimator grid", "",
                  f"Two seeds ({data.get('seeds', '1,2')}), K-FAC mc expand, damping {data.get('damping', 1e-8):g} "
                  f"(paper units), factors at {grid[0].get('factor_draws', 2)} draws shared (built in "
                  f"{data.get('factor_seconds', 0):.0f} s or cached). Mean over queries; top-{top} overlaps out of "
                  f"{top}. Seconds: one seed's query + training gradients on this CPU.", "",
                  f"| run | scheme | train draws | query draws | Spearman | top-{top} proponents | top-{top} opponents "
                  "| s / seed |", "|---|---|---|---|---|---|---|---|"]
        for r in grid:
            lines.append(f"| {r['run']} | {r['scheme']} | {r['train_draws']} | {r['query_draws']} | "
                         f"{r['spearman']:.3f} | {r['top_pos']:.1f} | {r['top_neg']:.1f} | {r['seconds_per_seed']} |")
        lines.append("")
    if defaults:
        lines += ["## Default pipelines (two independent seeds)", "",
                  "Each method's library defaults with only the seed changed (TRAK / D-TRAK: draws and projection). "
                  f"Mean over queries; top-{top} overlaps out of {top}; 'predicted' = the split-half estimate of one "
                  "run (Spearman-Brown corrected), averaged over the two seeds. Seconds (wall, on this shared "
                  "2-core CPU while other jobs ran, so inflated): 'fresh' = everything one seed builds from a fresh "
                  "clone (the slower seed); TRAK's includes K-FAC's factors, proposal pilot, gradient store and "
                  "query gradients, which it shares; 'after K-FAC' = TRAK's own projection + scoring. "
                  "'trak-jl-only': one seed's draws under two projection seeds (100, 101), the projection's noise "
                  "alone; its seconds are one projection + Gram eigendecomposition.", "",
                  f"| run | method | draws scheme | train draws | query draws | proj dim | relative damping | Spearman "
                  f"| top-{top} proponents | top-{top} opponents | predicted Spearman | s fresh | s after K-FAC |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in defaults:
            pred = r.get("predicted_stability")
            lines.append(f"| {r['run']} | {r['method']} | {r.get('scheme')} | {r['train_draws']} | {r['query_draws']} | "
                         f"{r.get('proj_dim') or '-'} | {r.get('relative_damping', '-')} | {r['spearman']:.3f} | {r['top_pos']:.1f} | {r['top_neg']:.1f} | "
                         f"{'-' if pred is None else f'{pred:.3f}'} | {r['seconds_fresh']:.0f} | "
                         f"{'-' if r.get('seconds_after_kfac') is None else r['seconds_after_kfac']} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
