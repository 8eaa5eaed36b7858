"""LDS diagnostics: LDS per method (± SE, exact-retraining reference), damping sweeps, predicted vs
actual, per-timestep cross-LDS, measurement stability across retrained models, counterfactual
retraining and counterfactual regeneration. Every setting is in the URL."""

import json
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from attribution.app_state import lds_command, method_note, readable_method
from attribution.jobs import job_id
from attribution.jobs import status as job_status
from app_pages._charts import bars_with_errors, heatmap
from app_pages._common import (current_run, dataset, ensure_job, method_scores, model_fingerprint, require_model,
                               running_job, user_errors)
from app_pages._regen import regen_panel
from app_pages._settings import describe, influence_settings
from app_pages._url import check_choice

st.title("LDS diagnostics")
run = current_run()
require_model(run)
ds = dataset(run)
from attribution.evaluation import list_ground_truth, load_ground_truth  # noqa: E402
from attribution.lds import (cross_lds, exact_retraining_lds, lds, model_correlation,  # noqa: E402
                             predicted_vs_actual)

# option values are the URL's (?l_methods=influence&l_methods=trak)
METHODS = {"influence": "K-FAC influence", "trak": "TRAK", "dtrak": "D-TRAK", "pixel": "pixel cosine",
           "clip": "CLIP cosine"}
DEFAULT_METHODS = ["influence", "trak", "dtrak", "pixel"]
BUILD_CMD = f"attribution lds --run {run.path} --subsets 32 --seeds 2 --draws 128 --measurements loss"
st.caption("The linear datamodeling score (LDS): retrain on many random halves of the training set, measure the "
           "queries, and check how well each method's scores rank those retrained models (Spearman, 100 % = "
           "perfect). The exact-retraining bar is the ceiling: one training seed predicting another.")


def lds_start_form() -> None:
    """Start the LDS ground truth as a background job of this session: on this machine, or on the
    Ray cluster at $ATTRIBUTION_RAY_ADDRESS when the server was started with it."""
    import os

    where = (f"the Ray cluster at `{os.environ['ATTRIBUTION_RAY_ADDRESS']}`" if os.environ.get("ATTRIBUTION_RAY_ADDRESS")
             else "this machine (set ATTRIBUTION_RAY_ADDRESS before starting the app to use a Ray cluster)")
    with st.expander("Build the LDS ground truth in the background"):
        st.caption(f"Retrains the model on random halves of the training data and measures the queries, on {where}. "
                   "Resumable; hours on a CPU.")
        c1, c2, c3 = st.columns(3)
        m = c1.number_input("Subsets", 2, 500, 32, key="l_new_m")
        r = c2.number_input("Seeds per subset", 1, 10, 2, key="l_new_r")
        d = c3.number_input("Draws per measurement", 8, 5000, 128, key="l_new_d")
        args = {"subsets": int(m), "seeds": int(r), "draws": int(d), "measurements": ["loss"]}
        if st.button("Start", key="l_new_go") or st.session_state.get("l_new_args") == args:
            st.session_state["l_new_args"] = args
            ensure_job(run, "lds", args, "LDS ground truth", wait_s=0.5, key="l_new")


def lds_progress_panel() -> None:
    """Progress of LDS retraining jobs started from the CLI (their progress JSON files)."""
    for p in sorted((run.path / "lds").glob("*/progress_*.json")):
        try:
            prog = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        total = prog.get("total") or 1
        st.progress(min(1.0, (prog.get("done") or 0) / total),
                    text=f"LDS job {p.parent.name} — {prog.get('stage')}: {prog.get('done')}/{total}")


truths = list_ground_truth(run)
if not truths:
    st.info("This run has no LDS ground truth yet (retrained models measured on its queries). Build it "
            "from a terminal (resumable; progress appears here):")
    st.code(BUILD_CMD, language="bash", wrap_lines=True)
    lds_start_form()
    lds_progress_panel()
    regen_panel(run, ds)
    st.stop()

# ----------------------------------------------------------------------------- ground truth choice
by_meas: dict[str, dict] = {}
for row in truths:  # the ground truth with the most models per measurement
    m = row.get("measurement")
    best = by_meas.get(m)
    if best is None or row.get("num_subsets", 0) * row.get("num_seeds", 0) > best.get("num_subsets", 0) * best.get("num_seeds", 0):
        by_meas[m] = row
meas_names = sorted(by_meas, key=lambda m: (m != "loss", m))
check_choice("l_m", meas_names, meas_names[0], what="measurement")
measurement = st.selectbox("True measurement (ground truth)", meas_names, key="l_m", bind="query-params")
with user_errors():
    gt = load_ground_truth(Path(by_meas[measurement]["path"]), run)
