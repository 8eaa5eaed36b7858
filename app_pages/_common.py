"""UI helpers shared by the pages: run picker, cached loads, image grids, background-job panels."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Optional

import numpy as np
import streamlit as st

from attribution import jobs
from attribution.app_state import available_runs, images_uint8, run_labels
from attribution.errors import UserError
from attribution.runs import Run, open_run

RUN_KEY = "run"
UNAVAILABLE_ERRORS = ("ClipUnavailable",)  # a missing optional component: shown as unavailable, not an error


# ----------------------------------------------------------------------------- run picker


def run_picker() -> None:
    """Sidebar selectbox of runs (bound to ``?run=`` in the URL); sets ``session_state.run_path``."""
    runs = [str(p) for p in available_runs()]
    labels = dict(zip(runs, run_labels([Path(p) for p in runs])))  # unique: the URL holds the label
    with st.sidebar:
        st.markdown("### Run")
        if not runs:
            st.session_state.pop("run_path", None)
            st.error("No run found: train one on the Model & data page (or with `attribution train` in a terminal).")
            return
        path = st.selectbox("Run directory", runs, key=RUN_KEY, bind="query-params",
                            format_func=lambda p: labels.get(p, str(p)),
                            help="ATTRIBUTION_RUN pins a run; ATTRIBUTION_RUNS is the runs folder")
        st.session_state["run_path"] = path
        st.caption(f"`{path}` · device: **{device_name()}**")
        active = jobs.active_jobs(Path(path))
        if active:
            st.caption("Background jobs: " + " · ".join(
                f"{s.get('label') or s['kind']} ({'queued' if s['status'] == 'queued' else job_line(s)})"
                for s in active))


def current_run() -> Run:
    """The picked run; stops the page with an st.error when there is none or it is unusable."""
    path = st.session_state.get("run_path")
    if not path:
        st.error("No run selected: pick one in the sidebar, or train one on the Model & data page "
                 "(or with `attribution train` in a terminal).")
        st.stop()
    try:
        return open_run(path)
    except UserError as exc:
        st.error(str(exc))
        st.stop()


def require_model(run: Run) -> None:
    """Stops the page with a warning when the run has no model yet; else readies the influence
    engine for it (once per process, behind a lock: sessions are threads)."""
    if not run.has_model():
        st.warning(f"Run `{run.path}` has no trained model yet (training may still be running). "
                   "Pick another run or wait for training to finish.")
        st.stop()
    from attribution.job_kinds import warm_engine

    with user_errors():
        warm_engine(run)


def device_name() -> str:
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"


def method_scores(run, methods: dict[str, str], settings: dict, query_set: str, query_indices: list[int],
                  key_prefix: str, label_suffix: str = "") -> dict:
    """Scores ``[Q, N]`` of each method in ``methods`` (name -> label) that are ready.

    "influence" runs the K-FAC engine with ``settings``; any other name is a baseline. Missing
    artifacts are built by background jobs; the job queue runs each artifact's build once and
    lets re-scores on cached artifacts through at once (attribution.jobs)."""
    fp = model_fingerprint(run)
    scores = {}
    for m, label in methods.items():
        common = {"query_set": query_set, "query_indices": [int(i) for i in query_indices], "model": fp}
        kind, args = ("influence", {"settings": settings, **common}) if m == "influence" \
            else ("baseline", {"method": m, **common})
        with user_errors():
            _, s = ensure_job(run, kind, args, label + label_suffix, wait_s=1.0, key=f"{key_prefix}_{m}")
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


NON_BREAKING_HYPHEN = "\u2011"


def unbroken(caption: str) -> str:
    """``caption`` with every hyphen inside a token ("top-80", "D-TRAK") made non-breaking, so a
    narrow caption wraps between tokens, never at their hyphen."""
    return re.sub(r"(?<=\w)-(?=\w)", NON_BREAKING_HYPHEN, caption)


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
    The buttons sit in a row of their own under each row of images, so they line up whatever
    the captions' heights.
    """
    arr = images if isinstance(images, np.ndarray) else images_uint8(images)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    for start in range(0, len(arr), columns):
        cols = st.columns(columns)
        for col, img, cap in zip(cols, arr[start:start + columns], captions[start:start + columns]):
            col.image(upscale(img, size), caption=unbroken(cap), width=size)
        if indices is not None and detail_key is not None:
            for j, col in enumerate(st.columns(columns)[:len(arr[start:start + columns])]):
                col.button("details", key=f"{key_prefix}_{start + j}", on_click=_select_detail,
                           args=(detail_key, int(indices[start + j])), type="tertiary")


# ----------------------------------------------------------------------------- jobs


def session_id() -> str:
    """This browser session's id: job records carry it as their owner (only the owner cancels)."""
    if "_session_id" not in st.session_state:
        import uuid

        st.session_state["_session_id"] = uuid.uuid4().hex[:12]
    return st.session_state["_session_id"]


