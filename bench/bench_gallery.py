"""Gallery stability at the defaults, round by round, from a fresh copy of a run.

For two independent seeds it builds everything the default K-FAC gallery needs on a fresh copy of
the run (factors, timestep proposal, query gradients, the store round by round) and after every
completed round records: the cumulative wall time of that seed, the two seeds' agreement (mean over
queries of Spearman and top-16 proponent / opponent overlaps), the split-half prediction of that
agreement from seed 1 alone, and — when the run ships LDS ground truth for the loss — the LDS of
seed 1's scores (the paper's Fig. 7: LDS against the number of draws). The rounds double in pairs,
so this is also the stability-vs-time curve of the progressive gallery.

    OMP_NUM_THREADS=2 python bench/bench_gallery.py --run demo/run --out bench/results/gallery_demo
    # both seeds in parallel, one core each, then compare:
    for s in 1 2; do OMP_NUM_THREADS=1 python bench/bench_gallery.py --run demo/run --work /tmp/g --only-seed $s & done; wait
    python bench/bench_gallery.py --run demo/run --work /tmp/g --out bench/results/gallery_demo
    # a third seed (--seeds 1,2,3) adds every pair's agreement at the last round
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution import influence  # noqa: E402
from attribution.influence import InfluenceSettings, influence_result  # noqa: E402
from attribution.runs import open_run, write_json  # noqa: E402
from attribution.stability import agreement  # noqa: E402


def fresh_copy(run_dir: Path, root: Path) -> Path:
    """The run without its derived artifacts (what a fresh clone has)."""
    dst = root / run_dir.name
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("artifacts", "jobs", "lds", "train_state"))
    return dst


def loss_truth(run):
    from attribution.evaluation import find_ground_truth

    try:
        return find_ground_truth(run, "loss")
    except Exception:  # noqa: BLE001 - no ground truth shipped: the LDS column stays empty
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="demo/run")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--method", default="kfac", choices=("kfac", "ekfac"))
    ap.add_argument("--top", type=int, default=16)
    ap.add_argument("--scheme", default=None, help="training-side draw scheme (default: the library default)")
    ap.add_argument("--train-draws", type=int, default=None, help="(default: the library default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS)")
    ap.add_argument("--out", default="bench/results/gallery_demo")
    ap.add_argument("--work", default=None,
                    help="keep each seed's per-round scores here (then seeds can run as parallel processes "
                         "with --only-seed, and a last call without it compares them)")
    ap.add_argument("--only-seed", type=int, default=None, help="run this seed only and save it to --work")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    src = Path(a.run)
    n_queries = open_run(src).load_samples("queries")[0]["images"].shape[0]
    queries = list(range(n_queries))
    base = InfluenceSettings(method=a.method)
    if a.scheme:
        base = replace(base, draw_scheme=a.scheme)
    if a.train_draws:
        base = replace(base, train_draws=a.train_draws)
    rows, per_seed = [], {}
    work = Path(a.work) if a.work else None
    seeds = [a.only_seed] if a.only_seed is not None else [int(s) for s in a.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            saved = work / f"seed{seed}.pt" if work else None
            if saved is not None and saved.exists() and a.only_seed is None:
                per_seed[seed] = torch.load(saved, weights_only=False)
                continue
            influence.clear_cache()
            run = open_run(fresh_copy(src, Path(tmp) / f"seed{seed}"))
            settings = replace(base, seed=seed)
            t0, c0 = time.perf_counter(), time.process_time()
            per_seed[seed] = []
            for r in range(1, settings.rounds + 1):
                res = influence_result(run, "queries", queries, settings, rounds=r, k=a.top)
                # CPU seconds of this process: the wall time on an otherwise idle core (the machine is shared)
                per_seed[seed].append((time.process_time() - c0, res))
                print(f"seed {seed} round {r}/{settings.rounds}: {res.train_draws_done} draws, "
                      f"{per_seed[seed][-1][0]:.0f} CPU s, {time.perf_counter() - t0:.0f} wall s", flush=True)
                if saved is not None:  # after every round: a partial benchmark is still a result
                    saved.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(per_seed[seed], saved)
        if a.only_seed is not None:
            return 0
        s1, s2 = sorted(per_seed)[:2]  # the round-by-round table; more seeds: every pair at the last round
        common = min(len(per_seed[s1]), len(per_seed[s2]))  # rounds both seeds reached
        gt = loss_truth(open_run(src))
        for (t1, r1), (t2, r2) in zip(per_seed[s1][:common], per_seed[s2][:common]):
            ag = agreement(r1.scores, r2.scores, a.top)
            row = {"round": r1.rounds_done, "train_draws": r1.train_draws_done, "query_draws": base.query_draws,
                   "seconds_seed1": round(t1, 1), "seconds_seed2": round(t2, 1), **ag}
            if r1.reliability is not None:
                q = len(r1.reliability)
                row["predicted_spearman"] = sum(x.stability for x in r1.reliability) / q
                row["predicted_top_pos"] = sum(x.expected_top_pos for x in r1.reliability) / q
                row["predicted_top_neg"] = sum(x.expected_top_neg for x in r1.reliability) / q
            if gt is not None and gt.num_queries == r1.scores.shape[0]:
                from attribution.lds import lds

                res = lds(r1.scores.double(), gt)
                row["lds"], row["lds_sem"] = res.mean, res.sem
            rows.append(row)
            print(json.dumps(row), flush=True)
    pairs = final_pairs(per_seed, a.top)
    out = Path(a.out)
    settings = base.to_dict()
    write_json(out.with_suffix(".json"), {"run": a.run, "seeds": a.seeds, "settings": settings,
                                         "threads": torch.get_num_threads(), "rows": rows, "pairs": pairs})
    lines = [f"# Gallery stability round by round: {a.run} ({a.method}, defaults)", "",
             f"Independent seeds ({a.seeds}; the table compares the first two) on fresh copies of the run (no artifacts), torch threads "
             f"{torch.get_num_threads()}. Defaults: {base.train_draws} training draws in rounds "
             f"{settings and base.round_draws}, {base.query_draws} query draws, {base.factor_draws} factor draws, "
             f"scheme {base.draw_scheme}, damping {base.damping:g}. Seconds: cumulative CPU time of each seed's process from "
             "scratch (factors, proposal, query gradients, store rounds), i.e. the wall time on an idle core; "
             "the shared machine's wall times were larger. Predicted: from seed 1's split halves alone.",
             "", "| round | train draws | Spearman | predicted | top-16 prop. | predicted | top-16 opp. | predicted "
             "| LDS (loss) | s (seed 1) | s (seed 2) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lds_txt = f"{r['lds']:.3f} ± {r['lds_sem']:.3f}" if "lds" in r else "—"
        lines.append(f"| {r['round']} | {r['train_draws']} | {r['spearman']:.3f} | {r.get('predicted_spearman', float('nan')):.3f} | "
                     f"{r['top_pos']:.1f} | {r.get('predicted_top_pos', float('nan')):.1f} | {r['top_neg']:.1f} | "
                     f"{r.get('predicted_top_neg', float('nan')):.1f} | {lds_txt} | {r['seconds_seed1']:.0f} | "
                     f"{r['seconds_seed2']:.0f} |")
    if len(pairs) > 1:
        lines += ["", f"Every pair of the {len(per_seed)} seeds after the last round (the expected agreement of two "
                  "independent runs, estimated from more than one pair):", "",
                  "| seeds | train draws | Spearman | top-16 prop. | top-16 opp. |", "|---|---|---|---|---|"]
        for p in pairs:
            lines.append(f"| {p['seeds']} | {p['train_draws']} | {p['spearman']:.3f} | {p['top_pos']:.2f} | "
                         f"{p['top_neg']:.2f} |")
        mean = {k: sum(p[k] for p in pairs) / len(pairs) for k in ("spearman", "top_pos", "top_neg")}
        lines.append(f"| mean | | {mean['spearman']:.3f} | {mean['top_pos']:.2f} | {mean['top_neg']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


def final_pairs(per_seed: dict, top: int) -> list[dict]:
    """Agreement of every pair of seeds at the last round all of them reached."""
    last = min(len(v) for v in per_seed.values()) - 1
    out = []
    for s1, s2 in itertools.combinations(sorted(per_seed), 2):
        r1, r2 = per_seed[s1][last][1], per_seed[s2][last][1]
        out.append({"seeds": f"{s1},{s2}", "train_draws": r1.train_draws_done, **agreement(r1.scores, r2.scores, top)})
    return out


if __name__ == "__main__":
    raise SystemExit(main())
