"""Attribute: K-FAC / EK-FAC influence galleries for one query, beside TRAK, D-TRAK, CLIP and pixel.

While something builds, the last gallery stays on screen marked "updating"; after the first
gallery a background warm-up prepares the other Hessian variants and the baselines
(app_pages/_attribute_jobs.py). A gallery is drawn by :func:`render_gallery` from one score row
and an info dict, so new per-gallery figures (stability, uncertainty) go into that dict.
"""

from dataclasses import asdict

import streamlit as st

from attribution import jobs
from attribution.app_state import (export_csv, export_json, gallery_rows, log_damping_options, rank_of,
                                   scores_table, top_k_simple)
from attribution.attribute_text import (BASELINE_CAPTION_KEY, CAPTION_KEY, MEASURE_LABELS, approx_note, caption,
                                        default_approx, settings_label, sign_legend, variant_label)
from app_pages._attribute_jobs import (influence_result, refinement_watch, start_refinement, start_warmup,
                                       warmup_status)
from app_pages._common import (current_run, dataset, ensure_job, image_grid, model_fingerprint, require_model,
                               samples, user_errors)
from app_pages._url import check_choice, check_range

BASELINES = {"pixel": "pixel cosine", "clip": "CLIP cosine", "trak": "TRAK", "dtrak": "D-TRAK"}
GROUPS = (("positive", "Top positive (proponents)"), ("negative", "Top negative (opponents)"),
          ("neutral", "Neutral (|τ| smallest)"))


def robust_mark(scores_row, se, index: int, k: int, group: str) -> str:
    """`` ✓`` when the image stays in the top-k of its group over its whole 90% rank interval."""
    import torch

    from attribution.stability import rank_interval

    row = torch.as_tensor(scores_row, dtype=torch.float64)
    se_t = torch.as_tensor(se, dtype=torch.float64)
    if group == "negative":
        row = -row
    _, worst = rank_interval(row, se_t, int(index))
    return " · ✓" if worst <= k else ""


def render_gallery(scores_row, info: dict) -> list[dict]:
    """Draw one method's galleries from its score row ``[N]``; returns the export rows.

    ``info``: ``title`` (None: drawn by the caller), ``method`` (export name), ``k``, ``ds`` (the training set), ``key``
    (widget prefix), ``kind`` ("influence": positive / negative / neutral; "baseline": the most
    similar), optional ``updating`` (text: the gallery is for earlier settings and is being
    replaced) and ``notes`` (extra caption lines, e.g. reliability figures)."""
    from attribution.influence import top_k

    ds, k = info["ds"], int(info["k"])
    top = top_k(scores_row, k) if info.get("kind", "influence") == "influence" else top_k_simple(scores_row, k)
    groups = GROUPS if info.get("kind", "influence") == "influence" else (("positive", None),)
    if info.get("title"):
        st.markdown(f"#### {info['title']}" + (" — updating" if info.get("updating") else ""))
    if info.get("updating"):
        st.caption(info["updating"])
    for line in info.get("notes", []):
        st.caption(line)
    tau = info.get("kind", "influence") == "influence"
    for group, heading in groups:
        items = top[group]
        if heading:
            st.markdown(f"**{heading}**")
        if not items:
            st.caption("none")
            continue
        se = info.get("se")
        image_grid(ds.images[[i for i, _ in items]],
                   [caption(r, ds.ids[i], ds.label_name(int(ds.labels[i])), v, tau=tau)
                    + (robust_mark(scores_row, se, i, k, group) if se is not None and group != "neutral" else "")
                    for r, (i, v) in enumerate(items, 1)],
                   columns=info.get("columns", 8), size=info.get("size", 88),
                   indices=[i for i, _ in items], detail_key="a_detail", key_prefix=f"{info['key']}_{group}")
    return gallery_rows(info["method"], top, ds)


