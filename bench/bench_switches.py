"""Setting switches after the warm-up, in the browser (issue 11: every switch in <= 2 s).

For a fresh copy of a shipped run: start a fresh Streamlit server, open the Attribute page in
headless Chromium (baselines shown), wait for the first gallery, then wait until every job the
page started has finished (the background refinement of the store, the warm-up of the other seven
Hessian variants and the baselines). Then change one setting at a time and time each change until
the gallery scored for the new settings is on screen; a change that had to start a build is
flagged. Results: bench/results/switches_<run>.{json,md}.

    .venv/bin/python bench/bench_switches.py --run demo/run
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
from bench_first_gallery import _stop_jobs  # noqa: E402
from served import CHROMIUM, CHROMIUM_ARGS, start_app, stop_app  # noqa: E402
from shipped import copy_shipped  # noqa: E402
from test_browser import _click_radio, _no_traceback, _pick, _wait_scored  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# (what changes, how, the settings label the gallery must then show)
SWITCHES = [
    ("damping 1e-8 -> 3e-8 (one key press)", ("press", "ArrowRight"), "K-FAC · MC Fisher · expand · damping 3e-08 · loss"),
    ("Hessian K-FAC -> EK-FAC", ("radio", "ekfac"), "EK-FAC · MC Fisher · expand · damping 3e-08 · loss"),
    ("curvature MC -> empirical Fisher", ("radio", "empirical"), "EK-FAC · empirical Fisher · expand · damping 3e-08 · loss"),
    ("weight sharing expand -> reduce", ("radio", "reduce"), "EK-FAC · empirical Fisher · reduce · damping 3e-08 · loss"),
    ("Hessian EK-FAC -> K-FAC", ("radio", "kfac"), "K-FAC · empirical Fisher · reduce · damping 3e-08 · loss"),
    ("measurement loss -> ELBO", ("pick", "elbo"),
     "K-FAC · empirical Fisher · reduce · damping 3e-08 · ELBO (via the loss's gradient)"),
    ("curvature empirical -> MC Fisher", ("radio", "mc"),
     "K-FAC · MC Fisher · reduce · damping 3e-08 · ELBO (via the loss's gradient)"),
    ("weight sharing reduce -> expand", ("radio", "expand"),
     "K-FAC · MC Fisher · expand · damping 3e-08 · ELBO (via the loss's gradient)"),
    ("measurement ELBO -> loss", ("pick", "loss"), "K-FAC · MC Fisher · expand · damping 3e-08 · loss"),
    ("damping 3e-8 -> 1e-7 (one key press)", ("press", "ArrowRight"), "K-FAC · MC Fisher · expand · damping 1e-07 · loss"),
]
DEFAULT = "K-FAC · MC Fisher · expand · damping 1e-08 · loss"


def _act(page, how: tuple[str, str]) -> None:
    kind, value = how
    if kind == "press":
        page.locator("[data-testid='stSlider']").filter(has_text="Damping").get_by_role("slider").press(value)
    elif kind == "radio":
        _click_radio(page, value)
    else:
        _pick(page, "Measurement", value)


def _builds_started(run: Path, since: float) -> list[str]:
    """Labels of the jobs that build something and were queued after ``since``."""
    from attribution import jobs

    return [s.get("label") or s["kind"] for s in jobs.list_jobs(run)
            if s.get("queued_at", 0) >= since and s.get("needs")]


def _wait_idle(run: Path, timeout_s: float) -> float:
    """Seconds until no job of the copy is queued or running (the warm-up and refinement done)."""
    from attribution import jobs

    t0 = time.time()
    while jobs.active_jobs(run):
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"jobs still active after {timeout_s:.0f} s: "
                               + ", ".join(s.get("label") or s["kind"] for s in jobs.active_jobs(run)))
        time.sleep(5)
    return time.time() - t0


def measure(src: Path, timeout_s: float) -> dict:
    from playwright.sync_api import sync_playwright

    from attribution import jobs

    root = Path(tempfile.mkdtemp(prefix="switches-"))
    run = root / src.name
    copy_shipped(src, run)
    proc, url = start_app(run, run.parent / "runs", root / "streamlit.log")
    out = {"run": str(src.relative_to(ROOT)), "switches": []}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
            t0 = time.time()
            page.goto(f"{url}/attribute", wait_until="commit")
            _wait_scored(page, DEFAULT, timeout_s)
            out["first_gallery_s"] = round(time.time() - t0, 1)
            if not any(s.get("kind") == "influence" for s in jobs.list_jobs(run)):
                raise RuntimeError(f"no influence job in the copy {run}: the page used another run")
            out["warmup_s"] = round(_wait_idle(run, timeout_s), 1)
            out["warmup_jobs"] = sorted({s.get("label") or s["kind"] for s in jobs.list_jobs(run)})
            page.wait_for_timeout(4000)  # the page's last poll: the refined gallery is on screen
            out["load_average_at_switches"] = round(os.getloadavg()[0], 2)
            for name, how, settings in SWITCHES:
                t = time.time()
                _act(page, how)
                _wait_scored(page, settings, timeout_s)
                seconds = time.time() - t
                _no_traceback(page)
                out["switches"].append({"switch": name, "seconds": round(seconds, 2),
                                        "builds_started": _builds_started(run, t)})
                print(f"{name}: {seconds:.2f} s", flush=True)
                page.wait_for_timeout(1500)  # let the page settle before the next change
            browser.close()
    finally:
        stop_app(proc)
        _stop_jobs(run)
        shutil.rmtree(root, ignore_errors=True)
    return out


def markdown(res: dict) -> str:
    s = res["switches"]
    fast = sum(x["seconds"] <= 2 for x in s)
    lines = [f"# Setting switches after the warm-up ({res['run']})", "",
             f"{res['when']} · `{res['command']}` · {res['cpus']} CPUs, one session. Fresh copy of what git "
             f"ships, fresh server, the Attribute page with its baselines shown. First gallery "
             f"{res['first_gallery_s']} s; every job the page started (refinement of the store, the warm-up of "
             f"the other seven Hessian variants and the baselines) finished {res['warmup_s']} s later. Then one "
             f"change at a time, timed from the change until the gallery scored for the new settings is on "
             f"screen (load average {res['load_average_at_switches']} when the switches began).", "",
             f"**{fast} of {len(s)} switches within 2 s.**", "",
             "| switch | seconds | builds it started |", "|---|---|---|"]
    lines += [f"| {x['switch']} | {x['seconds']:.2f} | {', '.join(x['builds_started']) or 'none'} |" for x in s]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="demo/run", help="a shipped run (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for a build or the warm-up")
    a = ap.parse_args()
    src = (ROOT / a.run).resolve()
    res = measure(src, a.timeout)
    res.update({"when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
                "command": f"python bench/bench_switches.py --run {a.run}"})
    stem = f"switches_{src.name}"
    write_json(RESULTS / f"{stem}.json", res)
    (RESULTS / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
