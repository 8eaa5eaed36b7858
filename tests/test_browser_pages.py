"""Every page of both shipped runs opened from a link in a fresh browser context (headless
Chromium, Playwright): the view matches what the link sets; one counterfactual-regeneration panel
from shipped results; warnings for bad URL parameters; the decompression-bomb upload; one
screenshot per page in screenshots/ (git-ignored).

The runs are copies of demo/run and demo/cifar2 (model, config, samples, data, LDS ground truth
and counterfactual results: what git ships, no derived artifacts), so the pages write their jobs
into the copies. Links pick methods that need no gradient store (pixel cosine), so the test takes
minutes, not the first-gallery build of tests/test_browser.py. Run with ``make test-browser``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import urllib.parse
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pngs import bomb_png  # noqa: E402
from served import CHROMIUM, CHROMIUM_ARGS, start_app, stop_app  # noqa: E402
from shipped import copy_shipped  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "screenshots"
SHIPPED = {"digits": ROOT / "demo" / "run", "cifar2": ROOT / "demo" / "cifar2"}

pytestmark = [pytest.mark.browser, pytest.mark.timeout(3600)]


def _ensure_regeneration(run_dir: Path) -> bool:
    """Whether the run ships regeneration results; if not, build a small one (1 query, pixel
    cosine and random, 20-step models) so the panel can be checked. Returns "shipped"."""
    from attribution.regen_job import RegenJob, list_reports, run_regeneration
    from attribution.runs import Run

    run = Run(run_dir)
    if list_reports(run):
        return True
    run_regeneration(run, RegenJob(query_indices=(0,), k=8, methods=("pixel",), steps=20, warmup_steps=5, num_draws=8))
    return False


@pytest.fixture(scope="module")
def runs():
    """``{name: (copy dir, URL label of the run picker, ships regeneration results)}``."""
    if not (SHIPPED["digits"] / "model" / "config.json").exists():
        pytest.skip("the shipped demo run (demo/run) has no trained model")
    root = Path(tempfile.mkdtemp(prefix="attribution-pages-"))
    out = {}
    copy_shipped(SHIPPED["digits"], root / "pinned" / "run")  # label "pinned/run"
    out["digits"] = (root / "pinned" / "run", "pinned/run", _ensure_regeneration(root / "pinned" / "run"))
    if (SHIPPED["cifar2"] / "model" / "config.json").exists():
        copy_shipped(SHIPPED["cifar2"], root / "runs" / "cifar2-copy")
        from attribution.regen_job import list_reports
        from attribution.runs import Run

        cifar2 = root / "runs" / "cifar2-copy"
        out["cifar2"] = (cifar2, "cifar2-copy", bool(list_reports(Run(cifar2))))
    yield out
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(runs):
    root = runs["digits"][0].parents[1]
    try:
        proc, url = start_app(runs["digits"][0], root / "runs", root / "streamlit.log")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield url
    stop_app(proc)


@pytest.fixture(scope="module")
def browser(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    SHOTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _link(server: str, path: str, params: dict) -> str:
    return f"{server}/{path}?" + urllib.parse.urlencode(params, doseq=True)


def _fresh_page(browser, url: str, heading: str, timeout_s: float = 180):
    """A new browser context (no cookies, no session) opened on ``url``."""
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    page = ctx.new_page()
    page.goto(url, timeout=timeout_s * 1000)
    page.get_by_role("heading", name=heading).first.wait_for(timeout=timeout_s * 1000)
    return ctx, page


def _wait_text(page, text: str, timeout_s: float = 300) -> None:
    page.get_by_text(text).first.wait_for(timeout=timeout_s * 1000)


def _done(page, shot: str, scroll_to: str | None = None) -> None:
    """No exception on the page; a screenshot of the whole page (or, with ``scroll_to``, of the
    viewport scrolled to that text)."""
    page.wait_for_timeout(1500)  # let images and charts render
    exc = page.locator("[data-testid='stException']")
    assert exc.count() == 0, exc.first.inner_text()
    assert page.get_by_text("Page not found").count() == 0
    if scroll_to is None:  # Streamlit scrolls inside its main block: grow the viewport to all of it
        height = page.evaluate("document.querySelector(\"[data-testid='stMain']\")?.scrollHeight || 1100")
        page.set_viewport_size({"width": 1500, "height": min(int(height) + 50, 12000)})
        page.wait_for_timeout(1500)
    else:
        page.get_by_text(scroll_to).first.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / f"{shot}.png"), full_page=True)


def _cancel_jobs(run_dir: Path) -> None:
    from attribution import jobs

    for s in jobs.list_jobs(run_dir):
        if s["status"] == "running":
            jobs.cancel(run_dir, s["id"])
            jobs.wait(run_dir, s["id"], timeout=120)


RUN_NAMES = ["digits", "cifar2"]


def _run(runs, name):
    if name not in runs:
        pytest.skip(f"the shipped {name} run (demo/cifar2) has no trained model in this checkout")
    return runs[name]


@pytest.mark.parametrize("name", RUN_NAMES)
def test_model_data_page_from_a_link(browser, server, runs, name):
    run_dir, label, _ = _run(runs, name)
    ctx, page = _fresh_page(browser, _link(server, "", {"run": label, "md_page": "2"}), "Model & data")
    _wait_text(page, "Which training images made the model generate this image?")
    _wait_text(page, "Training curve")
    from playwright.sync_api import expect

    expect(page.get_by_label("Page (of", exact=False)).to_have_value("2", timeout=60_000)
    assert page.get_by_text(str(run_dir)).count() >= 1  # the sidebar names the picked run
    _done(page, f"pages_{name}_model")
    ctx.close()


@pytest.mark.parametrize("name", RUN_NAMES)
def test_sample_page_from_a_link(browser, server, runs, name):
    _, label, _ = _run(runs, name)
    ctx, page = _fresh_page(browser, _link(server, "sample", {"run": label, "s_qidx": ["1", "2"]}), "Sample")
    _wait_text(page, "queries[1] ✓")
    _wait_text(page, "queries[2] ✓")
    assert page.get_by_text("queries[0] ✓").count() == 0
    _done(page, f"pages_{name}_sample")
    ctx.close()


@pytest.mark.parametrize("name", RUN_NAMES)
def test_attribute_page_from_a_link(browser, server, runs, name):
    """The link's settings are applied (the galleries' first build is tests/test_browser.py's)."""
    run_dir, label, _ = _run(runs, name)
    ctx, page = _fresh_page(browser, _link(server, "attribute", {"run": label, "a_q": "3", "a_m": "lt", "a_t": "250",
                                                                  "a_b": "false"}), "Attribute")
    _wait_text(page, "Timestep t (0-indexed)")
    _wait_text(page, "query queries[3]")
    _done(page, f"pages_{name}_attribute")
    ctx.close()
    _cancel_jobs(run_dir)  # the influence build it started (minutes) is not what this test checks


