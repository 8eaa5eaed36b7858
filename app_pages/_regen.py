"""LDS page panel: counterfactual regeneration (attribution.regen_job) — shipped results side by
side, with their distances, and a form that starts a new run as a background job."""

from __future__ import annotations

import math
from pathlib import Path

import streamlit as st

from attribution.errors import UserError
from attribution.regen_job import RegenJob, list_reports, load_report
from attribution.regenerate import RemovalMethod
from attribution.runs import Run
from app_pages._common import ensure_job, image_grid, running_job, samples, user_errors
from app_pages._url import check_choice

JOB_KEY = "l_regen_args"


@st.cache_data(show_spinner=False, max_entries=16)
def _load(path: str, mtime: float):
    return load_report(Path(path))


def _fmt(stat: dict, digits: int = 3, signed: bool = False) -> str:
    mean, sem = stat["mean"], stat["sem"]
    m = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return m if sem is None or not math.isfinite(sem) else f"{m} ± {sem:.{digits}f}"


def _describe(report: dict) -> str:
    job, rec = report["job"], report["recipe"]
    labels = ", ".join(report["methods"][m]["label"] for m in job["methods"])
    n = len(report["queries"])
    return (f"k = {job['k']} of {report['num_train']} training images removed per query; {n} "
            f"{'query' if n == 1 else 'queries'} of {job['query_set']!r}; {labels}; each model trained {rec['steps']} "
            f"steps with seed {rec['seed']} (the full model: {rec['train']['steps']})")


def _results(run: Run, report: dict, images: dict, ds) -> None:
    job = report["job"]
    meas = job["measurement"]
    qs = report["queries"]
    check_choice("l_rq", qs, qs[0], what="regenerated query")
    q = st.selectbox("Query", qs, key="l_rq", bind="query-params", help=f"index in sample set {job['query_set']!r}")
    j = qs.index(q)
    order = list(job["methods"]) + ["reference"]
    imgs = [images["original"][j]] + [images[m][j] for m in order]
    caps = [f"original · {job['query_set']}[{q}]"]
    for m in order:
        r = report["methods"][m]
        caps.append(f"{'without top-' + str(job['k']) if m not in ('random', 'reference') else ''} {r['label']}".strip()
                    + f" · L2 {r['l2']['per_query'][j]:.2f} · SSIM {r['ssim']['per_query'][j]:.2f}"
                    + ("" if m == "reference" else f" · Δ{meas} {r['change']['per_query'][j]:+.3f}"))
    import torch

    image_grid(torch.stack(imgs), caps, columns=len(imgs), size=128)
    st.caption(f"Every image starts from query {q}'s own x_T and adds its own noise at every step. "
               f"\"random\" removes {job['k']} random images (the control); \"all data, retrained\" is the reference "
               f"model, retrained on everything with the same seed and recipe (its distance is the retraining noise: "
               f"0 when training is reproducible). Δ{meas}: the query's {meas} under the model without the images minus "
               "under the reference; > 0: the removed images had helped the model produce it.")
    rows = []
    for m in order:
        r = report["methods"][m]
        rows.append({"removed": r["label"] if m != "reference" else "nothing (all data, retrained)",
                     "L2 to the original (mean ± SE)": _fmt(r["l2"], 2),
                     "SSIM to the original": _fmt(r["ssim"], 3),
                     f"change of the {meas}": "—" if m == "reference" else _fmt(r["change"], 3, signed=True)})
    st.markdown(f"**Over {'the 1 query' if len(qs) == 1 else f'all {len(qs)} queries'}** (mean ± standard error)")
    st.dataframe(rows, hide_index=True)
    lines = []
    for pair, v in report["paired"].items():
        a, b = pair.split(" - ")
        lines.append(f"{RemovalMethod(a).label} − {RemovalMethod(b).label}: L2 {_fmt(v['l2'], 2, True)}, "
                     f"SSIM {_fmt(v['ssim'], 3, True)}, Δ{meas} {_fmt(v['change'], 3, True)}")
    if lines:
        st.caption("Paired differences over the same queries: " + " · ".join(lines))
    with st.expander(f"The {job['k']} removed training images of query {q} (first 16 per method)"):
        for m in job["methods"]:
            idx = report["methods"][m]["removed"][j][:16]
            st.markdown(f"**{report['methods'][m]['label']}**")
            image_grid(ds.images[idx], [f"#{r} · {ds.label_name(int(ds.labels[i]))}" for r, i in enumerate(idx, 1)],
                       columns=8, size=72)