def job_line(state: dict) -> str:
    """The job's progress in words: ``Stage k of n: what — pct — time left (stage, overall)``."""
    if state["status"] == "queued":
        return f"Queued: {state.get('queued_reason') or 'starting'}"
    total = state.get("total") or 1
    pct = 100.0 * float(state.get("done") or 0) / total
    k, n = state.get("stage_index"), state.get("num_stages")
    what = state.get("stage_label") or state.get("stage") or state["kind"]
    line = (f"Stage {k} of {n}: " if k and n else "") + f"{what} — {pct:.0f}%" + (" of this stage" if n and n > 1 else "")
    return line + f" — {jobs.time_left(state)}"


@st.fragment(run_every=1.0)
def job_progress(run_path: str, jid: str, label: str) -> None:
    """Progress of a queued or running job, polled every second: stage k of n with per-stage and
    overall estimates. Its owner gets a Cancel button; other sessions see it read-only, with the
    settings it is for. Reruns the whole page once the job has finished, to show its result."""
    state = jobs.status(Path(run_path), jid)
    if state is None:
        return
    if state["status"] in jobs.ACTIVE:
        st.session_state[f"_seen_running_{jid}"] = True
        total = state.get("total") or 1
        frac = 0.0 if state["status"] == "queued" else float(state.get("overall_fraction")
                                                              or min(1.0, float(state.get("done") or 0) / total))
        st.progress(frac, text=f"{label} — {job_line(state)}")
        blocker = jobs.status(Path(run_path), state["waiting_for"][0]) if state["status"] == "queued" \
            and state.get("waiting_for") else None
        if blocker is not None and blocker["status"] == "running":
            st.caption(f"The build it waits for ({blocker.get('label') or blocker['kind']}): {job_line(blocker)}")
        if jobs.may_cancel(state, session_id()):
            if st.button("Cancel", key=f"cancel_{jid}", help="stops at the next progress report; what is built is kept"):
                jobs.cancel(Path(run_path), jid, by=session_id())
        else:
            st.caption(f"Started by another session, for: {state.get('label') or label}. "
                       "Read-only here: only that session can cancel it; this page shows the result when it is done.")
    elif st.session_state.pop(f"_seen_running_{jid}", False):
        st.rerun(scope="app")


def _start(run: Run, kind: str, args: dict, label: str, priority: str = "user") -> str:
    return jobs.start(kind, run.path, args, mode=jobs.app_mode(), owner=session_id(), label=label, priority=priority)


def ensure_job(run: Run, kind: str, args: dict, label: str, auto_start: bool = True,
               wait_s: float = 2.5, key: str = "", show_progress: bool = True) -> tuple[Optional[dict], Optional[object]]:
    """Drive one background job from a page: start it when missing (``auto_start``; joining the
    same job when another session already asked for it), wait up to ``wait_s`` seconds (cached
    work finishes within that, so the page shows the result directly), else show its progress
    panel (``show_progress``). Returns ``(state, scores or None)``; failures show st.error with a
    Retry button, cancelled / interrupted jobs a Resume button."""
    jid = jobs.job_id(kind, args)
    state = jobs.status(run.path, jid)
    if state is not None and state["status"] == "done":
        scores = jobs.load_result(run.path, jid)
        if scores is not None or kind not in jobs.SCORE_KINDS:
            return state, scores
        state = None  # the result file was deleted: build again
    if state is not None and state["status"] == "interrupted" and kind in jobs.SCORE_KINDS and auto_start:
        state = None  # stopped by a server restart: scores resume on their own (artifacts are resumable)
    if state is None and auto_start:
        _start(run, kind, args, label)
        try:
            state = jobs.wait(run.path, jid, timeout=wait_s)
        except TimeoutError:
            state = jobs.status(run.path, jid)
        if state and state["status"] == "done":
            return state, jobs.load_result(run.path, jid)
    if state is None:
        if st.button(f"Compute {label}", key=f"start_{key or jid}"):
            _start(run, kind, args, label)
            st.rerun()
        return None, None
    if state["status"] in jobs.ACTIVE:
        if show_progress:
            job_progress(str(run.path), jid, label)
    elif state["status"] == "failed" and state.get("error_type") in UNAVAILABLE_ERRORS:
        st.info(f"{label} is unavailable on this machine: its model weights are not here and cannot be "
                "downloaded now (offline?). The other methods are unaffected.", icon=":material/info:")
        if st.button("Retry", key=f"retry_{key or jid}", help=str(state.get("error"))):
            _start(run, kind, args, label)
            st.rerun()
    elif state["status"] == "failed":
        st.error(f"{label}: {state.get('error')}")
        if st.button("Retry", key=f"retry_{key or jid}"):
            _start(run, kind, args, label)
            st.rerun()
    elif state["status"] in ("cancelled", "interrupted"):
        st.warning(f"{label}: {state.get('error')}")
        if st.button("Resume", key=f"resume_{key or jid}"):
            _start(run, kind, args, label)
            st.rerun()
    return state, None


def running_job(run: Run, kind: str) -> Optional[dict]:
    """A running job of this kind in the run, if any."""
    return next((s for s in jobs.active_jobs(run.path) if s["kind"] == kind and s["status"] == "running"), None)
