"""LDS against the number of training-gradient draws, per method (the paper's Fig. 7).

For a run that has LDS ground truth for the loss, scores K-FAC, EK-FAC, TRAK and D-TRAK at their
default settings after every round of the training-side store (rounds double in pairs: 2, 2, 4,
4, ... draws) and records the LDS (mean +- standard error over queries) at each cumulative number
of draws. Every method sees the same number of draws at each row (equal Monte-Carlo budgets):
K-FAC, EK-FAC and TRAK read the same gradient store, D-TRAK its own square-norm store at the same
draw counts. Stores and factors come from the run's artifacts (built on first use), so run it after
``bench/lds_demo.py`` has scored the run and it costs only the scoring.

    OMP_NUM_THREADS=1 .venv/bin/python bench/lds_vs_draws.py --run demo/cifar2
    OMP_NUM_THREADS=1 .venv/bin/python bench/lds_vs_draws.py --run demo/run --methods kfac,trak

Results: bench/results/lds_vs_draws_<run name>.{json,md} (written after every method).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from attribution.runs import open_run, write_json  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LABELS = {"kfac": "K-FAC mc expand", "ekfac": "EK-FAC mc expand", "trak": "TRAK", "dtrak": "D-TRAK"}


def method_rows(run, method: str, queries: list[int], truth) -> list[dict]:
    """``[{"round", "train_draws", "lds", "sem"}]`` of one method at its defaults, round by round."""
    from attribution.influence import InfluenceSettings, influence_result
    from attribution.lds import lds
    from attribution.trak import trak_attribution

    rows = []
    settings = InfluenceSettings(method="ekfac" if method == "ekfac" else "kfac")
    draws_per_round = settings.round_draws
    images = run.load_samples("queries")[0]["images"][queries]
    for r in range(1, settings.rounds + 1):
        t0 = time.perf_counter()
        if method in ("kfac", "ekfac"):
            scores = influence_result(run, "queries", queries, settings, rounds=r).scores
        else:
            scores = trak_attribution(run, images, variant=method, query_indices=queries, rounds=r).scores
        res = lds(scores.double(), truth)
        rows.append({"round": r, "train_draws": int(sum(draws_per_round[:r])), "lds": res.mean, "sem": res.sem,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{LABELS[method]} round {r}: {rows[-1]}", flush=True)
    return rows


def markdown(res: dict) -> str:
    methods = list(res["methods"])
    draws = sorted({r["train_draws"] for m in methods for r in res["methods"][m]})
    lines = [f"# LDS against the number of training draws: {res['run']}", "",
             f"Loss measurement; ground truth M = {res['truth']['num_subsets']} subsets x R = "
             f"{res['truth']['num_seeds']} seeds ({res['truth']['num_draws']} MC draws). Every method at its "
             "default settings (damping: K-FAC / EK-FAC 1e-8 in the paper's units; TRAK / D-TRAK their default "
             "relative damping), scored after each round of the training-side store, so all methods see the same "
             "number of draws in a row. Mean +- standard error over the queries.", "",
             "| training draws | " + " | ".join(LABELS[m] for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for d in draws:
        cells = []
        for m in methods:
            hit = [r for r in res["methods"][m] if r["train_draws"] == d]
            cells.append(f"{hit[0]['lds']:.3f} ± {hit[0]['sem']:.3f}" if hit else "")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="demo/cifar2")
    ap.add_argument("--methods", default="kfac,ekfac,trak,dtrak")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from attribution.evaluation import find_ground_truth

    run = open_run(a.run)
    truth = find_ground_truth(run, "loss")
    queries = list(range(truth.num_queries))
    out = RESULTS / f"lds_vs_draws_{Path(a.run).resolve().name}"
    res = {"run": a.run, "truth": {k: truth.meta.get(k) for k in ("num_subsets", "num_seeds", "num_draws", "steps")},
           "methods": {}}
    for method in a.methods.split(","):
        if method not in LABELS:
            print(f"error: unknown method {method!r} (choose from {', '.join(LABELS)})", file=sys.stderr)
            return 2
        res["methods"][method] = method_rows(run, method, queries, truth)
        write_json(out.with_suffix(".json"), res)
        out.with_suffix(".md").write_text(markdown(res))
    print(f"written {out}.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