def _start_form(run: Run, ds) -> None:
    names = [n for n in run.sample_names() if samples(run, n)["has_trajectory"]]
    if not names:
        st.info("Regeneration needs query samples drawn with their trajectories (Sample page: keep trajectories).")
        return
    steps_run = int(run.config["train"]["steps"])
    with st.form("regen_new"):
        a, b = st.columns(2)
        qset = a.selectbox("Sample set", names, index=names.index("queries") if "queries" in names else 0, key="l_rn_set")
        n_q = len(samples(run, qset)["images"])
        queries = b.multiselect("Queries", list(range(n_q)), default=[0], key="l_rn_q")
        a, b, c = st.columns(3)
        n_train = len(ds)
        k = a.number_input(f"k: training images removed per query (of {n_train})", 1, max(1, n_train - 1),
                           min(80, max(1, n_train // 5)), key="l_rn_k")
        choices = [m.value for m in RemovalMethod if m != RemovalMethod.RANDOM]
        methods = b.multiselect("Methods (random is always added)", choices, default=["kfac", "dtrak"], key="l_rn_m",
                                format_func=lambda v: RemovalMethod(v).label)
        steps = c.number_input("Training steps per model", 1, 1_000_000, steps_run, key="l_rn_steps",
                               help=f"the full model's recipe: {steps_run} steps (the counterfactual's definition)")
        go_ = st.form_submit_button("Retrain and regenerate in the background")
    if go_:
        try:
            job = RegenJob(query_indices=tuple(queries), k=int(k), methods=tuple(methods), query_set=qset,
                           steps=None if int(steps) == steps_run else int(steps))
        except UserError as exc:
            st.error(str(exc))
            return
        st.session_state[JOB_KEY] = job.to_args()
    args = st.session_state.get(JOB_KEY)
    if args:
        job = RegenJob.from_args(args)
        n_models = 1 + len(job.query_indices) * len(job.methods)
        st.caption(f"{n_models} models to train (one per query and method, plus the reference), each "
                   f"{job.steps or steps_run} steps — a full training run each.")
        with user_errors():
            state, _ = ensure_job(run, "regenerate", args, "counterfactual regeneration", wait_s=0.5, key="l_regen")
            if state and state["status"] == "done":
                st.success("Finished; the result is listed above.")


def regen_panel(run: Run, ds) -> None:
    """The whole panel: result picker (``?l_rg=``), images and tables, and the start form."""
    st.subheader("Counterfactual regeneration: what if these images had never been seen?")
    st.caption("For a generated query, remove the k training images a method ranks highest, retrain the model with "
               "the same seed and recipe, and regenerate the query from its own sampling noise. If the sample "
               "changes more than after removing k random images, the method found the images it depends on.")
    reports = list_reports(run)
    if reports:
        options = [f"{p.parent.name}/{p.stem}" for p in reports]
        check_choice("l_rg", options, options[-1], what="regeneration result")
        pick = st.selectbox("Result", options, index=len(options) - 1, key="l_rg", bind="query-params")
        path = reports[options.index(pick)]
        with user_errors():
            report, images = _load(str(path), path.stat().st_mtime)
            st.caption(_describe(report))
            _results(run, report, images, ds)
    else:
        st.info("No regeneration results in this run yet. Start one below, or from a terminal: "
                f"`attribution regenerate --run {run.path} --queries 0,1 --k 80 --methods kfac,dtrak`.")
    other = running_job(run, "regenerate")
    if other is not None and other["args"] != st.session_state.get(JOB_KEY):
        from app_pages._common import job_progress

        job_progress(str(run.path), other["id"], "counterfactual regeneration (started elsewhere)")
    with st.expander("Start a new regeneration (retrains one model per query and method, in the background)",
                     expanded=JOB_KEY in st.session_state):
        _start_form(run, ds)
