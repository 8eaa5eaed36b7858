"""LDS against the number of training-gradient draws, per method (the paper's Fig. 7).

For a run that has LDS ground truth for the loss, scores K-FAC, EK-FAC, TRAK and D-TRAK at their
default settings after every round of the training-side store (rounds double in pairs: 2, 2, 4,
4, ... draws) and records the LDS (mean +- standard error over queries) at each cumulative number
of draws. Every method sees the same number of draws at each row (equal Monte-Carlo budgets):
K-FAC, EK-FAC and TRAK read the same gradient store, D-TRAK its own square-norm store at the same
draw counts. A store keeps running means per half, so a finished store cannot be scored at fewer
rounds: the script works on a fresh copy of the run (no artifacts) and grows its stores round by
round (minutes of CPU on the CIFAR-2 run).

    OMP_NUM_THREADS=1 .venv/bin/python bench/lds_vs_draws.py --run demo/cifar2
    OMP_NUM_THREADS=1 .venv/bin/python bench/lds_vs_draws.py --run demo/run --methods kfac,trak,dtrak

Results: bench/results/lds_vs_draws_<run name>.{json,md} (written after every round).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from attribution.runs import open_run, write_json  # noqa: E402
from bench_gallery import fresh_copy  # noqa: E402  (the run without its derived artifacts)

RESULTS = ROOT / "bench" / "results"
LABELS = {"kfac": "K-FAC mc expand", "ekfac": "EK-FAC mc expand", "trak": "TRAK", "dtrak": "D-TRAK"}


def method_round_draws(method: str) -> list[int]:
    """Training draws of each store round at the method's defaults (D-TRAK's rounds hold multiples
    of its K fixed timesteps: 32 each; the others 2, 2, 4, 4, ..., 34)."""
    from attribution.influence import InfluenceSettings
    from attribution.trak import TrakSettings

    return TrakSettings(variant="dtrak").round_draws if method == "dtrak" else InfluenceSettings().round_draws


def score_round(run, method: str, queries: list[int], r: int):
    """Scores ``[Q, N]`` of one method at its defaults with the store grown to ``r`` rounds."""
    from attribution.influence import InfluenceSettings, influence_result
    from attribution.trak import trak_attribution

    if method in ("kfac", "ekfac"):
        return influence_result(run, "queries", queries, InfluenceSettings(method=method), rounds=r).scores
    images = run.load_samples("queries")[0]["images"][queries]
    return trak_attribution(run, images, variant=method, query_indices=queries, rounds=r).scores


def markdown(res: dict) -> str:
    methods = [m for m in LABELS if m in res["methods"]]  # (write_json sorts the keys)
    draws = sorted({r["train_draws"] for m in methods for r in res["methods"][m]})
    lines = [f"# LDS against the number of training draws: {res['run']}", "",
             f"Loss measurement; ground truth M = {res['truth']['num_subsets']} subsets x R = "
             f"{res['truth']['num_seeds']} seeds ({res['truth']['num_draws']} MC draws). Every method at its "
             "default settings (damping: K-FAC / EK-FAC 1e-8 in the paper's units; TRAK / D-TRAK their default "
             "relative damping), scored after each round of the training-side store, so all methods see the same "
             "number of draws in a row (D-TRAK's rounds hold 32 draws each: its K = 32 fixed timesteps). "
             "Mean +- standard error over the queries.", "",
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
    from attribution.lds import lds

    src = open_run(a.run)
    truth = find_ground_truth(src, "loss")
    queries = list(range(truth.num_queries))
    methods = a.methods.split(",")
    bad = [m for m in methods if m not in LABELS]
    if bad:
        print(f"error: unknown method {bad[0]!r} (choose from {', '.join(LABELS)})", file=sys.stderr)
        return 2
    out = RESULTS / f"lds_vs_draws_{Path(a.run).resolve().name}"
    res = {"run": a.run, "truth": {k: truth.meta.get(k) for k in ("num_subsets", "num_seeds", "num_draws", "steps")},
           "methods": {m: [] for m in methods}}
    draws = {m: method_round_draws(m) for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        run = open_run(fresh_copy(Path(a.run).resolve(), Path(tmp)))
        for r in range(1, max(len(d) for d in draws.values()) + 1):
            for m in (m for m in methods if r <= len(draws[m])):
                t0 = time.process_time()
                fit = lds(score_round(run, m, queries, r).double(), truth)
                res["methods"][m].append({"round": r, "train_draws": int(sum(draws[m][:r])), "lds": fit.mean,
                                          "sem": fit.sem, "cpu_seconds": round(time.process_time() - t0, 1)})
                print(f"{LABELS[m]} round {r}: {res['methods'][m][-1]}", flush=True)
            write_json(out.with_suffix(".json"), res)  # after every round: a partial curve is a result
            out.with_suffix(".md").write_text(markdown(res))
    print(f"written {out}.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