COMPARE = {"c_q": ["1", "2"], "c_m": "pixel", "c_k": "3", "c_h": "ekfac", "c_d": "1.0e-03", "c_g": "2"}


@pytest.mark.parametrize("name", RUN_NAMES)
def test_compare_page_from_a_link(browser, server, runs, name):
    _, label, _ = _run(runs, name)
    ctx, page = _fresh_page(browser, _link(server, "compare", {"run": label, **COMPARE}), "Compare methods")
    _wait_text(page, "K-FAC influence: EK-FAC, MC Fisher (GGN), expand, damping 1.0e-03, attributing the loss")
    _wait_text(page, "pixel cosine — ranks 1…3")
    _wait_text(page, "query queries[2]")
    assert page.get_by_text("is not a valid").count() == 0
    _done(page, f"pages_{name}_compare")
    ctx.close()


@pytest.mark.parametrize("name", RUN_NAMES)
def test_lds_page_from_a_link(browser, server, runs, name):
    run_dir, label, _ = _run(runs, name)
    from attribution.evaluation import list_ground_truth
    from attribution.runs import Run

    has_truth = bool(list_ground_truth(Run(run_dir)))
    ctx, page = _fresh_page(browser, _link(server, "lds", {"run": label, "l_methods": "pixel", "l_d": "1.0e-06"}),
                            "LDS diagnostics")
    if has_truth:
        _wait_text(page, "LDS on the loss")
        _wait_text(page, "damping 1.0e-06")
        _wait_text(page, "Measurement stability across retrained models")
        assert page.locator("[data-testid='stCode']").first.inner_text().startswith(f"attribution lds --run {run_dir}")
    else:
        _wait_text(page, "This run has no LDS ground truth yet")
    _wait_text(page, "Counterfactual regeneration: what if these images had never been seen?")
    _done(page, f"pages_{name}_lds")
    ctx.close()