qset = gt.meta.get("query_set", "queries")
st.caption(f"Ground truth: {gt.num_subsets} subsets × {gt.num_seeds} seeds, {gt.num_queries} queries of "
           f"sample set {qset!r}, {gt.meta.get('num_draws', '?')} MC draws, {gt.meta.get('steps', '?')} steps per "
           f"retrained model. Built with (re-run it with more subsets or seeds to extend it; finished models are "
           f"kept):")
st.code(lds_command(run.path, gt.meta, run.config.get("train")), language="bash", wrap_lines=True)
lds_start_form()
lds_progress_panel()
fp = model_fingerprint(run)
q_all = list(range(gt.num_queries))
inf_settings = {**influence_settings("l", run.schedule().T, with_measurement=False), "measurement": measurement}
st.caption("K-FAC influence: " + describe(inf_settings))

# ----------------------------------------------------------------------------- scores of each method
check_choice("l_methods", list(METHODS), DEFAULT_METHODS, multi=True, what="method")
methods = st.multiselect("Methods", list(METHODS), default=DEFAULT_METHODS, key="l_methods", bind="query-params",
                         help=" · ".join(f"{k}: {v}" for k, v in METHODS.items()))
scores = method_scores(run, {m: METHODS[m] for m in methods}, inf_settings, qset, q_all, "l",
                       label_suffix=f" on all {len(q_all)} queries")

# ----------------------------------------------------------------------------- LDS per method
st.subheader(f"LDS on the {measurement}")
bars = []
with user_errors():
    for m, s in scores.items():
        bars.append((METHODS[m], lds(s, gt)))
    if gt.num_seeds >= 2:
        bars.append(("exact retraining", exact_retraining_lds(gt)))
if bars:
    fig = bars_with_errors([b[0] for b in bars], [100 * b[1].mean for b in bars], [100 * b[1].sem for b in bars],
                           "LDS (%) — mean ± SE over queries",
                           colors=["#888" if b[0] == "exact retraining" else "#1f77b4" for b in bars])
    st.plotly_chart(fig, width="stretch")
    if "influence" in scores:
        res = lds(scores["influence"], gt)
        st.metric("LDS of the current Attribute settings (live)", f"{100 * res.mean:.1f} %",
                  help=f"± {100 * res.sem:.1f} (SE over {res.num_valid} queries)")
    st.download_button("LDS table (JSON)", json.dumps({"measurement": measurement, "ground_truth": by_meas[measurement],
                       "influence_settings": inf_settings,
                       "lds": {name: r.as_dict() for name, r in bars}}, indent=2, default=str), "lds.json", "application/json")

