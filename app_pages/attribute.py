"""Attribute: K-FAC / EK-FAC influence galleries for one query, beside TRAK, D-TRAK, CLIP and pixel."""

from dataclasses import asdict

import streamlit as st

from attribution.app_state import (SIGN_LEGEND, export_csv, export_json, gallery_rows, log_damping_options,
                                   rank_of, scores_table, top_k_simple)
from attribution.jobs import job_id
from attribution.jobs import status as job_status
from app_pages._common import (current_run, dataset, ensure_job, image_grid, model_fingerprint,
                           require_model, running_job, samples, user_errors)

MEASURE_LABELS = {"loss": "loss", "lt": "l_t (one timestep)", "elbo": "ELBO", "elbo-simple": "simplified ELBO",
                  "trajectory": "trajectory log-prob", "square-norm": "square norm (D-TRAK)"}
BASELINES = {"pixel": "pixel cosine", "clip": "CLIP cosine", "trak": "TRAK", "dtrak": "D-TRAK"}

st.title("Attribute")
run = current_run()
require_model(run)
ds = dataset(run)
T = run.schedule().T
names = run.sample_names()
if not names:
    st.info("This run has no samples yet: draw some on the **Sample** page.")
    st.stop()

# ----------------------------------------------------------------------------- query and settings
left, right = st.columns([1, 3], gap="large")
with left:
    st.markdown("#### Query")
    picked = st.session_state.get("queries") or {}
    default_set = picked.get("set") if picked.get("set") in names else ("queries" if "queries" in names else names[0])
    qset = st.selectbox("Sample set", names, index=names.index(default_set), key="a_set", bind="query-params")
    s = samples(run, qset)
    n_q = len(s["images"])
    default_q = min(picked.get("indices", [0])[0], n_q - 1) if picked.get("set") == qset else 0
    q = st.selectbox("Query sample (index in the set)", list(range(n_q)), index=default_q, key="a_q",
                     bind="query-params")
    image_grid(s["images"][q:q + 1], [f"query {qset}[{q}]"], columns=1, size=160)

    st.markdown("#### Settings")
    # URL-bound widgets keep the CLI's names as options: the link shows ?a_m=elbo, not a label
    measurement = st.selectbox("Measurement (attributed)", list(MEASURE_LABELS), key="a_m", bind="query-params",
                               help=" · ".join(f"{k_}: {v}" for k_, v in MEASURE_LABELS.items()))
    timestep = None
    if measurement == "lt":
        timestep = st.slider("Timestep t (0-indexed)", 0, T - 1, 499, key="a_t", bind="query-params")
    approx = st.selectbox("Measurement used in the approximation", ["same"] + list(MEASURE_LABELS),
                          key="a_am", bind="query-params",
                          help="same = the attributed one; paper Fig. 2b: the loss's gradient predicts the "
                               "ELBO's change better than the ELBO's own")
    approx_t = None
    if approx == "lt":
        approx_t = st.slider("Approximation timestep", 0, T - 1, timestep if timestep is not None else 499,
                             key="a_at", bind="query-params")
    method = st.radio("Hessian", ["kfac", "ekfac"], key="a_h", bind="query-params", horizontal=True,
                      help="kfac: K-FAC · ekfac: EK-FAC (K-FAC eigenbasis, re-fitted eigenvalues)")
    fisher = st.radio("Curvature", ["mc", "empirical"], key="a_f", bind="query-params", horizontal=True,
                      help="mc: MC-Fisher = GGN (the paper's) · empirical: empirical Fisher (TRAK's implicit one)")
    kfac_type = st.radio("K-FAC weight sharing", ["expand", "reduce"], key="a_kt", bind="query-params",
                         horizontal=True)
    damping = st.select_slider("Damping λ (log scale)", log_damping_options(), value=1e-8, key="a_d",
                               bind="query-params", format_func=lambda v: f"{v:.1e}")
    k = st.slider("Top-k", 1, 32, 8, key="a_k", bind="query-params")
    with st.expander("Monte-Carlo draws"):
        train_draws = st.number_input("Draws per training gradient", 1, 1000, 32, key="a_td")
        query_draws = st.number_input("Draws per query gradient", 1, 1000, 64, key="a_qd")
    show_baselines = st.toggle("Baselines beside (TRAK, D-TRAK, CLIP, pixel)", True, key="a_b")

m_text = f"lt:{timestep}" if measurement == "lt" else measurement
am_text = None if approx == "same" else (f"lt:{approx_t}" if approx == "lt" else approx)
settings = dict(method=method, fisher=fisher, kfac_type=kfac_type, damping=float(damping), measurement=m_text,
                approx_measurement=am_text, train_draws=int(train_draws), query_draws=int(query_draws), seed=0)
st.session_state["attr_settings"] = settings  # the Compare and LDS pages start from these
fp = model_fingerprint(run)
export_settings = {"run": str(run.path), "model": fp, "query_set": qset, "query": int(q), "top_k": int(k),
                   "influence": settings}