@pytest.mark.parametrize("name", ["digits", "cifar2"])
def test_counterfactual_regeneration_panel_from_shipped_results(browser, server, runs, name):
    """The panel from a run's regeneration results: CIFAR-2 ships its benchmark's (8 queries,
    K-FAC / D-TRAK / random); the digits run ships none, so the test builds a small one."""
    from attribution.regen_job import list_reports, load_report
    from attribution.runs import Run

    if name not in runs:
        pytest.fail(f"the shipped {name} run is missing")
    run_dir, label, shipped = runs[name]
    if name == "cifar2":
        assert shipped, "CIFAR-2 ships its counterfactual-regeneration results (bench/counterfactual_regen.py)"
    path = list_reports(Run(run_dir))[-1]
    report, _ = load_report(path)
    q = report["queries"][-1]
    link = _link(server, "lds", {"run": label, "l_methods": "pixel", "l_rg": f"{path.parent.name}/{path.stem}",
                                 "l_rq": str(q)})
    ctx, page = _fresh_page(browser, link, "LDS diagnostics")
    _wait_text(page, f"original · queries[{q}]")
    j = report["queries"].index(q)
    first = report["job"]["methods"][0]
    l2 = report["methods"][first]["l2"]["per_query"][j]
    method_label = report["methods"][first]["label"].replace("-", "\u2011")  # captions keep hyphenated tokens whole
    _wait_text(page, f"without top\u2011{report['job']['k']} {method_label} · L2 {l2:.2f}")
    _wait_text(page, "all data, retrained · L2")
    _done(page, f"pages_{name}_regeneration" + ("" if shipped else "_built_by_the_test"),
          scroll_to="Counterfactual regeneration: what if")
    ctx.close()


def test_bad_url_parameters_are_named_with_the_value_used(browser, server, runs):
    _, label, _ = runs["digits"]
    ctx, page = _fresh_page(browser, _link(server, "compare", {"run": label, "c_q": "999", "c_m": ["nonsense", "pixel"],
                                                                "c_d": "-1"}), "Compare methods")
    _wait_text(page, "c_q=999 is not a valid query index")
    _wait_text(page, "c_m=nonsense is not a valid method")
    _wait_text(page, "c_d=-1 is not a valid damping")
    _wait_text(page, "using 1.0e-08 instead")
    page.wait_for_timeout(3000)  # later reruns (jobs finishing) keep the warnings
    assert page.get_by_text("c_q=999 is not a valid query index").count() == 1
    _done(page, "pages_bad_url_compare")
    ctx.close()


def test_bad_url_parameters_on_the_attribute_page(browser, server, runs):
    """Needs app_pages/_url.py wired into the Attribute page (issue 12, section 4)."""
    run_dir, label, _ = runs["digits"]
    ctx, page = _fresh_page(browser, _link(server, "attribute", {"run": label, "a_d": "-1", "a_m": "nonsense",
                                                                  "a_q": "999", "a_b": "false"}), "Attribute")
    for text in ("a_d=-1 is not a valid", "a_m=nonsense is not a valid", "a_q=999 is not a valid"):
        _wait_text(page, text, timeout_s=60)
    _done(page, "pages_bad_url_attribute")
    ctx.close()
    _cancel_jobs(run_dir)


def test_bomb_upload_is_a_clear_error(browser, server, runs, tmp_path):
    _, label, _ = runs["digits"]
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(20000))
    ctx, page = _fresh_page(browser, _link(server, "sample", {"run": label}), "Sample")
    page.locator("[data-testid='stFileUploader'] input[type='file']").set_input_files(str(bomb))
    _wait_text(page, "'bomb.png' is far too large (400,000,000 pixels); upload an image at most 2048 px on a side")
    _done(page, "pages_bomb_upload")
    ctx.close()
