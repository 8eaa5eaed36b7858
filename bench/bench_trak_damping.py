"""TRAK / D-TRAK damping: seed-to-seed stability AND LDS at each relative damping, at the defaults.

TRAK's lambda trades noise for fidelity: a small lambda inverts the projected Gram matrix's small
eigenvalues, where the Monte-Carlo noise of the training features lives; a large one tends to a
plain gradient dot product. The library default (``relative_damping`` x the mean non-zero
eigenvalue) is chosen from this table. For each relative damping it scores the run's queries with
the default TRAK / D-TRAK pipeline at two seeds (draws AND projection differ; features cached by
bench/stability_methods.py, so only the scoring is redone), and reports

- the two seeds' agreement (Spearman, top-16 proponent / opponent overlaps, mean over queries)
  and the split-half prediction of one seed;
- the LDS of each seed's scores against the run's stored loss ground truth (mean of the two
  seeds; +- the standard error over queries), with K-FAC at its defaults on the same seeds as the
  reference.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_trak_damping.py --run demo/cifar2 \
        --out bench/results/trak_damping_cifar2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attribution import lds as L  # noqa: E402
from attribution.evaluation import find_ground_truth  # noqa: E402
from attribution.runs import open_run, write_json  # noqa: E402
from attribution.stability import agreement  # noqa: E402
from attribution.trak import DEFAULT_RELATIVE_DAMPING, trak_attribution  # noqa: E402

import stability_methods as sm  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="demo/cifar2")
    ap.add_argument("--variants", default="trak,dtrak")
    ap.add_argument("--relative", default="0.1,0.3,1,3,10", help="relative dampings (x mean eigenvalue)")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--top", type=int, default=16)
    ap.add_argument("--out", default="bench/results/trak_damping_cifar2")
    return ap.parse_args(argv)


def lds_of(scores: torch.Tensor, gt) -> L.LDSResult:
    """LDS of ``scores [Q, N]`` on the ground truth's queries (the first ``gt.num_queries``)."""
    return L.lds(scores[: gt.num_queries], gt)


def mean_lds(pair: list[torch.Tensor], gt) -> dict:
    per_query = torch.stack([lds_of(s, gt).per_query for s in pair]).mean(0)
    r = L.summarize(per_query)
    return {"lds": round(r.mean, 3), "lds_sem": round(r.sem, 3)}


def main(argv=None) -> int:
    a = parse_args(argv)
    run = open_run(a.run)
    images = run.load_samples("queries")[0]["images"].float()
    idx = list(range(images.shape[0]))
    seeds = [int(s) for s in a.seeds.split(",")]
    gt = find_ground_truth(run, "loss")
    rows = []
    kfac = [sm.kfac_default(run, s, idx)[0] for s in seeds]
    rows.append({"method": "K-FAC (defaults)", "relative": None, **agreement(kfac[0], kfac[1], a.top),
                 **mean_lds(kfac, gt)})
    print(rows[-1], flush=True)
    for variant in a.variants.split(","):
        for rel in [float(x) for x in a.relative.split(",")]:
            res = [trak_attribution(run, images, variant=variant, seed=s, device="cpu", query_indices=idx,
                                    query_set="queries", relative_damping=rel, k=a.top) for s in seeds]
            pair = [r.scores for r in res]
            pred = sum(sum(x.stability for x in r.reliability) / len(r.reliability) for r in res) / len(res)
            rows.append({"method": "TRAK" if variant == "trak" else "D-TRAK", "relative": rel,
                         **agreement(pair[0], pair[1], a.top), "predicted": round(pred, 3), **mean_lds(pair, gt),
                         "default": rel == DEFAULT_RELATIVE_DAMPING[variant]})
            print(rows[-1], flush=True)
    out = Path(a.out)
    data = {"run": a.run, "seeds": seeds, "queries": len(idx), "lds_queries": gt.num_queries,
            "ground_truth": {k: gt.meta.get(k) for k in ("num_subsets", "num_seeds", "num_draws", "steps", "alpha")},
            "rows": rows}
    write_json(out.with_suffix(".json"), data)
    out.with_suffix(".md").write_text(markdown(data))
    return 0


def _f(v, d=3):
    return "-" if v is None else f"{v:.{d}f}"


def markdown(data: dict) -> str:
    gt = data["ground_truth"]
    lines = [f"# TRAK / D-TRAK damping: stability and LDS ({data['run']})", "",
             f"Default pipelines (training and query draws, projection) at seeds {data['seeds']}, only the relative "
             f"damping changed (lambda = relative x the mean non-zero eigenvalue of the projected Gram matrix / N). "
             f"Stability: mean over {data['queries']} queries; 'predicted' = the split-half estimate of one seed. "
             f"LDS: each seed's scores against the stored loss ground truth ({gt['num_subsets']} subsets x "
             f"{gt['num_seeds']} seeds, alpha {gt['alpha']}, {gt['steps']} steps), first {data['lds_queries']} "
             f"queries, per-query LDS averaged over the two seeds, +- s.e. over queries. "
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_trak_damping.py --run {data['run']}`.", "",
             "| method | relative damping | Spearman | top-16 proponents | top-16 opponents | predicted Spearman | LDS |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        rel = "-" if r["relative"] is None else f"{r['relative']:g}" + (" (default)" if r.get("default") else "")
        lines.append(f"| {r['method']} | {rel} | {_f(r['spearman'])} | {_f(r['top_pos'], 1)} | {_f(r['top_neg'], 1)} "
                     f"| {_f(r.get('predicted'))} | {_f(r['lds'])} ± {_f(r['lds_sem'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