def stability_notes(stab: dict, k: int) -> list[str]:
    """Plain-words reliability lines of a gallery (from the two halves of its own draws)."""
    if not stab:
        return []
    out = []
    if stab.get("preview"):
        out.append(f"Preview: {stab['train_draws_done']} of the training gradients' draws so far (round "
                   f"{stab['rounds_done']} of {stab['rounds_total']}); more draws are being added in the background.")
    if "stability" in stab:
        kk = stab.get("k", k)
        out.append(f"Reliability (from two independent halves of the draws): a re-run with other random draws "
                   f"would rank the training images with Spearman ≈ {stab['stability']:.2f} and share about "
                   f"{stab['expected_top_pos']:.0f} of the top-{kk} proponents and {stab['expected_top_neg']:.0f} of "
                   f"the top-{kk} opponents. Images marked ✓ stay in the top-{k} within their 90% rank interval.")
    return out


def _measurement_changed() -> None:
    """Follow the measurement with the approximation default (the loss for the ELBO), unless the
    user picked the approximation measurement themselves."""
    m, am = st.session_state.get("a_m", "loss"), st.session_state.get("a_am", "same")
    if st.session_state.get("_a_am_auto", True) or am == "same":
        st.session_state["a_am"] = default_approx(m)
        st.session_state["_a_am_auto"] = True


def _approx_changed() -> None:
    st.session_state["_a_am_auto"] = st.session_state.get("a_am") == default_approx(st.session_state.get("a_m", "loss"))


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
    check_choice("a_set", names, default_set, what="sample set")
    qset = st.selectbox("Sample set", names, index=names.index(default_set), key="a_set", bind="query-params")
    s = samples(run, qset)
    n_q = len(s["images"])
    default_q = min(picked.get("indices", [0])[0], n_q - 1) if picked.get("set") == qset else 0
    check_choice("a_q", list(range(n_q)), default_q, what="query index")
    q = st.selectbox("Query sample (index in the set)", list(range(n_q)), index=default_q, key="a_q",
                     bind="query-params")
    image_grid(s["images"][q:q + 1], [f"query {qset}[{q}]"], columns=1, size=160)

    st.markdown("#### Settings")
    # URL-bound widgets keep the CLI's names as options and no format_func: Streamlit writes the
    # formatted label into the URL, and the link should read ?a_m=elbo
    check_choice("a_m", list(MEASURE_LABELS), "loss", what="measurement")
    measurement = st.selectbox("Measurement (attributed)", list(MEASURE_LABELS), key="a_m", bind="query-params",
                               on_change=_measurement_changed,
                               help=" · ".join(f"{k_}: {v}" for k_, v in MEASURE_LABELS.items()))
    timestep = None
    if measurement == "lt":
        check_range("a_t", 0, T - 1, 499, cast=int, what="timestep")
        timestep = st.slider("Timestep t (0-indexed)", 0, T - 1, 499, key="a_t", bind="query-params")
    approx_options = ["same"] + list(MEASURE_LABELS)
    if "a_am" not in st.session_state and "a_am" not in st.query_params:
        st.session_state["a_am"] = default_approx(measurement)
    check_choice("a_am", approx_options, st.session_state.get("a_am", "same"), what="approximation measurement")
    approx = st.selectbox("Gradient used in the approximation", approx_options, key="a_am", bind="query-params",
                          on_change=_approx_changed,
                          help="Measurement substitution: another measurement's gradient stands in for the "
                               "attributed one's (same: the attributed one's own; the default for the ELBO is "
                               "the loss, paper Fig. 2b)")
    approx_t = None
    if approx == "lt":
        approx_t = st.slider("Approximation timestep", 0, T - 1, timestep if timestep is not None else 499,
                             key="a_at", bind="query-params")
    check_choice("a_h", ["kfac", "ekfac"], "kfac", what="Hessian")
    method = st.radio("Hessian", ["kfac", "ekfac"], key="a_h", bind="query-params", horizontal=True,
                      help="kfac: K-FAC · ekfac: EK-FAC (K-FAC's eigenbasis with re-fitted eigenvalues)")
    check_choice("a_f", ["mc", "empirical"], "mc", what="curvature")
    fisher = st.radio("Curvature", ["mc", "empirical"], key="a_f", bind="query-params", horizontal=True,
                      help="mc: MC Fisher = GGN (the paper's) · empirical: empirical Fisher (TRAK's implicit one)")
    check_choice("a_kt", ["expand", "reduce"], "expand", what="K-FAC weight sharing")
    kfac_type = st.radio("K-FAC weight sharing", ["expand", "reduce"], key="a_kt", bind="query-params",
                         horizontal=True)
    check_choice("a_d", log_damping_options(), 1e-8, format_func=lambda v: f"{v:.1e}", what="damping")
    damping = st.select_slider("Damping λ (log scale)", log_damping_options(), value=1e-8, key="a_d",
                               bind="query-params", format_func=lambda v: f"{v:.1e}")
    check_range("a_k", 1, 32, 8, cast=int, what="top-k")
    k = st.slider("Top-k", 1, 32, 8, key="a_k", bind="query-params")
    with st.expander("Monte-Carlo draws"):
        from attribution.influence import InfluenceSettings as _Defaults

        _d = _Defaults()
        train_draws = st.number_input("Draws per training gradient (even: two halves)", 2, 4096, _d.train_draws,
                                      step=2, key="a_td",
                                      help="The gallery is shown after the first rounds (a preview) and sharpens "
                                           "as the remaining rounds land")
        query_draws = st.number_input("Draws per query gradient (even: two halves)", 2, 16384, _d.query_draws,
                                      step=2, key="a_qd")
    show_baselines = st.toggle("Show baselines", True, key="a_b", bind="query-params",
                               help="TRAK, D-TRAK, CLIP cosine and pixel cosine for the same query")

