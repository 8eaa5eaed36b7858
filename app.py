"""Streamlit entry point: page config, the run picker (sidebar) and the page navigation.

Pages live in app_pages/, not pages/: a folder named pages/ next to the entry script switches
Streamlit into its legacy multipage mode until st.navigation has run once, so a shared deep link
opened as a fresh server's first request would run the page without this script.

Environment: ``ATTRIBUTION_RUN`` pins a run directory at the top of the picker; ``ATTRIBUTION_RUNS``
is the folder of runs (default ``./runs``); the shipped demo run ``demo/run`` comes first otherwise.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import streamlit as st  # noqa: E402

from app_pages._common import run_picker  # noqa: E402
from attribution.ddpm import unet_class  # noqa: E402

# Sessions are threads of one server: resolve diffusers' lazy names once, behind its lock, before
# any page or background job imports from it (its lazy import is not thread-safe).
unet_class()

st.set_page_config(page_title="Diffusion data attribution", page_icon=":material/image_search:", layout="wide")
run_picker()
st.navigation([
    st.Page("app_pages/model_data.py", title="Model & data", icon=":material/dataset:", default=True, url_path="model"),
    st.Page("app_pages/sample.py", title="Sample", icon=":material/casino:", url_path="sample"),
    st.Page("app_pages/attribute.py", title="Attribute", icon=":material/image_search:", url_path="attribute"),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/compare:", url_path="compare"),
    st.Page("app_pages/lds.py", title="LDS diagnostics", icon=":material/monitoring:", url_path="lds"),
]).run()
