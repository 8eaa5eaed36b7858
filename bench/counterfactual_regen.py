"""Counterfactual-regeneration benchmark: does removing a method's top-k proponents change the
regenerated query more than removing k random images? (issue 12; D-TRAK's Fig. / Table anchor:
CIFAR-2 32x32, 60 queries, k = 1,000 of 5,000, mean L2 random 5.51, TRAK 6.44, D-TRAK 9.46.)

One run per call; results of several runs accumulate in bench/results/counterfactual_regen.{json,md}
(keyed by the run directory). Resumable: re-run the same command after an interruption.

    OMP_NUM_THREADS=1 .venv/bin/python bench/counterfactual_regen.py --run demo/run --queries 0-7 --k 80 \\
        --methods kfac,dtrak --workers 2
    OMP_NUM_THREADS=1 .venv/bin/python bench/counterfactual_regen.py --run demo/cifar2 --queries 0-7 --k 80 \\
        --methods kfac,dtrak --workers 2
    .venv/bin/python bench/counterfactual_regen.py --table      # only rewrite the markdown from the JSON

Each model is a full training run with the run's own recipe and seed (pass --steps to shorten it,
which then also changes the reference model; the report says which). The models, report and
images land in RUN/lds/cf-<recipe key>/ (the report and images are shipped; models are not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attribution.runs import read_json, write_json  # noqa: E402

RESULTS = ROOT / "bench" / "results"
STEM = "counterfactual_regen"
PAIRS = (("kfac", "dtrak"), ("kfac", "random"), ("dtrak", "random"), ("ekfac", "dtrak"), ("kfac", "trak"),
         ("kfac", "pixel"), ("trak", "random"), ("pixel", "random"), ("ekfac", "random"))


def parse_queries(text: str) -> str:
    """``"0-7"`` or ``"0,1,5"`` -> ``"0,1,...,7"``."""
    out = []
    for part in text.split(","):
        if "-" in part:
            a, b = (int(x) for x in part.split("-"))
            out += list(range(a, b + 1))
        elif part.strip():
            out.append(int(part))
    return ",".join(str(q) for q in out)


def pm(stat: dict, digits: int = 3, signed: bool = False) -> str:
    m, s = stat["mean"], stat["sem"]
    head = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    return head if s is None or s != s else f"{head} ± {s:.{digits}f}"


def markdown(res: dict) -> str:
    lines = ["# Counterfactual regeneration", "",
             "Remove each query's top-k proponents (or k random images), retrain with the same seed and recipe, "
             "regenerate the query from its own sampling noise (same x_T and per-step noise, recovered from its "
             "trajectory). L2: Euclidean distance to the original query over the C×H×W values in [-1, 1]; SSIM: "
             "scikit-image structural similarity (1 = identical); change: the query's measurement under the model "
             "without the images minus under a model retrained on all data with the same seed and recipe. "
             "Mean ± standard error over queries; paired differences over the same queries.", ""]
    for run, r in res.get("runs", {}).items():
        job, rec = r["job"], r["recipe"]
        lines += [f"## {run}", "",
                  f"Command: `{r['command']}`", "",
                  f"{len(r['queries'])} queries ({', '.join(map(str, r['queries']))}) of `{job['query_set']}`, "
                  f"k = {job['k']} of {r['num_train']} training images, {rec['steps']} training steps per model "
                  f"(the run's own: {rec['train']['steps']}), seed {rec['seed']}, measurement {job['measurement']} "
                  f"with {job['num_draws']} MC draws. The last invocation took {r['wall_s'] / 60:.0f} min wall clock "
                  f"({r.get('finished', '?')}; time of an interrupted earlier one is not counted).", "",
                  f"| removed | L2 to the original | SSIM to the original | change of the {job['measurement']} |",
                  "|---|---|---|---|"]
        for name, m in r["methods"].items():
            label = "nothing (all data, retrained: the retraining noise)" if name == "reference" else m["label"]
            change = "—" if name == "reference" else pm(m["change"], 3, True)
            lines.append(f"| {label} | {pm(m['l2'], 2)} | {pm(m['ssim'], 3)} | {change} |")
        lines += ["", "| paired difference | L2 | SSIM | change |", "|---|---|---|---|"]
        for a, b in PAIRS:
            v = r["paired"].get(f"{a} - {b}") or r["paired"].get(f"{b} - {a}")
            if v is None:
                continue
            sign = 1 if f"{a} - {b}" in r["paired"] else -1
            flip = (lambda s: s) if sign == 1 else (lambda s: {"mean": -s["mean"], "sem": s["sem"]})
            lines.append(f"| {a} − {b} | {pm(flip(v['l2']), 2, True)} | {pm(flip(v['ssim']), 3, True)} | "
                         f"{pm(flip(v['change']), 3, True)} |")
        lines += [x for n in r.get("notes", []) for x in ("", f"Note: {n}")]  # context added by hand (--note)
        goal = r["paired"].get("kfac - dtrak")
        if goal:
            d = goal["l2"]
            verdict = ("K-FAC's removal changes the sample more than D-TRAK's" if d["mean"] > 2 * d["sem"]
                       else "K-FAC's and D-TRAK's removals are not distinguishable (within 2 paired SE)"
                       if abs(d["mean"]) <= 2 * d["sem"] else "D-TRAK's removal changes the sample more than K-FAC's")
            lines += ["", f"Goal (K-FAC > D-TRAK > random in L2, paired): {verdict} "
                          f"(paired L2 difference {pm(d, 2, True)})."]
        lines.append("")
    return "\n".join(lines)


def write(res: dict, results: Path) -> None:
    write_json(results / f"{STEM}.json", res)
    (results / f"{STEM}.md").write_text(markdown(res))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="run directory, e.g. demo/run or demo/cifar2")
    ap.add_argument("--queries", default="0-7", help="e.g. 0-7 or 0,1,5 (default: %(default)s)")
    ap.add_argument("--k", type=int, default=80, help="training images removed per query (default: %(default)s)")
    ap.add_argument("--methods", default="kfac,dtrak", help="removal methods; random is always added (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (default: the run's own)")
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--draws", type=int, default=128, help="MC draws of the loss (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="training processes (default: %(default)s)")
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown from the JSON")
    ap.add_argument("--note", default=None, help="with --table and --run: add this note to the run's section")
    ap.add_argument("--results", type=Path, default=RESULTS, help="results folder (default: bench/results)")
    args = ap.parse_args()
    path = args.results / f"{STEM}.json"
    res = read_json(path) if path.exists() else {"runs": {}}
    if args.table:
        if args.note and args.run in res["runs"]:
            res["runs"][args.run].setdefault("notes", []).append(args.note)
        write(res, args.results)
        return 0
    if not args.run:
        ap.error("--run is required (or --table)")
    cmd = ["attribution", "regenerate", "--run", str(Path(args.run).resolve()), "--queries", parse_queries(args.queries), "--k", str(args.k),
           "--methods", args.methods, "--draws", str(args.draws), "--workers", str(args.workers), "--json"]
    for flag, value in (("--steps", args.steps), ("--warmup-steps", args.warmup_steps)):
        if value is not None:
            cmd += [flag, str(value)]
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, "-m", "attribution", *cmd[1:]], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        print(f"attribution regenerate failed (exit {out.returncode}); re-run to resume", file=sys.stderr)
        return out.returncode
    summary = json.loads(out.stdout)
    report = read_json(Path(summary["report"]))
    wall = time.time() - t0
    res["runs"][args.run] = {**report, "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/counterfactual_regen.py "
                             + " ".join(sys.argv[1:]), "report": summary["report"], "wall_s": wall,
                             "finished": time.strftime("%Y-%m-%d"), "cpu_threads": env["OMP_NUM_THREADS"]}
    write(res, args.results)
    print(markdown({"runs": {args.run: res["runs"][args.run]}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
