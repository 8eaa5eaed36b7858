"""AppTests of the Model & data, Sample, Compare and LDS pages: state from the URL, warnings for
bad URL parameters, the LDS page's readable charts and its counterfactual-regeneration panel."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from attribution import jobs
from pngs import bomb_png

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TIMEOUT = 120


def _texts(elements) -> str:
    return " | ".join(str(e.value) for e in elements)


def _wait_all(run_dir: Path, timeout: float = 120.0) -> None:
    for s in jobs.list_jobs(run_dir):
        if s["status"] == "running":
            jobs.wait(run_dir, s["id"], timeout=timeout)


def _arr(v) -> np.ndarray:
    """A plotly spec array (plain list, or plotly's base64 typed-array dict)."""
    import base64

    if isinstance(v, dict) and "bdata" in v:
        out = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        shape = v.get("shape")
        if isinstance(shape, str):
            shape = [int(x) for x in shape.split(",")]
        return out.reshape(shape) if shape else out
    return np.asarray(v)


def _charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


@pytest.fixture(scope="module")
def page_run(micro_run, tmp_path_factory):
    """A copy of micro_run with an LDS ground truth (loss and ELBO, 4 subsets x 2 seeds), a
    counterfactual report named like the benchmark's, and a regeneration result."""
    from attribution.baselines import pixel_scores
    from attribution.evaluation import (CounterfactualJob, LDSJob, collect_ground_truth, run_counterfactual,
                                        run_lds_job)
    from attribution.regen_job import RegenJob, run_regeneration
    from attribution.runs import Run

    dst = tmp_path_factory.mktemp("page_runs") / "micro-pages"
    shutil.copytree(micro_run.path, dst)
    run = Run(dst)
    job = LDSJob(num_subsets=4, num_seeds=2, steps=5, warmup_steps=2, measurements=("loss", "elbo"), num_draws=8)
    assert run_lds_job(run, job)
    collect_ground_truth(run, job)
    images = run.load_samples("queries")[0]["images"]
    pix = pixel_scores(run, images)
    run_counterfactual(run, CounterfactualJob(query_indices=(0, 1), k=2, steps=5, warmup_steps=2, num_draws=4),
                       {"D-TRAK (best, rel 1)": pix, "K-FAC mc expand (1e-8)": -pix})
    report = run_regeneration(run, RegenJob(query_indices=(0, 1), k=3, methods=("pixel",), steps=5, warmup_steps=2,
                                            num_draws=4), device=torch.device("cpu"))
    run.regen_report = report
    return run


@pytest.fixture
def open_page(page_run, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTRIBUTION_RUN", str(page_run.path))
    monkeypatch.setenv("ATTRIBUTION_RUNS", str(tmp_path / "runs"))

    def make(page: str, params: dict | None = None) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        at.query_params.update(params or {})
        at.run()
        assert not at.exception, at.exception
        at.switch_page(page).run()
        assert not at.exception, at.exception
        return at

    return make


def _fresh(page: str, params: dict) -> AppTest:
    """A fresh session opened on a deep link to ``app_pages/<page>.py`` (as a new browser would)."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update(params)
    at.run()
    assert not at.exception, at.exception
    at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, at.exception
    return at


# ----------------------------------------------------------------------------- URL helper


def _url_app():
    import streamlit as st

    from attribution.app_state import log_damping_options
    from app_pages._url import check_choice, check_range

    check_choice("a_m", ["loss", "elbo"], "loss", what="measurement")
    st.selectbox("m", ["loss", "elbo"], key="a_m", bind="query-params")
    check_choice("a_q", list(range(4)), 0, what="query index")
    st.selectbox("q", list(range(4)), key="a_q", bind="query-params")
    check_choice("a_d", log_damping_options(), 1e-8, format_func=lambda v: f"{v:.1e}", what="damping")
    st.select_slider("d", log_damping_options(), value=1e-8, key="a_d", bind="query-params",
                     format_func=lambda v: f"{v:.1e}")
    check_range("a_t", 0, 999, 499, cast=int, what="timestep")
    st.slider("t", 0, 999, 499, key="a_t", bind="query-params")
    check_choice("a_ms", ["kfac", "trak"], ["kfac"], multi=True, what="method")
    st.multiselect("ms", ["kfac", "trak"], default=["kfac"], key="a_ms", bind="query-params")


def test_url_helper_warns_with_the_parameter_and_the_value_used(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(APP).parent))
    at = AppTest.from_function(_url_app, default_timeout=TIMEOUT)
    at.query_params.update({"a_d": "-1", "a_m": "nonsense", "a_q": "999", "a_t": "5000", "a_ms": ["trak", "bogus"]})
    at.run()
    assert not at.exception, at.exception
    w = _texts(at.warning)
    assert "`a_d=-1` is not a valid damping" in w and "using `1.0e-08` instead" in w
    assert "`a_m=nonsense` is not a valid measurement (expected one of loss, elbo); using `loss` instead" in w
    assert "`a_q=999` is not a valid query index" in w and "using `0` instead" in w
    assert "`a_t=5000` is not a valid timestep (expected a whole number from 0 to 999); using `499`" in w
    assert "`a_ms=bogus` is not a valid method" in w and "using `[trak]` instead" in w
    assert at.selectbox(key="a_m").value == "loss" and at.multiselect(key="a_ms").value == ["trak"]
    at.run()  # Streamlit has dropped the bad values from the URL: the warnings stay
    assert len(at.warning) == 5
    at.selectbox(key="a_m").set_value("elbo").run()  # a new value clears its warning only
    assert len(at.warning) == 4 and "a_m=" not in _texts(at.warning)


def test_url_helper_is_silent_for_valid_values(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(APP).parent))
    at = AppTest.from_function(_url_app, default_timeout=TIMEOUT)
    at.query_params.update({"a_d": "1.0e-03", "a_m": "elbo", "a_q": "3", "a_t": "7", "a_ms": ["trak", "kfac"]})
    at.run()
    assert not at.exception and not at.warning
    assert at.select_slider(key="a_d").value == pytest.approx(1e-3) and at.slider(key="a_t").value == 7


# ----------------------------------------------------------------------------- Model & data, Sample


def test_first_page_says_what_the_app_does_and_how_to_read_a_score(open_page):
    at = open_page("app_pages/model_data.py")
    intro = at.markdown[0].value
    assert "Which training images made the model generate this image?" in intro
    assert "τ > 0" in intro and "proponent" in intro and "τ < 0" in intro and "LDS" in intro
    assert intro.count("\n") == 2  # three lines


def test_model_data_page_bad_url_parameters(open_page):
    at = open_page("app_pages/model_data.py", {"md_page": "0", "md_set": "nope"})
    w = _texts(at.warning)
    assert "`md_page=0` is not a valid page" in w and "`md_set=nope` is not a valid sample set" in w


def test_sample_page_state_from_url_and_bomb_upload(open_page):
    at = open_page("app_pages/sample.py", {"s_qidx": ["1", "2"]})
    assert at.multiselect(key="s_qidx").value == [1, 2]
    at.file_uploader(key="s_upload").upload("bomb.png", bomb_png(), "image/png").run()
    assert not at.exception, at.exception
    err = _texts(at.error)
    assert "bomb.png" in err and "far too large (400,000,000 pixels)" in err and "2048 px" in err


# ----------------------------------------------------------------------------- Compare


COMPARE_LINK = {"c_set": "queries", "c_q": ["1", "2"], "c_m": ["pixel"], "c_k": "3", "c_h": "ekfac",
                "c_d": "1.0e-03", "c_kt": "reduce", "c_g": "2"}


def test_compare_page_reproduces_the_view_from_a_link(page_run, monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_RUN", str(page_run.path))
    at = _fresh("compare", COMPARE_LINK)
    assert at.title[0].value == "Compare methods"
    assert at.multiselect(key="c_q").value == [1, 2] and at.multiselect(key="c_m").value == ["pixel"]
    assert at.slider(key="c_k").value == 3 and at.radio(key="c_h").value == "ekfac"
    assert at.radio(key="c_kt").value == "reduce" and at.select_slider(key="c_d").value == pytest.approx(1e-3)
    assert "EK-FAC, MC Fisher (GGN), reduce, damping 1.0e-03" in _texts(at.caption)
    _wait_all(page_run.path)
    at.run()
    assert not at.exception and not at.error, _texts(at.error)
    assert at.selectbox(key="c_g").value == 2
    assert "query queries[2]" in [img.proto.imgs[0].caption for img in at.get("image")]
    assert any(m.value.startswith("**pixel cosine** — ranks 1…3") for m in at.markdown)
    assert not at.warning


def test_compare_page_warns_about_bad_url_parameters(page_run, monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_RUN", str(page_run.path))
    at = _fresh("compare", {"c_q": ["999"], "c_m": ["nonsense", "pixel"], "c_d": "-1", "c_k": "99", "c_set": "zzz"})
    w = _texts(at.warning)
    for frag in ("`c_q=999` is not a valid query index", "using `[0, 1, 2]` instead",
                 "`c_m=nonsense` is not a valid method", "using `[pixel]` instead",
                 "`c_d=-1` is not a valid damping", "`c_k=99` is not a valid k", "`c_set=zzz` is not a valid sample set"):
        assert frag in w, (frag, w)


def test_attribute_page_warns_about_bad_url_parameters(page_run, monkeypatch):
    """?a_d=-1, ?a_m=nonsense, ?a_q=999 (issue 12, section 4): each is named with the value used."""
    monkeypatch.setenv("ATTRIBUTION_RUN", str(page_run.path))
    at = _fresh("attribute", {"a_d": "-1", "a_m": "nonsense", "a_q": "999", "a_k": "0", "a_h": "hessian",
                              "a_b": "false"})
    w = _texts(at.warning)
    for frag in ("`a_d=-1` is not a valid damping", "using `1.0e-08` instead",
                 "`a_m=nonsense` is not a valid measurement", "using `loss` instead",
                 "`a_q=999` is not a valid query index", "using `0` instead",
                 "`a_k=0` is not a valid top-k", "`a_h=hessian` is not a valid Hessian"):
        assert frag in w, (frag, w)


# ----------------------------------------------------------------------------- LDS


def test_lds_page_readable_charts_and_the_command_that_built_the_data(page_run, monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_RUN", str(page_run.path))
    at = _fresh("lds", {"l_methods": ["pixel"], "l_d": "1.0e-06"})
    _wait_all(page_run.path)
    at.run()
    assert not at.exception and not at.error, _texts(at.error)
    assert at.select_slider(key="l_d").value == pytest.approx(1e-6)
    code = " ".join(c.value for c in at.code)
    assert f"attribution lds --run {page_run.path} --subsets 4 --seeds 2 --steps 5 --warmup-steps 2 --draws 8 " \
           "--measurements loss" in code
    charts = _charts(at)
    bars = charts[0]
    assert [t["type"] for t in bars["data"]] == ["bar", "scatter"]
    assert list(bars["data"][0]["x"]) == ["pixel cosine", "exact retraining"]
    label_y, bar = _arr(bars["data"][1]["y"]).astype(float), bars["data"][0]
    y = _arr(bar["y"]).astype(float)
    tops = y + np.where(y >= 0, 1, -1) * _arr(bar["error_y"]["array"]).astype(float)
    assert np.allclose(label_y, tops)  # each value label sits at the end of its error bar, not across it
    heat = next(c for c in charts if c["data"][0]["type"] == "heatmap")
    z = _arr(heat["data"][0]["z"]).astype(float)
    off = z[~np.eye(len(z), dtype=bool)]
    assert heat["data"][0]["zmin"] == pytest.approx(off.min()) and heat["data"][0]["zmax"] == pytest.approx(off.max())
    assert heat["layout"]["xaxis"]["title"]["text"].startswith("model") and heat["layout"]["yaxis"]["title"]["text"]
    cf = next(c for c in charts if c["layout"].get("title", {}).get("text", "").startswith("Change of the"))
    assert cf["layout"]["title"]["text"].startswith("Change of the loss after removing each method's top-2")
    assert list(cf["data"][0]["x"]) == ["D-TRAK (best damping)", "K-FAC (damping 1e-8)", "random (control)"]
    assert "λ = 1 × the mean eigenvalue" in _texts(at.caption)


def test_lds_counterfactual_title_follows_the_measurement(page_run, monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_RUN", str(page_run.path))
    at = _fresh("lds", {"l_methods": ["pixel"], "l_m": "elbo"})
    assert at.selectbox(key="l_m").value == "elbo"
    assert "Counterfactual retraining: change of the elbo after removing the top-k" in [h.value for h in at.subheader]
    assert "No counterfactual retraining for the elbo in this run (there is for: loss" in _texts(at.info)


def test_lds_regeneration_panel_shows_shipped_results_from_a_link(page_run, monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_RUN", str(page_run.path))
    rep = Path(page_run.regen_report["path"])
    at = _fresh("lds", {"l_methods": ["pixel"], "l_rg": f"{rep.parent.name}/{rep.stem}", "l_rq": "1"})
    assert not at.exception, at.exception
    assert at.selectbox(key="l_rg").value == f"{rep.parent.name}/{rep.stem}" and at.selectbox(key="l_rq").value == 1
    shown = [img.proto.imgs[0].caption for img in at.get("image")]
    assert not any(re.search(r"\w-\w", c) for c in shown), "a hyphen inside a caption's token can break the line"
    caps = [c.replace("\u2011", "-") for c in shown]
    m = page_run.regen_report["methods"]
    assert "original · queries[1]" in caps
    assert f"without top-3 pixel cosine · L2 {m['pixel']['l2']['per_query'][1]:.2f} · SSIM " \
           f"{m['pixel']['ssim']['per_query'][1]:.2f} · Δloss {m['pixel']['change']['per_query'][1]:+.3f}" in caps
    assert any(c.startswith("random · L2 ") for c in caps) and any(c.startswith("all data, retrained · L2 ") for c in caps)
    table = at.dataframe[-1].value
    assert list(table["removed"]) == ["pixel cosine", "random", "nothing (all data, retrained)"]
    assert "pixel cosine − random: L2" in _texts(at.caption)


def test_lds_regeneration_panel_starts_a_background_job(page_run, monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_RUN", str(page_run.path))
    at = _fresh("lds", {"l_methods": ["pixel"]})
    at.multiselect(key="l_rn_q").set_value([2])
    at.number_input(key="l_rn_k").set_value(2)
    at.multiselect(key="l_rn_m").set_value(["pixel"])
    at.number_input(key="l_rn_steps").set_value(5)
    next(b for b in at.button if b.label.startswith("Retrain and regenerate")).click().run()
    assert not at.exception, at.exception
    args = at.session_state["l_regen_args"]
    assert args["query_indices"] == [2] and args["methods"] == ["pixel", "random"] and args["steps"] == 5
    state = jobs.wait(page_run.path, jobs.job_id("regenerate", args), timeout=180)
    assert state["status"] == "done", state
    at.run()
    assert not at.exception, at.exception
    assert "Finished; the result is listed above." in _texts(at.success)
    assert len(at.selectbox(key="l_rg").options) == 2
