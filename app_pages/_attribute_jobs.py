"""The Attribute page's jobs: the influence result for the current settings (debounced, with a
plain-words line on what is computed), and the background warm-up after the first gallery."""

from __future__ import annotations

import os
import time

import streamlit as st

from attribution import jobs
from attribution.attribute_text import build_summary
from attribution.job_kinds import warmup_steps
from attribution.runs import config_hash
from app_pages._common import ensure_job, session_id

DEBOUNCE_S = 0.35  # a settings change waits this long before starting a job: values passed over start none


def warmup_enabled() -> bool:
    """``ATTRIBUTION_WARMUP=0`` switches the warm-up off (tests where it is not the subject)."""
    return os.environ.get("ATTRIBUTION_WARMUP", "1") != "0"


def scored_rounds(run, settings) -> int:
    """How many store rounds the gallery is scored with: every completed round once the preview
    exists (re-scoring them takes about a second), else the preview's PREVIEW_ROUNDS."""
    from attribution.influence import PREVIEW_ROUNDS, store_rounds_done

    return max(min(PREVIEW_ROUNDS, settings.rounds), store_rounds_done(run, settings))


def influence_result(run, args: dict, label: str, ds):
    """``(state, scores row [N] or None, result dict or None)`` for influence ``args``; starts the
    job when missing. The store rounds scored are :func:`scored_rounds` (``args["rounds"]``).

    Only a settled value starts a job: a new request first waits ``DEBOUNCE_S`` and then yields
    to Streamlit (a newer widget value stops this run there), and this session's queued requests
    for settings it has moved away from are cancelled."""
    from attribution.influence import InfluenceSettings, influence_status
    from attribution.job_kinds import warm_engine

    warm_engine(run)
    settings_obj = InfluenceSettings(**args["settings"])
    args = {**args, "rounds": scored_rounds(run, settings_obj)}
    jid = jobs.job_id("influence", args)
    state = jobs.status(run.path, jid)
    if state is not None and state["status"] == "done" and jobs.has_result(run.path, state):
        st.session_state["a_requested"] = jid
        return state, jobs.load_result(run.path, jid)[0], state.get("result")
    if st.session_state.get("a_requested") != jid and (state is None or state["status"] not in jobs.ACTIVE):
        time.sleep(DEBOUNCE_S)
        st.empty()  # a yield point: if the slider moved on meanwhile, this run stops here
    st.session_state["a_requested"] = jid
    jobs.cancel_superseded(run.path, session_id(), "influence", keep=jid)
    have = influence_status(run, args["query_set"], list(args["query_indices"]), settings_obj, rounds=args["rounds"])
    summary = build_summary(have, args["settings"], len(ds), args["query_set"], args["query_indices"][0])
    if summary:
        st.caption(summary)
    state, scores = ensure_job(run, "influence", args, label, wait_s=2.5)
    return state, None if scores is None else scores[0], None if state is None else state.get("result")


def _store_key(settings: dict) -> str:
    """The store's artifact key, as the job scheduler keys its builds (one store for every variant)."""
    from attribution.influence import InfluenceSettings
    from attribution.job_kinds import artifact_keys

    return artifact_keys("", InfluenceSettings(**settings))["store"]


def start_refinement(run, args: dict) -> None:
    """After a preview gallery: grow the store to all its rounds in the background (low priority,
    resumable; every completed round is kept), so the gallery sharpens as rounds land."""
    from attribution.influence import InfluenceSettings

    if not warmup_enabled():  # ATTRIBUTION_WARMUP=0 switches off every background build (tests)
        return
    settings = InfluenceSettings(**args["settings"])
    full = {**args, "rounds": settings.rounds}
    jid = jobs.job_id("influence", full)
    state = jobs.status(run.path, jid)
    if state is not None and state["status"] in jobs.ACTIVE + ("done",):
        return
    # the store is shared by every variant, damping and measurement: one refinement grows it for all
    # (another one per changed setting would only queue behind it and crowd the job list)
    if any(s["kind"] == "influence" and (s.get("args") or {}).get("rounds") == settings.rounds
           and _store_key(s["args"]["settings"]) == _store_key(args["settings"])
           for s in jobs.active_jobs(run.path)):
        return
    jobs.start("influence", run.path, full, mode=jobs.app_mode(), owner=session_id(), priority="background",
               label=f"refining: the training gradients' remaining rounds ({settings.train_draws} draws in all)")


@st.fragment(run_every=3.0)
def refinement_watch(run, settings_dict: dict, rounds_shown: int) -> None:
    """Reruns the page when the background refinement has completed a new round (the gallery is
    then re-scored with it: about a second)."""
    from attribution.influence import InfluenceSettings, store_rounds_done

    settings = InfluenceSettings(**settings_dict)
    done = store_rounds_done(run, settings)
    if done > rounds_shown:
        st.rerun()
    if rounds_shown < settings.rounds:
        st.caption(f"Refining in the background: round {done + 1} of {settings.rounds} of the training gradients; "
                   "the gallery sharpens as each round lands.")


def start_warmup(run, settings: dict, query_set: str, query: int, model: str, baselines) -> None:
    """After a gallery: prepare the other Hessian variants and the baselines of this query in the
    background (low priority, yields to requests). Once per session and run (and draws): what it
    builds (factors, the baselines' training features) serves every query, damping and
    measurement, so later changes only re-score."""
    if not warmup_enabled():
        return
    fixed = {k: settings.get(k) for k in ("train_draws", "factor_draws", "seed", "store_dtype")}
    key = config_hash([str(run.path), fixed])
    started = st.session_state.setdefault("_warmups", {})
    if key in started:
        return
    from attribution.influence import InfluenceSettings

    steps = warmup_steps(settings, query_set, query, model, list(baselines),
                         rounds=scored_rounds(run, InfluenceSettings(**settings)))
    started[key] = jobs.start("warmup", run.path, {"steps": steps}, mode=jobs.app_mode(), owner=session_id(),
                              label=f"warm-up for query {query_set}[{query}]: the other Hessian variants and the baselines",
                              priority="background")
    st.session_state["_warmup_jid"] = started[key]


@st.fragment(run_every=2.0)
def warmup_status(run) -> None:
    """One line on this session's warm-up (polled on its own, the page does not rerun)."""
    jid = st.session_state.get("_warmup_jid")
    state = jobs.status(run.path, jid) if jid else None
    if state is None:
        return
    if state["status"] in jobs.ACTIVE:
        c1, c2 = st.columns([5, 1])
        c1.caption("Preparing the other Hessian variants and the baselines in the background, so later switches "
                   f"take about a second: {state.get('stage_label') or 'starting'}.")
        if c2.button("Stop warm-up", key="a_stop_warmup", type="tertiary"):
            jobs.cancel(run.path, jid, by=session_id())
    elif state["status"] == "done":
        st.caption("Warm-up done: the other Hessian variants and the baselines of this query are ready.")
