"""Re-score time against the training-set size N, with 1 and 2 threads (CPU).

    .venv/bin/python bench/bench_rescore_scale.py [--run demo/run] [--sizes 1000,2000,5000]

A re-score (new damping, variant or measurement with the gradient store built) is two steps:
precondition the query gradients ``[Q, P]`` with the cached K-FAC factors, then multiply them
with the float16 store ``[N, P]``. This times both for the 16 demo queries: the preconditioning
on the demo run's own factors, the store product on random float16 stores of N rows with the
demo model's P (written to a temporary folder, page cache warm, as for a store in use). Each
figure is the median of 5 repeats. Needs the demo run's store and factors (any influence
command on demo/run builds them). Writes bench/results/rescore_scale_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attribution.gradients import GradientStore  # noqa: E402
from attribution.influence import InfluenceSettings, preconditioner, query_gradients  # noqa: E402
from attribution.measurements import Measurement  # noqa: E402
from attribution.runs import Run, write_json  # noqa: E402

REPEATS = 5


def median_time(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_store(directory: Path, n: int, p: int) -> GradientStore:
    """A complete float16 store of ``n`` random rows (one quantisation block)."""
    values = np.lib.format.open_memmap(directory / "grads.npy", mode="w+", dtype=np.float16, shape=(n, p))
    rng = np.random.default_rng(0)
    for s in range(0, n, 250):
        values[s:s + 250] = rng.standard_normal((min(n, s + 250) - s, p), dtype=np.float32).astype(np.float16)
    values.flush()
    del values
    np.save(directory / "scales.npy", np.ones((n, 1), np.float32))
    write_json(directory / "store.json", {"n": n, "p": p, "dtype": "float16", "blocks": [p]})
    write_json(directory / "progress.json", {"rows_done": n})
    return GradientStore(directory)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "demo" / "run"))
    ap.add_argument("--sizes", default="1000,2000,5000")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rescore_scale_cpu.json"))
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]

    run = Run(Path(args.run))
    settings = InfluenceSettings()
    pre = preconditioner(run, settings)
    q_idx = list(range(16))
    qg = query_gradients(run, "queries", q_idx, Measurement("loss"), settings.query_draws, settings.seed)
    p = qg.shape[1]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_rescore_"))
    try:
        stores = {}
        for n in sizes:
            (tmp / str(n)).mkdir()
            stores[n] = random_store(tmp / str(n), n, p)
        for k in threads:
            torch.set_num_threads(k)
            pq = pre.apply(qg).float()
            t_pre = median_time(lambda: pre.apply(qg))
            for n in sizes:
                stores[n].score(pq)  # warm the page cache
                t_score = median_time(lambda: stores[n].score(pq))
                rows.append({"threads": k, "n": n, "precondition_s": t_pre, "score_s": t_score,
                             "rescore_s": t_pre + t_score})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"queries": len(q_idx), "p": p, "store_dtype": "float16", "repeats": REPEATS, "torch": torch.__version__,
           "load_average_end": list(__import__("os").getloadavg()), "rows": rows}
    out = Path(args.out)
    write_json(out, res)
    lines = ["# Re-score time vs training-set size (CPU)", "",
             f"16 demo queries, P = {p:,} K-FAC parameters, float16 store, median of {REPEATS}; "
             f"load average at the end {res['load_average_end'][0]:.2f}.", "",
             "| threads | N | precondition (s) | score (s) | re-score total (s) |", "|---|---|---|---|---|"]
    lines += [f"| {r['threads']} | {r['n']} | {r['precondition_s']:.3f} | {r['score_s']:.3f} | {r['rescore_s']:.3f} |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
