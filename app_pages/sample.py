"""Sample: draw new samples (optionally with trajectories); pick queries; upload a query image."""

import streamlit as st

from attribution.app_state import UPLOAD_TYPES, save_upload, validate_upload
from app_pages._common import (current_run, dataset, device_name, ensure_job, image_grid, require_model,
                           samples, user_errors)
from app_pages._url import check_choice

st.title("Sample")
run = current_run()
require_model(run)
ds = dataset(run)

# ----------------------------------------------------------------------------- draw samples
st.subheader("Draw samples")
st.caption(f"Ancestral sampling, T = {run.schedule().T} steps, on **{device_name()}**.")
with st.form("draw"):
    a, b, c, d = st.columns(4)
    n = a.number_input("Number of samples", 1, 1024, 8, key="s_n")
    seed = b.number_input("Seed", 0, 2**31 - 1, 1, key="s_seed")
    batch = c.number_input("Batch size", 1, 1024, 64, key="s_batch")
    keep = d.checkbox("Keep trajectories", True, key="s_traj",
                      help="needed for the trajectory measurement ([T+1, n, C, H, W] floats)")
    name = st.text_input("Save as sample set", "", key="s_name", placeholder=f"seed{int(seed)}_n{int(n)}")
    submitted = st.form_submit_button("Draw")
if submitted:
    set_name = name.strip() or f"seed{int(seed)}_n{int(n)}"
    if not all(ch.isalnum() or ch in "-_" for ch in set_name):
        st.error("Sample set name: use letters, digits, '-' and '_' only.")
    else:
        st.session_state["s_args"] = {"n": int(n), "seed": int(seed), "batch_size": int(batch),
                                      "trajectory": bool(keep), "name": set_name}
if "s_args" in st.session_state:
    state, _ = ensure_job(run, "sample", st.session_state["s_args"], "sampling", wait_s=1.0)
    if state and state["status"] == "done":
        st.success(f"Saved sample set {state['result']['name']!r} ({state['result']['n']} samples, "
                   f"drawn on {state['result']['device']}).")

# ----------------------------------------------------------------------------- pick queries
st.subheader("Queries")
names = run.sample_names()
if not names:
    st.info("No sample sets yet: draw some above, or upload an image below.")
else:
    default_set = "queries" if "queries" in names else names[0]
    check_choice("s_qset", names, default_set, what="sample set")
    qset = st.selectbox("Sample set", names, key="s_qset", index=names.index(default_set), bind="query-params")
    with user_errors():
        s = samples(run, qset)
        n_set = len(s["images"])
        check_choice("s_qidx", list(range(n_set)), [0], multi=True, what="query index")
        picked = st.multiselect(f"Queries to attribute (indices in {qset!r})", list(range(n_set)), default=[0],
                                key="s_qidx", bind="query-params")
        image_grid(s["images"], [f"{qset}[{i}]" + (" ✓" if i in picked else "") for i in range(n_set)],
                   columns=8, size=72)
        if st.button("Use these queries", key="s_use", disabled=not picked):
            st.session_state["queries"] = {"set": qset, "indices": [int(i) for i in picked]}
        if st.session_state.get("queries"):
            q = st.session_state["queries"]
            st.caption(f"Current queries: {q['set']}{q['indices']} — open **Attribute** or **Compare**.")

# ----------------------------------------------------------------------------- upload
st.subheader("Upload a query image")
st.caption(f"A square {'greyscale' if ds.channels == 1 else 'RGB'} image ({', '.join(UPLOAD_TYPES)}, "
           f"at most 5 MB and 2048 px on a side); it is resized to {ds.resolution}×{ds.resolution}. Without a "
           "trajectory, the trajectory measurement and regeneration are not available for it. Uploads are kept "
           "in the run's samples/ folder (git ignores them).")
up = st.file_uploader("Image", type=list(UPLOAD_TYPES), key="s_upload")
if up is not None:
    with user_errors():
        image = validate_upload(up.getvalue(), up.name, ds.channels, ds.resolution)
        set_name = save_upload(run, image, up.name)
        st.session_state["queries"] = {"set": set_name, "indices": [0]}
        image_grid(image, [f"{up.name} → {set_name}[0]"], columns=8, size=96)
        st.success(f"Saved as sample set {set_name!r}; it is now the current query.")
