"""First gallery in the browser on a fresh copy of each shipped run (issue 11: <= 60 s).

For each run: copy what git ships (no derived artifacts), start a fresh Streamlit server on it,
open the Attribute page in headless Chromium (Debian's chromium) and time the page load until the
gallery scored for the default settings is on screen. The jobs' stage plans give where the time
went. Results: bench/results/first_gallery.{json,md}.

    .venv/bin/python bench/bench_first_gallery.py                 # both shipped runs
    .venv/bin/python bench/bench_first_gallery.py --runs demo/cifar2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from attribution.runs import write_json  # noqa: E402
from served import CHROMIUM, CHROMIUM_ARGS, start_app, stop_app  # noqa: E402
from test_browser import _wait_scored  # noqa: E402
from shipped import copy_shipped  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEFAULT = "K-FAC · MC Fisher · expand · damping 1e-08 · loss"


def _stages(run: Path, until: float) -> list[dict]:
    """Every job stage that ran before the gallery appeared: (job, stage, seconds, estimate at start)."""
    from attribution import jobs

    out = []
    for s in jobs.list_jobs(run):
        if not s.get("started") or s["started"] > until:
            continue
        for e in s.get("plan") or []:
            if e.get("seconds") is not None:
                out.append({"job": s.get("label") or s["kind"], "priority": s.get("priority"), "stage": e.get("name"),
                            "seconds": round(e["seconds"], 1),
                            "estimate_at_start_s": None if e.get("est_start_s") is None else round(e["est_start_s"], 1)})
    return out


def _timeline(run: Path, t0: float, seconds: float) -> dict:
    """Seconds after the page load at which the user's influence job was asked for, admitted, began
    its first stage and finished, and the gallery appeared: where the time outside the stages goes."""
    from attribution import jobs

    user = [s for s in jobs.list_jobs(run) if s["kind"] == "influence" and s.get("priority") == "user"
            and s.get("queued_at", 0) <= t0 + seconds]
    if not user:
        return {}
    s = min(user, key=lambda x: x["queued_at"])
    first = min((e["started"] for e in s.get("plan") or [] if e.get("started")), default=None)
    rel = lambda t: None if t is None else round(t - t0, 1)  # noqa: E731
    return {"asked": rel(s["queued_at"]), "admitted": rel(s.get("started")), "first_stage": rel(first),
            "finished": rel(s["updated"] if s["status"] == "done" else None), "gallery": round(seconds, 1),
            "mode": s["worker"]["mode"]}


def _stop_jobs(run: Path) -> None:
    """Cancel the copy's queued and running jobs and wait until they have stopped."""
    from attribution import jobs

    for s in jobs.active_jobs(run):
        jobs.cancel(run, s["id"])
    for s in jobs.active_jobs(run):
        try:
            jobs.wait(run, s["id"], timeout=60)
        except Exception:  # noqa: BLE001 - a job that will not stop must not hide the measurement
            pass


def measure(src: Path, timeout_s: float, shipped_artifacts: bool = True) -> dict:
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="first-gallery-"))
    run = root / src.name
    copy_shipped(src, run)
    if not shipped_artifacts:  # as if the run shipped no derived artifact (the default K-FAC factors)
        shutil.rmtree(run / "artifacts", ignore_errors=True)
    proc, url = start_app(run, run.parent / "runs", root / "streamlit.log")
    load = os.getloadavg()[0]
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
            t0 = time.time()
            page.goto(f"{url}/attribute?a_b=false", wait_until="commit")
            _wait_scored(page, DEFAULT, timeout_s)
            seconds = time.time() - t0
            body = page.locator("body").inner_text()
            browser.close()
        stages = _stages(run, t0 + seconds)
        timeline = _timeline(run, t0, seconds)
        if not timeline:  # the page computed in another run (e.g. a shipped one of the same name): not this copy
            raise RuntimeError(f"no influence job of the page in the copy {run}: the page used another run")
    finally:
        stop_app(proc)
        _stop_jobs(run)  # its background jobs outlive the server: they would load the next measurement
        shutil.rmtree(root, ignore_errors=True)
    preview = next((line.strip() for line in body.splitlines() if "Preview:" in line), "")
    return {"run": str(src.relative_to(ROOT)), "first_gallery_s": round(seconds, 1), "load_average_start": round(load, 2),
            "preview_line": preview, "stages": stages, "timeline": timeline}


def markdown(res: dict) -> str:
    what = ("what git ships, incl. the default K-FAC factors" if res.get("shipped_artifacts", True)
            else "WITHOUT the shipped K-FAC factors, so the first gallery builds them")
    lines = [f"# First gallery in the browser (fresh copy of each shipped run: {what}; fresh server)", "",
             f"{res['when']} · `{res['command']}` · {res['cpus']} CPUs. From the page load until the gallery scored "
             f"for the default settings ({DEFAULT}) is on screen, one session.", "",
             "| run | first gallery s | load average at start | preview |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['first_gallery_s']} | {r['load_average_start']} | {r['preview_line']} |"
              for r in res["runs"]]
    lines += ["", "Timeline of the user's job, seconds after the page load (asked: the page requested it; admitted: "
              "the scheduler let it run; first stage: its worker began computing; finished: its result was written; "
              "gallery: on screen):", "", "| run | worker | asked | admitted | first stage | finished | gallery |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {t.get('mode')} | {t.get('asked')} | {t.get('admitted')} | {t.get('first_stage')} | "
              f"{t.get('finished')} | {t.get('gallery')} |" for r in res["runs"] for t in [r.get("timeline") or {}]]
    for r in res["runs"]:
        lines += ["", f"Stages before the first gallery of {r['run']} (jobs run in parallel, so they overlap):", "",
                  "| job | priority | stage | measured s | estimate at start s |", "|---|---|---|---|---|"]
        lines += [f"| {s['job']} | {s['priority']} | {s['stage']} | {s['seconds']} | {s['estimate_at_start_s']} |"
                  for s in r["stages"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="demo/run,demo/cifar2", help="shipped runs, comma-separated (default: %(default)s)")
    ap.add_argument("--no-shipped-artifacts", action="store_true",
                    help="delete the run's shipped artifacts (its default K-FAC factors) from the copy; results go "
                         "to first_gallery_unshipped.{json,md}")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds to wait for a gallery (default: %(default)s)")
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"error: {CHROMIUM} is missing (apt-get install -y chromium)", file=sys.stderr)
        return 2
    res = {"when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
           "command": "python bench/bench_first_gallery.py " + " ".join(sys.argv[1:]), "runs": []}
    for name in args.runs.split(","):
        res["runs"].append(measure(ROOT / name.strip(), args.timeout, not args.no_shipped_artifacts))
        print(f"{name}: first gallery {res['runs'][-1]['first_gallery_s']} s", flush=True)
    stem = "first_gallery_unshipped" if args.no_shipped_artifacts else "first_gallery"
    res["shipped_artifacts"] = not args.no_shipped_artifacts
    write_json(RESULTS / f"{stem}.json", res)
    (RESULTS / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
