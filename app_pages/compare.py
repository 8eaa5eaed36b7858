"""Compare: methods side by side over one or many queries (top-k overlap, rank correlation, galleries)."""

import json

import plotly.graph_objects as go
import streamlit as st

from attribution.app_state import comparison_matrices, export_csv, gallery_rows, top_k_simple
from app_pages._common import (current_run, dataset, image_grid, method_scores, model_fingerprint, require_model,
                           samples)

METHODS = {"influence": "K-FAC influence (Attribute settings)", "trak": "TRAK", "dtrak": "D-TRAK",
           "clip": "CLIP cosine", "pixel": "pixel cosine"}
DEFAULT_SETTINGS = dict(method="kfac", fisher="mc", kfac_type="expand", damping=1e-8, measurement="loss",
                        approx_measurement=None, train_draws=32, query_draws=64, seed=0)

st.title("Compare methods")
run = current_run()
require_model(run)
ds = dataset(run)
names = run.sample_names()
if not names:
    st.info("This run has no samples yet: draw some on the **Sample** page.")
    st.stop()

a, b = st.columns([1, 2])
qset = a.selectbox("Sample set", names, index=names.index("queries") if "queries" in names else 0,
                   key="c_set", bind="query-params")
n_q = len(samples(run, qset)["images"])
queries = b.multiselect("Queries", list(range(n_q)), default=list(range(min(4, n_q))), key="c_q",
                        format_func=lambda i: f"{qset}[{i}]")
a, b = st.columns([2, 1])
methods = a.multiselect("Methods", list(METHODS), default=["influence", "trak", "dtrak", "pixel"],
                        format_func=METHODS.get, key="c_m")
k = b.slider("k (top-k overlap, gallery length)", 1, 32, 10, key="c_k", bind="query-params")
settings = st.session_state.get("attr_settings", DEFAULT_SETTINGS)
st.caption("Influence settings (from the Attribute page): " + json.dumps(settings))
if not queries or len(methods) < 1:
    st.info("Pick at least one query and one method.")
    st.stop()

fp = model_fingerprint(run)
scores = method_scores(run, {m: METHODS[m] for m in methods}, settings, qset, queries, "c")

if len(scores) >= 2:
    names_m, overlap, corr = comparison_matrices(scores, int(k))
    labels = [METHODS[m].split(" (")[0] for m in names_m]
    c1, c2 = st.columns(2)
    for col, mat, title in ((c1, overlap, f"top-{k} overlap (mean over {len(queries)} queries)"),
                            (c2, corr, "Spearman rank correlation (mean over queries)")):
        fig = go.Figure(go.Heatmap(z=mat, x=labels, y=labels, zmin=-1 if mat is corr else 0, zmax=1,
                                   colorscale="RdBu" if mat is corr else "Blues", text=mat.round(2),
                                   texttemplate="%{text}"))
        fig.update_layout(title=title, height=360, margin=dict(t=40, b=10))
        col.plotly_chart(fig, width="stretch")
elif scores:
    st.info("Scores for at least two methods are needed for overlap and rank correlation.")

if scores:
    st.subheader("Galleries aligned by rank")
    qi = st.selectbox("Query", list(range(len(queries))), format_func=lambda j: f"{qset}[{queries[j]}]", key="c_g")
    image_grid(samples(run, qset)["images"][queries[qi]:queries[qi] + 1], ["query"], columns=1, size=96)
    rows = []
    for m, s in scores.items():
        top = top_k_simple(s[qi], int(k))
        rows += gallery_rows(m, top, ds)
        st.markdown(f"**{METHODS[m]}** — ranks 1…{k}")
        items = top["positive"]
        image_grid(ds.images[[i for i, _ in items]],
                   [f"{r} · {ds.label_name(int(ds.labels[i]))} · {v:.3g}" for r, (i, v) in enumerate(items, 1)],
                   columns=min(int(k), 12), size=56)
    st.download_button("Aligned galleries (CSV)", export_csv(rows, {"run": str(run.path), "model": fp, "query_set": qset,
                       "query": int(queries[qi]), "k": int(k), "influence": settings}), "compare.csv", "text/csv")
