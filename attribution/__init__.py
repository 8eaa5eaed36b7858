"""Data attribution for diffusion models (K-FAC influence functions and baselines).

The library never imports streamlit; the app in ``app.py`` / ``pages/`` calls into it.
"""

__version__ = "0.1.0"