m_text = f"lt:{timestep}" if measurement == "lt" else measurement
am_text = None if approx == "same" else (f"lt:{approx_t}" if approx == "lt" else approx)
settings = dict(method=method, fisher=fisher, kfac_type=kfac_type, damping=float(damping), measurement=m_text,
                approx_measurement=am_text, train_draws=int(train_draws), query_draws=int(query_draws), seed=0)
st.session_state["attr_settings"] = settings  # the Compare and LDS pages start from these
fp = model_fingerprint(run)
export_settings = {"run": str(run.path), "model": fp, "query_set": qset, "query": int(q), "top_k": int(k),
                   "influence": settings}

# ----------------------------------------------------------------------------- influence galleries
rows, scores_row, influence_building = [], None, False
with right:
    st.caption(sign_legend(m_text))
    note = approx_note(m_text, approx)
    if note:
        st.caption(note)
    with user_errors():
        from attribution.influence import InfluenceSettings

        full = asdict(InfluenceSettings(**settings))  # validates the settings (UserError on bad ones)
        args = {"settings": full, "query_set": qset, "query_indices": [int(q)], "model": fp}
        title = f"{variant_label(method, fisher, kfac_type)} influence on the {MEASURE_LABELS[measurement]}" \
            + (f" (t = {timestep})" if timestep is not None else "")
        state, row, result = influence_result(run, args, settings_label(full, qset, int(q)), ds)
        if row is not None:
            scores_row = row
            stab = (result or {}).get("stability", [{}])[0]
            se_row = (result or {}).get("se")
            se_row = None if se_row is None else se_row[0]
            notes = [f"Scored for: {settings_label(full, qset, int(q))}"] + stability_notes(stab, int(k))
            st.session_state["a_last_gallery"] = {"row": row, "title": title, "label": settings_label(full, qset, int(q)),
                                                  "method": f"{method}-{fisher}-{kfac_type}", "settings": full,
                                                  "se": se_row}
            st.session_state["attr_last"] = {"args": state.get("args", args), "seconds": state["updated"] - state["started"]}
            st.session_state["a_uncertainty"] = {"se": se_row, "stability": stab}
            st.caption(CAPTION_KEY)
            rows = render_gallery(row, {"title": title + (" — preview" if stab.get("preview") else ""),
                                        "method": f"{method}-{fisher}-{kfac_type}", "k": k, "ds": ds,
                                        "key": "d", "kind": "influence", "notes": notes, "se": se_row})
            export_settings["stability"] = stab
            if se_row is not None:
                for r_ in rows:
                    r_["se"] = float(se_row[r_["index"]])
            start_warmup(run, full, qset, int(q), fp, BASELINES)
            if stab.get("preview"):
                start_refinement(run, args)
            refinement_watch(run, full, int(stab.get("rounds_done", 0)))
        elif state is not None and state["status"] in jobs.ACTIVE:
            influence_building = True
            last = st.session_state.get("a_last_gallery")
            if last is not None:
                st.caption(CAPTION_KEY)
                render_gallery(last["row"], {"title": last["title"], "method": last["method"], "k": k, "ds": ds,
                                             "key": "d", "kind": "influence", "se": last.get("se"),
                                             "updating": f"Showing the last gallery ({last['label']}) until the "
                                                         "new settings are scored."})
    warmup_status(run)

