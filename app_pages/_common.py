"""UI helpers shared by the pages: run picker, cached loads, image grids, background-job panels."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import numpy as np
import streamlit as st

from attribution import jobs
from attribution.app_state import available_runs, images_uint8
from attribution.errors import UserError
from attribution.runs import Run, open_run

RUN_KEY = "run"
UNAVAILABLE_ERRORS = ("ClipUnavailable",)  # a missing optional component: shown as unavailable, not an error


# ----------------------------------------------------------------------------- run picker


def run_picker() -> None:
    """Sidebar selectbox of runs (bound to ``?run=`` in the URL); sets ``session_state.run_path``."""
    runs = [str(p) for p in available_runs()]
    with st.sidebar:
        st.markdown("### Run")
        if not runs:
            st.session_state.pop("run_path", None)
            st.error("No run found. Train one with `attribution train --out runs/my-run`, "
                     "or on the Model & data page.")
            return
        path = st.selectbox("Run directory", runs, key=RUN_KEY, bind="query-params",
                            format_func=lambda p: Path(p).name if Path(p).name != "run" else f"{Path(p).parent.name}/run",
                            help="ATTRIBUTION_RUN pins a run; ATTRIBUTION_RUNS is the runs folder")
        st.session_state["run_path"] = path
        st.caption(f"`{path}` · device: **{device_name()}**")
        running = [s for s in jobs.list_jobs(Path(path)) if s["status"] == "running"]
        if running:
            st.caption("Running jobs: " + ", ".join(f"{s['kind']} ({jobs.describe(s)})" for s in running))


def current_run() -> Run:
    """The picked run; stops the page with an st.error when there is none or it is unusable."""
    path = st.session_state.get("run_path")
    if not path:
        st.error("No run selected. Train one first: `attribution train --out runs/my-run`.")
        st.stop()
    try:
        return open_run(path)
    except UserError as exc:
        st.error(str(exc))
        st.stop()


def require_model(run: Run) -> None:
    if not run.has_model():
        st.warning(f"Run `{run.path}` has no trained model yet (training may still be running). "
                   "Pick another run or wait for training to finish.")
        st.stop()


def device_name() -> str:
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"


def method_scores(run, methods: dict[str, str], settings: dict, query_set: str, query_indices: list[int],
                  key_prefix: str, label_suffix: str = "") -> dict:
    """Scores ``[Q, N]`` of each method in ``methods`` (name -> label) that are ready.

    "influence" runs the K-FAC engine with ``settings``; any other name is a baseline. Missing
    artifacts are built by background jobs, one at a time (2 CPU cores); the others show "queued".
    """
    fp = model_fingerprint(run)
    scores = {}
    busy = running_job(run, "influence") or running_job(run, "baseline")
    for m, label in methods.items():
        common = {"query_set": query_set, "query_indices": [int(i) for i in query_indices], "model": fp}
        kind, args = ("influence", {"settings": settings, **common}) if m == "influence" \
            else ("baseline", {"method": m, **common})
        if busy is not None and busy["args"] != args and jobs.status(run.path, jobs.job_id(kind, args)) is None:
            st.caption(f"{label}: queued (one build at a time)")
            continue
        with user_errors():
            state, s = ensure_job(run, kind, args, label + label_suffix, wait_s=1.0, key=f"{key_prefix}_{m}")
            if state is not None and state["status"] == "running":
                busy = state
            if s is not None:
                scores[m] = s
    return scores


@contextlib.contextmanager
def user_errors():
    """Show a UserError as st.error (one actionable line) instead of a traceback."""
    try:
        yield
    except UserError as exc:
        st.error(str(exc))


# ----------------------------------------------------------------------------- cached loads


def _mtime(p: Path) -> float:
    return p.stat().st_mtime if p.exists() else 0.0


@st.cache_resource(show_spinner="Loading the dataset…", max_entries=4)
def _dataset(run_path: str, config_mtime: float):
    return Run(Path(run_path)).dataset()


def dataset(run: Run):
    """The run's training set (cached per run)."""
    return _dataset(str(run.path), _mtime(run.path / "config.json"))


@st.cache_data(show_spinner=False, max_entries=32)
def _samples(run_path: str, name: str, mtime: float) -> dict:
    tensors, meta = Run(Path(run_path)).load_samples(name)
    return {"images": tensors["images"], "has_trajectory": "trajectory" in tensors, "meta": meta}


def samples(run: Run, name: str) -> dict:
    """``{"images": [n,C,H,W], "has_trajectory": bool, "meta": dict}`` of a sample set (cached)."""
    return _samples(str(run.path), name, _mtime(run.path / "samples" / f"{name}.safetensors"))


def model_fingerprint(run: Run) -> str:
    return _fingerprint(str(run.path), _mtime(run.model_dir))


