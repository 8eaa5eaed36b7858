"""AppTest tests of every page, on a private copy of the micro fixture run."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from attribution import jobs

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TIMEOUT = 120


@pytest.fixture(scope="module")
def app_run(micro_run, tmp_path_factory):
    """A copy of micro_run (pages write samples and jobs into it), pinned via ATTRIBUTION_RUN."""
    root = tmp_path_factory.mktemp("app_runs")
    dst = root / "micro"
    shutil.copytree(micro_run.path, dst)
    from attribution.runs import Run

    return Run(dst)


@pytest.fixture
def app(app_run, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTRIBUTION_RUN", str(app_run.path))
    monkeypatch.setenv("ATTRIBUTION_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("ATTRIBUTION_WARMUP", "0")  # its own test (test_sessions.py)

    def make(page: str | None = None) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        at.run()
        assert not at.exception, at.exception
        if page:
            at.switch_page(page).run()
            assert not at.exception, at.exception
        return at

    return make


def _texts(elements) -> str:
    return " | ".join(str(e.value) for e in elements)


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


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


def _wait_all(run_dir: Path, timeout: float = 300.0) -> None:
    """Wait for every queued or running job (a queued one starts when what it waits for ends)."""
    for _ in range(3):
        for s in jobs.list_jobs(run_dir):
            if s["status"] in jobs.ACTIVE:
                jobs.wait(run_dir, s["id"], timeout=timeout)


def test_validate_upload_rejects_other_types_and_large_files():
    from attribution.app_state import validate_upload
    from attribution.errors import UserError

    with pytest.raises(UserError, match="not an image file"):
        validate_upload(b"hello", "notes.txt", 1, 8)
    with pytest.raises(UserError, match="under 5 MB"):
        validate_upload(b"0" * (6 * 2**20), "big.png", 1, 8)
    with pytest.raises(UserError, match="alpha"):
        validate_upload(_png(np.zeros((8, 8, 4), np.uint8)), "rgba.png", 3, 8)
    x = validate_upload(_png(np.full((8, 8, 3), 255, np.uint8)), "white.png", 3, 16)
    assert x.shape == (1, 3, 16, 16) and float(x.min()) == 1.0


# ----------------------------------------------------------------------------- app shell


def test_run_picker_lists_pinned_run_first_and_binds_to_url(app, app_run):
    at = app()
    picker = at.sidebar.selectbox(key="run")
    assert picker.value == str(app_run.path)
    assert picker.options[0].endswith("micro")
    assert "cpu" in _texts(at.sidebar.caption)


def test_no_runs_shows_actionable_error(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTRIBUTION_RUN", raising=False)
    monkeypatch.setenv("ATTRIBUTION_RUNS", str(tmp_path / "empty"))
    import attribution.runs as runs

    monkeypatch.setattr(runs, "DEMO_RUN", tmp_path / "no-demo")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert "attribution train" in _texts(at.error)


# ----------------------------------------------------------------------------- Model & data


def test_model_data_page_browses_data_and_samples_more(app, app_run):
    at = app()
    assert at.title[0].value == "Model & data"
    assert at.metric[0].value == "16"
    n_images_all = len(at.get("image"))
    at.multiselect(key="md_labels").set_value([0]).run()
    assert not at.exception
    assert len(at.get("image")) < n_images_all  # the label filter shrinks the grid
    # sample more: a background job with a progress panel and a Cancel button (drawing itself is
    # tested on the Sample page); cancelling keeps the run unchanged
    at.number_input(key="md_n").set_value(64)
    at.number_input(key="md_seed").set_value(7)
    at.button[0].click().run()  # the form's submit button
    assert not at.exception
    jid = jobs.job_id("sample", {"n": 64, "seed": 7, "trajectory": False, "name": "seed7_n64"})
    assert jobs.status(app_run.path, jid)["status"] == "running"
    assert "sampling" in _texts(at.get("progress")) or at.get("progress")
    at.button(key=f"cancel_{jid}").click().run()
    state = jobs.wait(app_run.path, jid, timeout=60)
    assert state["status"] == "cancelled"
    assert "seed7_n64" not in app_run.sample_names()
    at.run()
    assert "Resume" in [b.label for b in at.button]


def test_train_new_model_validates_name_and_trains_in_background(app, tmp_path):
    at = app()
    at.text_input(key="md_out").set_value("bad name!")
    at.button[1].click().run()
    assert "Run name" in _texts(at.error)
    at.text_input(key="md_out").set_value("fresh")
    at.number_input(key="md_limit").set_value(8)
    at.selectbox(key="md_res").set_value(8)
    at.selectbox(key="md_preset").set_value("micro")
    at.number_input(key="md_steps").set_value(12)
    at.button[1].click().run()
    assert not at.exception
    out = tmp_path / "runs" / "fresh"
    state = jobs.wait(out, jobs.list_jobs(out)[0]["id"], timeout=90)
    assert state["status"] == "done", state
    assert state["done"] == state["total"] == 12
    at.run()
    assert "Trained" in _texts(at.success)
    assert "fresh" in at.sidebar.selectbox(key="run").options


# ----------------------------------------------------------------------------- Sample


def test_sample_page_draws_with_trajectories(app, app_run):
    at = app("app_pages/sample.py")
    assert "cpu" in _texts(at.caption)
    at.text_input(key="s_name").set_value("bad/name")
    at.button[0].click().run()
    assert "Sample set name" in _texts(at.error)
    at.number_input(key="s_n").set_value(1)
    at.number_input(key="s_seed").set_value(3)
    at.text_input(key="s_name").set_value("mine")
    at.button[0].click().run()
    _wait_all(app_run.path)
    at.run()
    assert not at.exception
    tensors, meta = app_run.load_samples("mine")
    assert tensors["images"].shape == (1, 1, 8, 8)
    assert tensors["trajectory"].shape == (1001, 1, 1, 8, 8)
    assert meta["seed"] == 3


def test_sample_page_picks_queries(app):
    at = app("app_pages/sample.py")
    at.selectbox(key="s_qset").set_value("queries").run()
    at.multiselect(key="s_qidx").set_value([1, 2]).run()
    at.button(key="s_use").click().run()
    assert not at.exception
    assert at.session_state["queries"] == {"set": "queries", "indices": [1, 2]}


@pytest.mark.parametrize("name, data, message", [
    ("fake.png", b"not a png at all", "could not be read"),
    ("rgb.png", _png(np.zeros((8, 8, 3), np.uint8)), "channel"),
    ("wide.png", _png(np.zeros((8, 16), np.uint8)), "square"),
])
def test_upload_rejects_bad_images(app, name, data, message):
    at = app("app_pages/sample.py")
    at.file_uploader(key="s_upload").upload(name, data, "image/png").run()
    assert not at.exception
    assert message in _texts(at.error)


def test_upload_valid_image_becomes_query(app, app_run):
    at = app("app_pages/sample.py")
    img = np.zeros((32, 32), np.uint8)
    img[8:24, 12:20] = 255  # a thick "1" (columns 3 and 4 after area-downsampling to 8x8)
    at.file_uploader(key="s_upload").upload("one.png", _png(img), "image/png").run()
    assert not at.exception, at.exception
    q = at.session_state["queries"]
    assert q["set"].startswith("upload-") and q["indices"] == [0]
    tensors, _ = app_run.load_samples(q["set"])
    assert tensors["images"].shape == (1, 1, 8, 8)
    assert float(tensors["images"].max()) > 0.5 and float(tensors["images"].min()) == -1.0


# ----------------------------------------------------------------------------- Attribute


def _gallery_captions(at) -> list[str]:
    return [c for img in at.get("image") for c in [getattr(img.proto.imgs[0], "caption", "")] if " · τ" in c]


def test_attribute_page_scores_then_rescored_quickly(app, app_run):
    pytest.importorskip("attribution.influence")
    at = app("app_pages/attribute.py")
    at.toggle(key="a_b").set_value(False).run()  # baselines: own test
    _wait_all(app_run.path, timeout=300)  # first build: store + factors + query gradients
    at.run()
    assert not at.exception, at.exception
    assert not at.error, _texts(at.error)
    captions = _gallery_captions(at)
    assert len(captions) >= 8, captions  # positive / negative / neutral galleries with scores
    assert "τ > 0" in _texts(at.caption)  # the sign legend
    assert any(b.proto.label == "Galleries (CSV)" for b in at.get("download_button"))
    # a new damping re-scores from the cached artifacts inside the page run (no progress bar)
    at.select_slider(key="a_d").set_value(1e-3).run()
    assert not at.exception and not at.get("progress"), [p.proto.text for p in at.get("progress")]
    captions2 = _gallery_captions(at)
    assert captions2 and captions2 != captions
    last = at.session_state["attr_last"]
    assert last["args"]["settings"]["damping"] == 1e-3
    assert last["seconds"] < 5.0  # re-scoring, not rebuilding
    # clicking "details" under the last gallery image opens it in the details panel
    default_pick = at.selectbox(key="a_detail").value
    detail_buttons = [b for b in at.button if str(b.key).startswith("d_")]
    assert len(detail_buttons) >= 8, [b.key for b in at.button]
    # (from the last one back: on a tiny run the neutral gallery can hold the top proponent too)
    for i in range(1, len(detail_buttons) + 1):
        [b for b in at.button if str(b.key).startswith("d_")][-i].click().run()
        assert not at.exception, at.exception
        picked = at.session_state["a_detail"]
        if picked != default_pick:
            break
    assert picked != default_pick and at.selectbox(key="a_detail").value == picked
    assert any(f"index **{picked}**" in m.value for m in at.markdown)


def test_attribute_captions_have_a_key_and_short_tokens(app, app_run):
    import re

    pytest.importorskip("attribution.influence")
    at = app("app_pages/attribute.py")
    at.toggle(key="a_b").set_value(False).run()
    _wait_all(app_run.path, timeout=300)
    at.run()
    from attribution.attribute_text import CAPTION_KEY

    assert CAPTION_KEY in _texts(at.caption) and CAPTION_KEY.startswith("Captions: rank · training id · label · τ")
    captions = _gallery_captions(at)
    assert len(captions) >= 8
    for c in captions:  # "#1 · 12 · 7 · τ+3.1e-6": tokens break only at " · ", none longer than 10 chars
        assert re.fullmatch(r"#\d+ · \S+ · \S+ · τ[+-]?[0-9.]+(e-?\d+)?( · ✓)?", c), c
        assert max(len(t) for t in c.split(" · ")) <= 10, c
    # the details panel opens on the top proponent; the "details" buttons sit in rows of their own
    first = next(c for c in captions if c.startswith("#1 "))
    assert at.selectbox(key="a_detail").value == int(at.session_state["a_detail"])
    ds_id = first.split(" · ")[1]
    assert at.selectbox(key="a_detail").format_func(at.selectbox(key="a_detail").value).split(" ")[0].endswith(ds_id)


@pytest.mark.parametrize("measurement, words", [
    ("loss", ["diffusion loss", "proponent"]),
    ("elbo", ["negative ELBO", "loss-like", "proponent"]),
    ("trajectory", ["negative log-density", "loss-like"]),
    ("square-norm", ["not a likelihood"]),
])
def test_attribute_sign_legend_follows_the_measurement(app, measurement, words):
    at = app("app_pages/attribute.py")
    at.toggle(key="a_b").set_value(False)
    at.selectbox(key="a_m").set_value(measurement).run()
    assert not at.exception, at.exception
    legend = next(c.value for c in at.caption if "τ > 0" in c.value)
    assert all(w in legend for w in words), legend
    assert "τ > 0: removing the training image is predicted to increase it" in legend


def test_attribute_elbo_defaults_the_approximation_to_the_loss(app, app_run, monkeypatch):
    at = app("app_pages/attribute.py")
    at.toggle(key="a_b").set_value(False)
    assert at.selectbox(key="a_am").value == "same"
    at.selectbox(key="a_m").set_value("elbo").run()
    assert at.selectbox(key="a_am").value == "loss"
    assert any("Fig. 2b" in c.value and "loss's gradient" in c.value for c in at.caption)
    assert at.session_state["attr_settings"]["approx_measurement"] == "loss"
    # a choice of the user's own is kept while the measurement stays
    at.selectbox(key="a_am").set_value("same").run()
    at.run()
    assert at.selectbox(key="a_am").value == "same" and not any("Fig. 2b" in c.value for c in at.caption)
    # back to the loss: "same" again
    at.selectbox(key="a_m").set_value("elbo").run()
    at.selectbox(key="a_m").set_value("loss").run()
    assert at.selectbox(key="a_am").value == "same"
    # a link straight to the ELBO gets the loss too
    monkeypatch.setenv("ATTRIBUTION_RUN", str(app_run.path))
    fresh = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    fresh.switch_page("app_pages/attribute.py")
    fresh.query_params.update({"a_m": "elbo", "a_b": "false"})
    fresh.run()
    assert not fresh.exception, fresh.exception
    assert fresh.selectbox(key="a_m").value == "elbo" and fresh.selectbox(key="a_am").value == "loss"


def test_attribute_status_line_says_what_is_computed_in_plain_words(app, app_run, tmp_path):
    pytest.importorskip("attribution.influence")
    at = app("app_pages/attribute.py")
    at.toggle(key="a_b").set_value(False)
    at.number_input(key="a_qd").set_value(6).run()  # new query draws: the query gradient is missing
    text = _texts(at.caption)
    assert "gradient of the loss for query queries[0] (6 noise draws)" in text, text
    assert "to build:" not in text and "query_gradients" not in text and "--" not in text
    _wait_all(app_run.path, timeout=300)


def test_attribute_page_bad_measurement_for_query_shows_error(app, app_run):
    pytest.importorskip("attribution.influence")
    images = app_run.load_samples("queries")[0]["images"][:1]
    app_run.save_samples("notraj", images, None, {"seed": 0})
    at = app("app_pages/attribute.py")
    at.selectbox(key="a_set").set_value("notraj").run()
    at.selectbox(key="a_m").set_value("trajectory").run()
    _wait_all(app_run.path, timeout=300)
    at.run()
    assert not at.exception
    assert "trajectory" in _texts(at.error).lower(), (_texts(at.caption), _texts(at.warning), _texts(at.info),
                                                       [s["status"] for s in jobs.list_jobs(app_run.path)])


def test_page_settings_come_from_the_url(app_run, monkeypatch):
    """A shared link reproduces the view: bound widgets read their value from the query string
    (a deep link into another page is checked in the browser test)."""
    monkeypatch.setenv("ATTRIBUTION_RUN", str(app_run.path))
    images = app_run.load_samples("queries")[0]["images"][:2]
    app_run.save_samples("zz-linked", images, None, {"seed": 0})
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update({"md_set": "zz-linked", "run": str(app_run.path)})
    at.run()
    assert not at.exception
    assert at.selectbox(key="md_set").value == "zz-linked"
    assert "zz-linked[1]" in [img.proto.imgs[0].caption.replace("\u2011", "-") for img in at.get("image")]



# ----------------------------------------------------------------------------- Compare


def test_compare_page_overlap_and_correlation(app, app_run):
    pytest.importorskip("attribution.influence")
    pytest.importorskip("attribution.baselines")
    at = app("app_pages/compare.py")
    at.multiselect(key="c_m").set_value(["influence", "pixel"]).run()
    _wait_all(app_run.path, timeout=300)
    at.run()
    _wait_all(app_run.path, timeout=300)
    at.run()
    assert not at.exception, at.exception
    assert not at.error, _texts(at.error)
    assert len(at.get("plotly_chart")) == 2  # top-k overlap and Spearman heatmaps
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    overlap = _arr(charts[0]["data"][0]["z"])
    assert overlap.shape == (2, 2) and np.allclose(np.diag(overlap), 1.0)
    assert any(b.proto.label == "Aligned galleries (CSV)" for b in at.get("download_button"))


# ----------------------------------------------------------------------------- LDS


def test_lds_page_without_ground_truth_shows_the_build_command(app):
    at = app("app_pages/lds.py")
    assert not at.exception
    assert "no LDS ground truth" in _texts(at.info)
    assert "attribution lds --run" in " ".join(c.value for c in at.code)


@pytest.fixture(scope="module")
def lds_run(micro_run, tmp_path_factory):
    """A copy of micro_run with a small but real LDS ground truth (4 subsets x 2 seeds, loss)."""
    from attribution.evaluation import LDSJob, collect_ground_truth, run_lds_job
    from attribution.runs import Run

    dst = tmp_path_factory.mktemp("lds_runs") / "micro-lds"
    shutil.copytree(micro_run.path, dst)
    run = Run(dst)
    job = LDSJob(num_subsets=4, num_seeds=2, steps=5, warmup_steps=2, measurements=("loss",), num_draws=8)
    assert run_lds_job(run, job)
    collect_ground_truth(run, job)
    return run


def test_lds_page_with_ground_truth(lds_run, monkeypatch, tmp_path):
    pytest.importorskip("attribution.influence")
    monkeypatch.setenv("ATTRIBUTION_RUN", str(lds_run.path))
    monkeypatch.setenv("ATTRIBUTION_RUNS", str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/lds.py").run()
    at.multiselect(key="l_methods").set_value(["influence"]).run()
    _wait_all(lds_run.path, timeout=300)
    at.run()
    assert not at.exception, at.exception
    assert not at.error, _texts(at.error)
    bars = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]
    assert list(_arr(bars["x"])) == ["K-FAC influence", "exact retraining"]
    assert all(-100 <= v <= 100 for v in _arr(bars["y"]))
    assert "LDS of the current Attribute settings (live)" in [m.label for m in at.metric]
    at.button(key="l_sweep").click().run()
    assert not at.exception, at.exception
    sweep = [json.loads(c.proto.spec) for c in at.get("plotly_chart")
             if json.loads(c.proto.spec)["layout"].get("xaxis", {}).get("type") == "log"]
    assert sweep and len(_arr(sweep[0]["data"][0]["x"])) == 8


def test_details_panel_follows_the_top_proponent_until_the_user_picks(app, app_run):
    """The details panel opens on the top proponent and follows it when the gallery changes (it
    sharpens as rounds land, or settings change); once the user picks an image it stays on it."""
    at = app("app_pages/attribute.py")
    at.toggle(key="a_b").set_value(False).run()
    _wait_all(app_run.path, timeout=300)
    at.run()
    first = at.session_state["a_detail"]
    for d in (1e-2, 1e-4, 1e-6, 1e-8):  # dampings until the top proponent changes
        at.select_slider(key="a_d").set_value(d).run()
        _wait_all(app_run.path, timeout=300)
        at.run()
        assert not at.exception, at.exception
        captions = _gallery_captions(at)
        top_id = next(c for c in captions if c.startswith("#1 ")).split(" · ")[1]
        shown = at.selectbox(key="a_detail").format_func(at.selectbox(key="a_detail").value).split(" ")[0]
        assert shown.endswith(top_id), (d, shown, top_id)  # follows the current top proponent
        if at.session_state["a_detail"] != first:
            break
    assert at.session_state["a_detail"] != first  # the top proponent changed, and the panel followed it
    # the user picks another image: it stays through a settings change
    buttons = [b for b in at.button if str(b.key).startswith("d_")]
    for i in range(1, len(buttons) + 1):
        [b for b in at.button if str(b.key).startswith("d_")][-i].click().run()
        if at.session_state["a_detail"] != at.session_state["_a_detail_auto"]:
            break
    picked = at.session_state["a_detail"]
    assert picked != at.session_state["_a_detail_auto"]
    at.select_slider(key="a_d").set_value(1e-3).run()
    _wait_all(app_run.path, timeout=300)
    at.run()
    assert at.session_state["a_detail"] == picked
