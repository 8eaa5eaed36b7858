"""Model & data: the run's training set, training curve and samples; sample more; train a new model."""

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from attribution import jobs
from attribution.runs import default_runs_root
from app_pages._common import (current_run, dataset, device_name, ensure_job, image_grid, samples,
                           user_errors)
from app_pages._url import check_choice, check_range

st.title("Model & data")
st.markdown(
    "**Which training images made the model generate this image?** This app answers that for a small diffusion "
    "model: pick a generated sample on **Attribute** and see the training images ranked by their influence score τ.  \n"
    "**τ > 0** (a *proponent*): without that training image the model would fit the sample worse, so it helped "
    "produce it; **τ < 0** (an *opponent*): without it the model would fit the sample better; τ near 0: no effect.  \n"
    "**Is it right?** **LDS diagnostics** checks the scores against models actually retrained without those images, "
    "and regenerates the sample without its top proponents: the more it changes, the better the attribution.")
run = current_run()
cfg = run.config
ds = dataset(run)

c1, c2, c3, c4 = st.columns(4)
c1.metric("Training images", len(ds))
c2.metric("Resolution", f"{ds.resolution}×{ds.resolution}×{ds.channels}")
c3.metric("Preset", cfg.get("train", {}).get("preset", "?"))
c4.metric("Device", device_name())
if not run.has_model():
    st.warning("This run has no trained model yet (training may still be running).")

# ----------------------------------------------------------------------------- dataset browser
st.subheader("Training set")
labels = sorted(set(int(l) for l in ds.labels))
check_choice("md_labels", labels, [], format_func=ds.label_name, multi=True, what="label")
pick = st.multiselect("Labels", labels, format_func=ds.label_name, key="md_labels", bind="query-params",
                      help="show only these labels (empty = all)")
index = np.flatnonzero(np.isin(ds.labels, pick)) if pick else np.arange(len(ds))
per_page = 32
pages = max(1, -(-len(index) // per_page))
check_range("md_page", 1, pages, 1, cast=int, what="page")
page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="md_page", bind="query-params")
shown = index[(page - 1) * per_page: page * per_page]
st.caption("Under each image: #its position in the training set (the index the scores use) · id: its index in "
           "the source dataset · its label.")
image_grid(ds.images[shown], [f"#{i} · id {ds.ids[i].split(':')[-1]} · {ds.label_name(int(ds.labels[i]))}" for i in shown],
           columns=8, size=72)

# ----------------------------------------------------------------------------- training curve
st.subheader("Training curve")
curve = run.loss_curve()
if curve:
    fig = go.Figure(go.Scatter(x=[r["step"] for r in curve], y=[r["loss"] for r in curve], mode="lines",
                               name="loss"))
    fig.update_layout(xaxis_title="step", yaxis_title="training loss (MSE, mean over pixels)",
                      yaxis_type="log", height=300, margin=dict(t=10, b=10))
    st.plotly_chart(fig, width="stretch")
else:
    st.info("No training curve recorded for this run.")

# ----------------------------------------------------------------------------- samples
st.subheader("Samples")
names = run.sample_names()
if names:
    check_choice("md_set", names, names[0], what="sample set")
    name = st.selectbox("Sample set", names, key="md_set", bind="query-params")
    with user_errors():
        s = samples(run, name)
        meta = s["meta"]
        st.caption(f"{len(s['images'])} samples · seed {meta.get('seed', '?')} · drawn on {meta.get('device', '?')}"
                   + (" · with trajectories" if s["has_trajectory"] else ""))
        image_grid(s["images"][:32], [f"{name}[{i}]" for i in range(min(32, len(s["images"])))], columns=8, size=72)
else:
    st.info("No samples yet.")

if run.has_model():
    with st.form("sample_more"):
        st.markdown(f"**Sample more** (on {device_name()})")
        a, b = st.columns(2)
        n = a.number_input("Number of samples", 1, 1024, 8, key="md_n")
        seed = b.number_input("Seed", 0, 2**31 - 1, len(names), key="md_seed")
        go_sample = st.form_submit_button("Sample more")
    if go_sample:
        st.session_state["md_sample_args"] = {"n": int(n), "seed": int(seed), "trajectory": False,
                                              "name": f"seed{int(seed)}_n{int(n)}"}
    if "md_sample_args" in st.session_state:
        state, _ = ensure_job(run, "sample", st.session_state["md_sample_args"], "sampling", wait_s=1.0)
        if state and state["status"] == "done":
            st.success(f"Saved sample set {state['result']['name']!r} (drawn on {state['result']['device']}).")

# ----------------------------------------------------------------------------- train a new model
st.subheader("Train a new model")
with st.form("train_new"):
    a, b, c = st.columns(3)
    out_name = a.text_input("Run name", "my-run", key="md_out")
    limit = b.number_input("Training images (MNIST digits)", 8, 5000, 256, key="md_limit")
    resolution = c.selectbox("Resolution", [8, 16, 28], index=1, key="md_res")
    a, b, c = st.columns(3)
    preset = a.selectbox("U-Net preset", ["tiny", "micro", "small"], key="md_preset")
    steps = b.number_input("Steps", 10, 100_000, 2000, key="md_steps")
    tseed = c.number_input("Training seed", 0, 2**31 - 1, 0, key="md_tseed")
    go_train = st.form_submit_button("Train in the background")
root = default_runs_root()
if go_train:
    safe = "".join(ch for ch in out_name if ch.isalnum() or ch in "-_")
    if not safe or safe != out_name:
        st.error("Run name: use letters, digits, '-' and '_' only (it becomes a folder name).")
    else:
        st.session_state["md_train_args"] = {
            "dataset": {"source": "mnist5k", "limit": int(limit), "resolution": int(resolution)},
            "train": {"preset": preset, "steps": int(steps), "seed": int(tseed), "batch_size": 32,
                      "checkpoint_every": max(10, min(250, int(steps) // 4))},
        }
        st.session_state["md_train_out"] = str(root / safe)
if "md_train_args" in st.session_state:
    out = Path(st.session_state["md_train_out"])
    st.caption(f"Output: `{out}` (the run appears in the sidebar picker once its config is written)")
    jid = jobs.job_id("train", st.session_state["md_train_args"])
    with user_errors():
        from attribution.runs import Run

        state, _ = ensure_job(Run(out), "train", st.session_state["md_train_args"], "training", wait_s=0.5)
        if state and state["status"] == "done":
            st.success(f"Trained {out} (final loss {state['result'].get('final_loss') or float('nan'):.4f}).")
