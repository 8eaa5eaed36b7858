"""The served app in headless Chromium (Playwright): every page opens, one attribution on a fresh
copy of the shipped demo run, deep links, screenshots in screenshots/ (git-ignored).

Needs Debian's chromium (/usr/bin/chromium) and the Python playwright package; run with
``make test-browser`` (``pytest -m browser``). Prints the timings of the first gallery (store and
factors built from scratch) and of later galleries (cached artifacts).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "run"
SHOTS = ROOT / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

pytestmark = [pytest.mark.browser, pytest.mark.timeout(3600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fresh_demo():
    """The shipped demo run without any derived artifact (model, data config, samples only).

    In its own temporary folder, not pytest's tmp_path: pytest deletes old base folders when
    other pytest sessions start, which would pull the run away under this long test."""
    if not (DEMO / "model" / "config.json").exists():
        pytest.skip("the shipped demo run (demo/run) has no trained model")
    root = Path(tempfile.mkdtemp(prefix="attribution-browser-"))
    dst = root / "demo-fresh"
    dst.mkdir()
    for name in ("config.json", "loss_curve.json"):
        if (DEMO / name).exists():
            shutil.copy2(DEMO / name, dst / name)
    for name in ("model", "samples"):
        shutil.copytree(DEMO / name, dst / name)
    yield dst
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(fresh_demo):
    port = _free_port()
    env = {**os.environ, "ATTRIBUTION_RUN": str(fresh_demo), "ATTRIBUTION_RUNS": str(fresh_demo.parent / "runs"),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(fresh_demo.parent / "streamlit.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
                             "--browser.gatherUsageStats", "false"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"streamlit did not start: {(fresh_demo.parent / 'streamlit.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    SHOTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1500, "height": 1100})
        yield pg
        browser.close()


def _open(page, url: str, heading: str, timeout_s: float = 120) -> None:
    page.goto(url, timeout=timeout_s * 1000)
    page.get_by_role("heading", name=heading).first.wait_for(timeout=timeout_s * 1000)


def _no_exception(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0, page.locator("[data-testid='stException']").first.inner_text()


def test_attribute_first_and_later_galleries(page, server):
    """First gallery: the store, factors and query gradients are built by a background job."""
    t0 = time.time()
    _open(page, f"{server}/attribute?a_b=false", "Attribute")
    gallery = page.get_by_text("Top positive (proponents)")
    gallery.wait_for(timeout=1_800_000)
    first_s = time.time() - t0
    _no_exception(page)
    page.screenshot(path=str(SHOTS / "attribute_first.png"), full_page=True)

    # later galleries: another damping / Hessian variant of the same query (cached artifacts)
    later = []
    for query in ("a_d=1.0e-03", "a_d=1.0e-06", "a_q=1"):
        t0 = time.time()
        _open(page, f"{server}/attribute?a_b=false&{query}", "Attribute")
        page.get_by_text("Top positive (proponents)").wait_for(timeout=900_000)
        later.append(time.time() - t0)
        _no_exception(page)
    print(f"\nfirst gallery on a fresh run: {first_s:.1f} s; later (damping 1e-3, damping 1e-6, query 1): "
          + ", ".join(f"{s:.1f} s" for s in later))
    # target: 5 min on an idle 2-core CPU; the bound leaves room for a machine shared with other jobs
    assert first_s < 1800
    assert later[0] < 15  # re-scoring a damping change (page load included)


def test_attribute_deep_link_and_baselines(page, server):
    _open(page, f"{server}/attribute?a_m=lt&a_t=250&a_k=4", "Attribute")
    page.get_by_text("Timestep t (0-indexed)").wait_for(timeout=60_000)  # the link's settings are applied
    page.get_by_text("Top positive (proponents)").wait_for(timeout=900_000)
    # baselines beside: wait until pixel cosine has its gallery (TRAK / D-TRAK may still be building)
    _open(page, f"{server}/attribute", "Attribute")
    page.get_by_text("Top positive (proponents)").wait_for(timeout=900_000)
    page.get_by_text("Baselines for the same query").wait_for(timeout=60_000)
    page.wait_for_timeout(8000)
    _no_exception(page)
    page.screenshot(path=str(SHOTS / "attribute_baselines.png"), full_page=True)


@pytest.mark.parametrize("path, heading, marker", [
    ("", "Model & data", "Training curve"), ("sample", "Sample", "Upload a query image"),
    ("compare", "Compare methods", "Influence settings (from the Attribute page)"), ("lds", "LDS diagnostics", "LDS ground truth")])
def test_pages_open(page, server, path, heading, marker):
    _open(page, f"{server}/{path}", heading)
    page.get_by_text(marker).first.wait_for(timeout=120_000)
    page.wait_for_timeout(1500)  # let images and charts render
    _no_exception(page)
    assert page.get_by_text("Page not found").count() == 0
    page.screenshot(path=str(SHOTS / f"{path or 'model'}.png"), full_page=True)
