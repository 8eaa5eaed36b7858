"""Wall time from a fresh clone to the full-default galleries, using the machine's cores (issue 11).

bench/bench_gallery.py measures two-seed stability round by round in one process per seed (CPU
seconds). This measures what a user waits on this machine for the same default settings when the
store and factors are built across local worker processes (``attribution build --executor local
--workers W``) and then scored (``attribution attribute``), on a fresh copy of the run. Results:
bench/results/time_to_stable.{json,md} (rows keyed by run and workers).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_time_to_stable.py --run demo/run --workers 2
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_time_to_stable.py --run demo/run --workers 2 --method ekfac
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from attribution.runs import open_run, read_json, write_json  # noqa: E402
from bench_gallery import fresh_copy  # noqa: E402
from shipped import copy_shipped  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _cli(*args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "attribution", *args, "--quiet"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit(f"attribution {' '.join(args)} failed: {out.stderr.strip()[-500:]}")
    return time.perf_counter() - t0, out.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="demo/run")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--method", default="kfac", choices=("kfac", "ekfac"))
    ap.add_argument("--no-shipped-artifacts", action="store_true",
                    help="also build what the run ships (its default K-FAC factors)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.no_shipped_artifacts:
            run = fresh_copy(ROOT / a.run, Path(tmp))
        else:  # what a fresh clone has: the files git tracks
            run = Path(tmp) / Path(a.run).name
            copy_shipped(ROOT / a.run, run)
        load = os.getloadavg()[0]
        build_s, _ = _cli("build", "--run", str(run), "--executor", "local", "--workers", str(a.workers),
                          "--seed", str(a.seed), "--method", a.method)
        q = open_run(run).load_samples("queries")[0]["images"].shape[0]
        score_s, stdout = _cli("attribute", "--run", str(run), "--query", f"0-{q - 1}", "--seed", str(a.seed),
                                "--method", a.method, "--json")
        res = json.loads(stdout)
        n_queries = len(res["queries"])
        cfg = res["config"]
    path = RESULTS / "time_to_stable.json"
    data = read_json(path) if path.exists() else {"rows": []}
    row = {"run": a.run, "method": a.method, "workers": a.workers, "cpus": os.cpu_count(), "load_average_start": round(load, 2),
           "build_s": round(build_s, 1), "attribute_s": round(score_s, 1), "total_s": round(build_s + score_s, 1),
           "queries": n_queries, "train_draws": cfg["train_draws"], "query_draws": cfg["query_draws"],
           "scheme": cfg.get("draw_scheme"), "shipped_factors": not a.no_shipped_artifacts,
           "when": time.strftime("%Y-%m-%d %H:%M")}
    key = (a.run, a.method, a.workers, row["scheme"], row["shipped_factors"])
    data["rows"] = [r for r in data["rows"] if (r["run"], r.get("method", "kfac"), r["workers"],
                                                r.get("scheme", "importance"), r.get("shipped_factors", False)) != key] \
        + [row]
    write_json(path, data)
    lines = ["# Wall time from a fresh clone to the full-default galleries", "",
             "`OMP_NUM_THREADS=1 .venv/bin/python bench/bench_time_to_stable.py --run RUN --workers W`: on a fresh "
             "copy of the run (what git ships, i.e. with its default K-FAC factors; `--no-shipped-artifacts`: "
             "without them), `attribution build --executor local --workers W` (K-FAC factors and the whole "
             "training-gradient store, sharded over W processes) then `attribution attribute` for every query (timestep "
             "proposal, query gradients of every query, scoring). The two-seed stability of these settings is in "
             "gallery_*.md.", "",
             "| run | method | scheme | shipped K-FAC factors | workers | CPUs | load at start | build s | attribute s | total s | queries "
             "| train draws | query draws | when |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r.get('method', 'kfac')} | {r.get('scheme', 'importance')} | {'yes' if r.get('shipped_factors') else 'no'} | "
              f"{r['workers']} | {r['cpus']} | {r['load_average_start']} | {r['build_s']} | "
              f"{r['attribute_s']} | **{r['total_s']}** | {r['queries']} | {r['train_draws']} | {r['query_draws']} | "
              f"{r['when']} |" for r in data["rows"]]
    (RESULTS / "time_to_stable.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
