"""LDS diagnostics: LDS per method, damping sweeps, predicted vs actual, cross-LDS, stability."""

import streamlit as st

from pages._common import available, current_run, require_model

st.title("LDS diagnostics")
run = current_run()
require_model(run)
if not available("evaluation"):
    st.info("The evaluation module (attribution/evaluation.py) is not available yet.")
    st.stop()