# ----------------------------------------------------------------------------- baselines


def baseline_block(name: str, label: str, kept: dict) -> list[dict]:
    """One baseline's gallery for the query (its export rows). While its scores are not ready,
    the one it showed last stays, marked as updating; a new baseline build waits until this
    session's influence build is done (the first gallery gets the CPU)."""
    head = st.empty()
    args_b = {"method": name, "query_set": qset, "query_indices": [int(q)], "model": fp}
    state_b = jobs.status(run.path, jobs.job_id("baseline", args_b))
    if influence_building and (state_b is None or state_b["status"] in ("cancelled", "interrupted")):
        scores_b, waiting = None, "starts once the influence gallery is ready (the CPU goes to it first)"
    else:
        state_b, scores_b = ensure_job(run, "baseline", args_b, label, wait_s=1.0, key=f"b_{name}")
        waiting = "until this query's scores are ready" if state_b is not None and state_b["status"] in jobs.ACTIVE \
            else None
    info = {"title": None, "method": name, "k": k, "ds": ds, "key": f"d_{name}", "kind": "baseline", "size": 80,
            "columns": 4}
    if scores_b is not None:
        head.markdown(f"**{label}**")
        kept[name] = {"row": scores_b[0], "query": f"{qset}[{q}]"}
        baseline_scores[name] = scores_b[0]
        return render_gallery(scores_b[0], info)
    if waiting and name in kept:
        head.markdown(f"**{label}** — updating")
        render_gallery(kept[name]["row"], {**info, "updating": f"Showing query {kept[name]['query']}'s; this "
                                                               f"query's {waiting}."})
    else:
        head.markdown(f"**{label}**")
        if waiting and state_b is None:
            st.caption(waiting)
    return []


baseline_scores = {}
if show_baselines:
    st.markdown("#### Baselines for the same query (top-k most similar / highest score)")
    st.caption(BASELINE_CAPTION_KEY)
    cols = st.columns(2)
    kept = st.session_state.setdefault("a_last_baselines", {})
    for j, (name, label) in enumerate(BASELINES.items()):
        with cols[j % 2]:
            rows += baseline_block(name, label, kept)

# ----------------------------------------------------------------------------- details and export
if rows:
    st.markdown("#### Details")
    shown = sorted({r["index"] for r in rows})
    current = st.session_state.get("a_detail")
    if current not in shown or current == st.session_state.get("_a_detail_auto"):
        # opens on the top proponent (else the first image shown), and follows it while the gallery
        # sharpens, until the user picks another image
        top_pos = [r["index"] for r in rows if r["group"] == "positive" and r["rank"] == 1]
        st.session_state["a_detail"] = st.session_state["_a_detail_auto"] = top_pos[0] if top_pos else rows[0]["index"]
    pick = st.selectbox("Inspect a training image (or press \"details\" under any image)", shown, key="a_detail",
                        format_func=lambda i: f"{ds.ids[i]} (label {ds.label_name(int(ds.labels[i]))})")
    c1, c2 = st.columns([1, 3])
    with c1:
        image_grid(ds.images[[pick]], [ds.ids[pick]], columns=1, size=160)
    with c2:
        unc = st.session_state.get("a_uncertainty") or {}
        detail = []
        if scores_row is not None:
            entry = {"method": "influence", "score": float(scores_row[pick]), "rank": rank_of(scores_row, pick)}
            if unc.get("se") is not None:
                import torch

                from attribution.stability import rank_interval

                lo, hi = rank_interval(torch.as_tensor(scores_row, dtype=torch.float64),
                                       torch.as_tensor(unc["se"], dtype=torch.float64), int(pick))
                entry.update({"± standard error": float(unc["se"][pick]), "90% rank interval": f"{lo}–{hi}"})
            detail.append(entry)
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