@st.cache_data(show_spinner=False, max_entries=16)
def _fingerprint(run_path: str, mtime: float) -> str:
    return Run(Path(run_path)).model_fingerprint()


# ----------------------------------------------------------------------------- images


def upscale(img: np.ndarray, size: int = 96) -> np.ndarray:
    """Nearest-neighbour upscaling so 8x8 / 16x16 digits are visible."""
    f = max(1, size // img.shape[0])
    return img.repeat(f, axis=0).repeat(f, axis=1)


def _select_detail(state_key: str, index: int) -> None:
    st.session_state[state_key] = index


def image_grid(images, captions: list[str], columns: int = 8, size: int = 96,
               indices: Optional[list[int]] = None, detail_key: Optional[str] = None, key_prefix: str = "") -> None:
    """``images``: float ``[n,C,H,W]`` in [-1, 1] or uint8 ``[n,H,W(,C)]``.

    With ``indices`` and ``detail_key``, each image gets a "details" button that sets
    ``st.session_state[detail_key]`` to its training index (st.image itself is not clickable).
    """
    arr = images if isinstance(images, np.ndarray) else images_uint8(images)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    for start in range(0, len(arr), columns):
        cols = st.columns(columns)
        for j, (col, img, cap) in enumerate(zip(cols, arr[start:start + columns], captions[start:start + columns])):
            col.image(upscale(img, size), caption=cap, width=size)
            if indices is not None and detail_key is not None:
                col.button("details", key=f"{key_prefix}_{start + j}", on_click=_select_detail,
                           args=(detail_key, int(indices[start + j])), type="tertiary")


# ----------------------------------------------------------------------------- jobs


@st.fragment(run_every=1.0)
def job_progress(run_path: str, jid: str, label: str) -> None:
    """Progress bar with stage name and time estimate, polled every second; reruns the whole page
    once the job has finished so the page shows its result."""
    state = jobs.status(Path(run_path), jid)
    if state is None:
        return
    if state["status"] in ("running", "queued"):
        st.session_state[f"_seen_running_{jid}"] = True
        total = state.get("total") or 1
        st.progress(min(1.0, float(state.get("done") or 0) / total), text=f"{label} — {jobs.describe(state)}")
        if st.button("Cancel", key=f"cancel_{jid}", help="stops at the next progress report; what is built is kept"):
            jobs.cancel(Path(run_path), jid)
    elif st.session_state.pop(f"_seen_running_{jid}", False):
        st.rerun(scope="app")


def ensure_job(run: Run, kind: str, args: dict, label: str, auto_start: bool = True,
               wait_s: float = 2.5, key: str = "") -> tuple[Optional[dict], Optional[object]]:
    """Drive one background job from a page: start it when missing (``auto_start``), wait up to
    ``wait_s`` seconds (cached work finishes within that, so the page shows the result directly),
    else show its progress panel. Returns ``(state, scores or None)``; failures show st.error with
    a Retry button, cancelled / interrupted jobs a Resume button."""
    jid = jobs.job_id(kind, args)
    state = jobs.status(run.path, jid)
    if state is not None and state["status"] == "done":
        scores = jobs.load_result(run.path, jid)
        if scores is not None or kind not in ("influence", "baseline"):
            return state, scores
        state = None  # the result file was deleted: build again
    if state is None and auto_start:
        jobs.start(kind, run.path, args)
        try:
            state = jobs.wait(run.path, jid, timeout=wait_s)
        except TimeoutError:
            state = jobs.status(run.path, jid)
        if state and state["status"] == "done":
            return state, jobs.load_result(run.path, jid)
    if state is None:
        if st.button(f"Compute {label}", key=f"start_{key or jid}"):
            jobs.start(kind, run.path, args)
            st.rerun()
        return None, None
    if state["status"] == "running":
        job_progress(str(run.path), jid, label)
    elif state["status"] == "failed" and state.get("error_type") in UNAVAILABLE_ERRORS:
        st.info(f"{label} unavailable: {state.get('error')}")
        if st.button("Retry", key=f"retry_{key or jid}"):
            jobs.start(kind, run.path, args)
            st.rerun()
    elif state["status"] == "failed":
        st.error(f"{label}: {state.get('error')}")
        if st.button("Retry", key=f"retry_{key or jid}"):
            jobs.start(kind, run.path, args)
            st.rerun()
    elif state["status"] in ("cancelled", "interrupted"):
        st.warning(f"{label}: {state.get('error')}")
        if st.button("Resume", key=f"resume_{key or jid}"):
            jobs.start(kind, run.path, args)
            st.rerun()
    return state, None


def running_job(run: Run, kind: str) -> Optional[dict]:
    """A running job of this kind in the run, if any (to avoid building the same artifact twice)."""
    return next((s for s in jobs.list_jobs(run.path) if s["kind"] == kind and s["status"] == "running"), None)