# ----------------------------------------------------------------------------- influence galleries
rows, scores_row, top = [], None, None
with right:
    st.caption(SIGN_LEGEND)
    from attribution import influence
    from attribution.influence import InfluenceSettings, top_k

    with user_errors():
        full = asdict(InfluenceSettings(**settings))  # validates the settings (UserError on bad ones)
        args = {"settings": full, "query_set": qset, "query_indices": [int(q)], "model": fp}
        other = running_job(run, "influence")
        if other is not None and other["args"] != args:
            st.info("Another influence build is running for this run; these settings are scored when it "
                    "finishes (the shared artifacts are reused).")
            from app_pages._common import job_progress

            job_progress(str(run.path), other["id"], "influence (other settings)")
        else:
            done = job_status(run.path, job_id("influence", args))
            if (done is None or done["status"] != "done") and hasattr(influence, "influence_status"):
                have = influence.influence_status(run, qset, [int(q)], InfluenceSettings(**settings))
                if not all(have.values()):
                    st.caption("Cached: " + (", ".join(k_ for k_, v in have.items() if v) or "nothing yet")
                               + " · to build: " + ", ".join(k_ for k_, v in have.items() if not v))
            state, scores = ensure_job(run, "influence", args, "K-FAC influence", wait_s=2.5)
            if scores is not None:
                scores_row = scores[0]
                top = top_k(scores_row, int(k))
                rows = gallery_rows(f"{method}-{fisher}-{kfac_type}", top, ds)
                st.session_state["attr_last"] = {"args": args, "seconds": state["updated"] - state["started"]}
    if top is not None:
        st.markdown(f"#### {'EK-FAC' if method == 'ekfac' else 'K-FAC'} influence on the {MEASURE_LABELS[measurement]}"
                    + (f" (t = {timestep})" if timestep is not None else ""))
        for group, title in (("positive", "Top positive (proponents)"), ("negative", "Top negative (opponents)"),
                             ("neutral", "Neutral (|τ| smallest)")):
            st.markdown(f"**{title}**")
            items = top[group]
            image_grid(ds.images[[i for i, _ in items]],
                       [f"#{r} · {ds.ids[i].split(':')[-1]} · {ds.label_name(int(ds.labels[i]))} · τ={v:.3g}"
                        for r, (i, v) in enumerate(items, 1)], columns=8, size=72,
                       indices=[i for i, _ in items], detail_key="a_detail", key_prefix=f"d_{group}")

# ----------------------------------------------------------------------------- baselines
baseline_scores = {}
if show_baselines:
    st.markdown("#### Baselines for the same query (top-k most similar / highest score)")
    if running_job(run, "influence") is not None:
        st.info("Baselines start once the influence build has finished.")
    else:
        cols = st.columns(2)
        busy = running_job(run, "baseline")  # one baseline builds at a time (2 CPU cores)
        for j, (name, label) in enumerate(BASELINES.items()):
            with cols[j % 2]:
                st.markdown(f"**{label}**")
                args = {"method": name, "query_set": qset, "query_indices": [int(q)], "model": fp}
                if busy is not None and busy["args"] != args and job_status(run.path, job_id("baseline", args)) is None:
                    st.caption("queued: starts when the running baseline finishes")
                    continue
                state, scores = ensure_job(run, "baseline", args, label, wait_s=1.0, key=f"b_{name}")
                if state is not None and state["status"] == "running":
                    busy = state
                if scores is None:
                    continue
                row = scores[0]
                baseline_scores[name] = row
                btop = top_k_simple(row, int(k))
                rows += gallery_rows(name, btop, ds)
                items = btop["positive"]
                image_grid(ds.images[[i for i, _ in items]],
                           [f"#{r} · {ds.ids[i].split(':')[-1]} · {ds.label_name(int(ds.labels[i]))} · {v:.3g}"
                            for r, (i, v) in enumerate(items, 1)], columns=8, size=56,
                           indices=[i for i, _ in items], detail_key="a_detail", key_prefix=f"d_{name}")

# ----------------------------------------------------------------------------- details and export
if rows:
    st.markdown("#### Details")
    shown = sorted({r["index"] for r in rows})
    if st.session_state.get("a_detail") not in shown:
        st.session_state.pop("a_detail", None)
    pick = st.selectbox("Inspect a training image (or press \"details\" under any image)", shown, key="a_detail",
                        format_func=lambda i: f"{ds.ids[i]} (label {ds.label_name(int(ds.labels[i]))})")
    c1, c2 = st.columns([1, 3])
    with c1:
        image_grid(ds.images[[pick]], [ds.ids[pick]], columns=1, size=160)
    with c2:
        detail = [{"method": "influence", "score": float(scores_row[pick]), "rank": rank_of(scores_row, pick)}] \
            if scores_row is not None else []
        detail += [{"method": m, "score": float(r[pick]), "rank": rank_of(r, pick)} for m, r in baseline_scores.items()]
        st.markdown(f"index **{pick}** · id `{ds.ids[pick]}` · label **{ds.label_name(int(ds.labels[pick]))}** "
                    f"· rank out of {len(ds)}")
        st.dataframe(detail, hide_index=True)

    st.markdown("#### Export")
    c1, c2, c3 = st.columns(3)
    c1.download_button("Galleries (CSV)", export_csv(rows, export_settings), "galleries.csv", "text/csv")
    c2.download_button("Galleries + settings (JSON)", export_json(export_settings, rows), "galleries.json",
                       "application/json")
    if scores_row is not None:
        table = scores_table(scores_row, ds)
        c3.download_button("All influence scores (CSV)",
                           export_csv(table.to_dict("records"), export_settings), "scores.csv", "text/csv")
