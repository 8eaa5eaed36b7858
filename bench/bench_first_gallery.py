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
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from attribution.runs import write_json  # noqa: E402
from test_browser import CHROMIUM, CHROMIUM_ARGS, _free_port, _wait_scored  # noqa: E402
from test_browser_pages import _copy_shipped  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEFAULT = "K-FAC · MC Fisher · expand · damping 1e-08 · loss"


def _serve(run: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "ATTRIBUTION_RUN": str(run), "ATTRIBUTION_RUNS": str(run.parent / "runs"),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SystemExit(f"streamlit did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)


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


def measure(src: Path, timeout_s: float) -> dict:
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="first-gallery-"))
    run = root / src.name
    _copy_shipped(src, run)
    proc, url = _serve(run, root / "streamlit.log")
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
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    preview = next((line for line in body.splitlines() if line.startswith("Preview")), "")
    return {"run": str(src.relative_to(ROOT)), "first_gallery_s": round(seconds, 1), "load_average_start": round(load, 2),
            "preview_line": preview, "stages": stages}


def markdown(res: dict) -> str:
    lines = ["# First gallery in the browser (fresh copy of each shipped run, fresh server)", "",
             f"{res['when']} · `{res['command']}` · {res['cpus']} CPUs. From the page load until the gallery scored "
             f"for the default settings ({DEFAULT}) is on screen, one session.", "",
             "| run | first gallery s | load average at start | preview |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['first_gallery_s']} | {r['load_average_start']} | {r['preview_line']} |"
              for r in res["runs"]]
    for r in res["runs"]:
        lines += ["", f"Stages before the first gallery of {r['run']} (jobs run in parallel, so they overlap):", "",
                  "| job | priority | stage | measured s | estimate at start s |", "|---|---|---|---|---|"]
        lines += [f"| {s['job']} | {s['priority']} | {s['stage']} | {s['seconds']} | {s['estimate_at_start_s']} |"
                  for s in r["stages"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="demo/run,demo/cifar2", help="shipped runs, comma-separated (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds to wait for a gallery (default: %(default)s)")
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"error: {CHROMIUM} is missing (apt-get install -y chromium)", file=sys.stderr)
        return 2
    res = {"when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
           "command": "python bench/bench_first_gallery.py " + " ".join(sys.argv[1:]), "runs": []}
    for name in args.runs.split(","):
        res["runs"].append(measure(ROOT / name.strip(), args.timeout))
        print(f"{name}: first gallery {res['runs'][-1]['first_gallery_s']} s", flush=True)
    write_json(RESULTS / "first_gallery.json", res)
    (RESULTS / "first_gallery.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