# ----------------------------------------------------------------------------- damping sweep
st.subheader("Damping sweep (K-FAC influence)")
if "influence" in scores:
    from attribution.influence import InfluenceSettings, influence_scores

    dampings = [1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    sweep_key = json.dumps([measurement, inf_settings, fp])
    if st.button("Run the sweep (re-scores from the cached factors)", key="l_sweep"):
        rows = []
        with st.spinner("re-scoring at each damping…"):
            for d in dampings:
                s = influence_scores(run, qset, q_all, InfluenceSettings(**{**inf_settings, "damping": d}))
                rows.append({"damping": d, **lds(s, gt).as_dict()})
        st.session_state["l_sweep_rows"] = (sweep_key, rows)
    saved = st.session_state.get("l_sweep_rows")
    if saved and saved[0] == sweep_key:
        rows = saved[1]
        fig = go.Figure(go.Scatter(x=[r["damping"] for r in rows], y=[100 * r["mean"] for r in rows], mode="lines+markers",
                                   error_y=dict(type="data", array=[100 * r["sem"] for r in rows]), name="K-FAC"))
        fig.update_layout(xaxis_type="log", xaxis_title="damping λ", yaxis_title="LDS (%)", height=320,
                          margin=dict(t=20, b=10))
        st.plotly_chart(fig, width="stretch")
else:
    st.caption("Needs the K-FAC influence scores above (pick it among the methods).")

# ----------------------------------------------------------------------------- predicted vs actual
st.subheader("Predicted vs actual change of the measurement")
if "influence" in scores and gt.base is not None:
    pva = predicted_vs_actual(scores["influence"], gt)
    check_choice("l_q", q_all, 0, what="query index")
    qi = st.selectbox("Query", q_all, key="l_q", bind="query-params", help=f"index in sample set {qset!r}")
    fig = go.Figure(go.Scatter(x=pva["predicted"][qi].tolist(), y=pva["actual"][qi].tolist(), mode="markers",
                               name="subsets"))
    fig.update_layout(xaxis_title="predicted change (1/N Σ τ over removed)", yaxis_title="actual change (retrained − full)",
                      height=340, margin=dict(t=20, b=10))
    st.plotly_chart(fig, width="stretch")
    st.caption(f"Predicted increase in {100 * pva['fraction_predicted_increase']:.0f}% of (query, subset) pairs; "
               f"actual increase in {100 * pva['fraction_actual_increase']:.0f}%.")
elif gt.base is None:
    st.info("This ground truth has no full-data measurement (re-run the LDS job's measure stage).")
else:
    st.caption("Needs the K-FAC influence scores above.")

# ----------------------------------------------------------------------------- measurement stability
st.subheader("Measurement stability across retrained models")
with user_errors():
    corr = model_correlation(gt)
    fig = heatmap(corr["matrix"].numpy(), corr["labels"], corr["labels"],
                  xaxis_title="model (full data first, then each subset and seed)",
                  yaxis_title="model", colorbar_title="Pearson r")
    st.plotly_chart(fig, width="stretch")
    st.caption(f"Pearson correlation of the {measurement} across queries between every pair of models (hover for "
               f"the models); the colours span the off-diagonal range {fig.data[0].zmin:.4f} to "
               f"{fig.data[0].zmax:.4f}. Mean off-diagonal {corr['mean_offdiag']:.3f}, min {corr['min_offdiag']:.3f} "
               "(paper obs. 3: the ELBO barely changes between models).")

# ----------------------------------------------------------------------------- cross-LDS
st.subheader("Per-timestep cross-LDS")
lt_truths = sorted((m for m in by_meas if m.startswith("lt:")), key=lambda m: int(m[3:]))
if len(lt_truths) < 2:
    st.info("Needs ground truth for at least two per-timestep losses (lt:T); build it with the command above "
            "and `--measurements lt:49,lt:199,lt:499,lt:799`.")
else:
    want = st.toggle("Compute the cross-LDS (one influence scoring per timestep)", False, key="l_cross",
                     bind="query-params")
    if want:
        proxies = {}
        for m in lt_truths:
            args = {"settings": {**inf_settings, "measurement": m, "approx_measurement": None}, "query_set": qset,
                    "query_indices": q_all, "model": fp}
            busy = running_job(run, "influence")
            if busy is not None and busy["args"] != args and job_status(run.path, job_id("influence", args)) is None:
                st.caption(f"{m}: queued")
                continue
            state, s = ensure_job(run, "influence", args, f"influence on {m}", wait_s=1.0, key=f"l_x_{m}")
            if s is not None:
                proxies[m] = s
        if len(proxies) == len(lt_truths):
            truth = {m: load_ground_truth(Path(by_meas[m]["path"]), run) for m in lt_truths}
            rows_, cols_, mat = cross_lds(proxies, truth)
            fig = go.Figure(go.Heatmap(z=100 * mat.numpy(), x=[f"true {c}" for c in cols_], y=[f"attributed {r}" for r in rows_],
                                       colorscale="Viridis", text=(100 * mat).round().numpy(), texttemplate="%{text}",
                                       colorbar=dict(title="LDS (%)")))
            fig.update_layout(height=380, margin=dict(t=20, b=10), xaxis_title="true measurement",
                              yaxis_title="attributed measurement")
            st.plotly_chart(fig, width="stretch")
            st.caption("LDS (%) of each attributed per-timestep loss (rows) against each true one (columns); "
                       "paper obs. 1: higher timesteps are better proxies for lower ones.")

# ----------------------------------------------------------------------------- counterfactuals
st.subheader(f"Counterfactual retraining: change of the {measurement} after removing the top-k")
reports = []
for p in sorted((run.path / "lds").glob("cf-*/report_*.json")):
    try:
        reports.append(json.loads(p.read_text()))
    except (OSError, json.JSONDecodeError):
        continue
shown = [r for r in reports if r.get("args", {}).get("measurement") == measurement]
if not shown:
    have = sorted({r.get("args", {}).get("measurement") for r in reports} - {None})
    st.info(f"No counterfactual retraining for the {measurement} in this run"
            + (f" (there is for: {', '.join(have)}; pick it above)" if have else "")
            + ". Build one from a terminal: "
              f"`attribution counterfactual --run {run.path} --scores kfac=SCORES.safetensors --queries 0,1 -k 100 "
              f"--measurement {measurement}`.")
for rep in shown:
    names_cf = list(rep["methods"])
    a = rep.get("args", {})
    fig = bars_with_errors([readable_method(n) for n in names_cf], [rep["methods"][n]["mean"] for n in names_cf],
                           [rep["methods"][n]["sem"] for n in names_cf], f"change of the {measurement} (mean ± SE)",
                           colors=["#888" if n == "random" else "#1f77b4" for n in names_cf], digits=2,
                           title=f"Change of the {measurement} after removing each method's top-{a.get('k')} "
                                 f"(queries {a.get('query_indices')}, {a.get('steps')} training steps)", height=340)
    st.plotly_chart(fig, width="stretch")
    notes = [n for n in (method_note(x) for x in names_cf) if n]
    st.caption(f"A change above 0: the removed images had helped the model produce the query (its {measurement} rises "
               f"without them). Mean ± SE over {len(a.get('query_indices', []))} queries, {a.get('num_seeds', 1)} seed(s)."
               + ("".join(f" {n}." for n in notes)))

regen_panel(run, ds)
