"""Compare: methods side by side over one or many queries (top-k overlap, rank correlation, galleries).

Everything shown is set in the URL (sample set, queries, methods, k, influence settings, the
gallery's query), so a link reproduces the view.
"""

import plotly.graph_objects as go
import streamlit as st

from attribution.app_state import comparison_matrices, export_csv, gallery_rows, top_k_simple
from app_pages._common import (current_run, dataset, image_grid, method_scores, model_fingerprint, require_model,
                               samples)
from app_pages._settings import describe, influence_settings
from app_pages._url import check_choice, check_range

# option values are the URL's (?c_m=influence&c_m=trak); the labels are for charts and headings
METHODS = {"influence": "K-FAC influence", "trak": "TRAK", "dtrak": "D-TRAK", "clip": "CLIP cosine",
           "pixel": "pixel cosine"}
DEFAULT_METHODS = ["influence", "trak", "dtrak", "pixel"]

st.title("Compare methods")
run = current_run()
require_model(run)
ds = dataset(run)
names = run.sample_names()
if not names:
    st.info("This run has no samples yet: draw some on the **Sample** page.")
    st.stop()

a, b = st.columns([1, 2])
with a:
    default_set = "queries" if "queries" in names else names[0]
    check_choice("c_set", names, default_set, what="sample set")
    qset = st.selectbox("Sample set", names, index=names.index(default_set), key="c_set", bind="query-params")
n_q = len(samples(run, qset)["images"])
with b:
    default_q = list(range(min(4, n_q)))
    check_choice("c_q", list(range(n_q)), default_q, multi=True, what="query index")
    queries = st.multiselect(f"Queries (indices in {qset!r})", list(range(n_q)), default=default_q, key="c_q",
                             bind="query-params")
a, b = st.columns([2, 1])
with a:
    check_choice("c_m", list(METHODS), DEFAULT_METHODS, multi=True, what="method")
    methods = st.multiselect("Methods", list(METHODS), default=DEFAULT_METHODS, key="c_m", bind="query-params",
                             help=" · ".join(f"{k}: {v}" for k, v in METHODS.items()))
with b:
    check_range("c_k", 1, 32, 10, cast=int, what="k")
    k = st.slider("k (top-k overlap, gallery length)", 1, 32, 10, key="c_k", bind="query-params")
settings = influence_settings("c", run.schedule().T)
st.caption("K-FAC influence: " + describe(settings))
if not queries or len(methods) < 1:
    st.info("Pick at least one query and one method.")
    st.stop()
queries = sorted(int(q) for q in queries)

fp = model_fingerprint(run)
scores = method_scores(run, {m: METHODS[m] for m in methods}, settings, qset, queries, "c")

if len(scores) >= 2:
    names_m, overlap, corr = comparison_matrices(scores, int(k))
    labels = [METHODS[m] for m in names_m]
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
    check_choice("c_g", queries, queries[0], what="gallery query")
    qg = st.selectbox("Query", queries, format_func=str, key="c_g", bind="query-params",
                      help=f"index in sample set {qset!r}")
    qi = queries.index(qg)
    image_grid(samples(run, qset)["images"][qg:qg + 1], [f"query {qset}[{qg}]"], columns=1, size=96)
    rows = []
    for m, s in scores.items():
        top = top_k_simple(s[qi], int(k))
        rows += gallery_rows(m, top, ds)
        st.markdown(f"**{METHODS[m]}** — ranks 1…{k}")
        items = top["positive"]
        image_grid(ds.images[[i for i, _ in items]],
                   [f"{r} · {ds.label_name(int(ds.labels[i]))} · {v:.3g}" for r, (i, v) in enumerate(items, 1)],
                   columns=min(int(k), 10), size=80)
    st.download_button("Aligned galleries (CSV)", export_csv(rows, {"run": str(run.path), "model": fp, "query_set": qset,
                       "query": int(qg), "k": int(k), "influence": settings}), "compare.csv", "text/csv")
