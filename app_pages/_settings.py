"""The K-FAC influence settings as URL-bound widgets, shared by the Compare and LDS pages.

Each page binds them under its own prefix (``?c_h=ekfac&c_d=1.0e-03`` on Compare, ``?l_…`` on
LDS), so a link reproduces the scores shown. When the URL does not set one, it starts from the
Attribute page's current settings (``session_state["attr_settings"]``), else from the defaults.
Option values are the CLI's names (``attribution attribute --method/--fisher/--kfac-type``).
"""

from __future__ import annotations

from typing import Optional

import streamlit as st

from attribution.app_state import log_damping_options
from app_pages._url import check_choice, check_range

MEASURE_LABELS = {"loss": "loss", "lt": "l_t (one timestep)", "elbo": "ELBO", "elbo-simple": "simplified ELBO",
                  "trajectory": "trajectory log-prob", "square-norm": "square norm (D-TRAK)"}
DEFAULTS = dict(method="kfac", fisher="mc", kfac_type="expand", damping=1e-8, measurement="loss",
                approx_measurement=None, train_draws=32, query_draws=64, seed=0)
DEFAULT_T = 499


def _fmt_damping(v: float) -> str:
    return f"{v:.1e}"


def _seed(key: str, value) -> None:
    """Start a bound widget from the Attribute page's value unless the URL or the session has one."""
    if key not in st.session_state and not st.query_params.get_all(key):
        st.session_state[key] = value


def _split(text: Optional[str]) -> tuple[Optional[str], Optional[int]]:
    if text is None:
        return None, None
    if text.startswith("lt:"):
        return "lt", int(text[3:])
    return text, None


def influence_settings(prefix: str, T: int, with_measurement: bool = True,
                       label: str = "K-FAC influence settings (start from the Attribute page's; part of the link)") -> dict:
    """Widgets for the influence settings in an expander (keys ``{prefix}_h, _f, _kt, _d, _im, _it,
    _am, _at``); returns the settings dict of ``attribution.influence.InfluenceSettings``.

    ``with_measurement=False``: the page sets the attributed measurement itself (LDS: the true one).
    """
    src = {**DEFAULTS, **(st.session_state.get("attr_settings") or {})}
    m_name, m_t = _split(src["measurement"])
    am_name, am_t = _split(src.get("approx_measurement"))
    damping_opts = log_damping_options()
    seeds = {"_h": src["method"], "_f": src["fisher"], "_kt": src["kfac_type"], "_am": am_name or "same"}
    if float(src["damping"]) in damping_opts:
        seeds["_d"] = float(src["damping"])
    if with_measurement and m_name in MEASURE_LABELS:
        seeds["_im"] = m_name
        if m_t is not None:
            seeds["_it"] = m_t
    if am_t is not None:
        seeds["_at"] = am_t
    for suffix, value in seeds.items():
        _seed(prefix + suffix, value)

    k = lambda s: prefix + s  # noqa: E731
    # the URL checks first, outside the (collapsed) expander, so that their warnings are seen
    measure_opts, approx_opts = list(MEASURE_LABELS), ["same"] + list(MEASURE_LABELS)
    warned = [check_choice(k("_h"), ["kfac", "ekfac"], "kfac", what="Hessian"),
              check_choice(k("_f"), ["mc", "empirical"], "mc", what="curvature"),
              check_choice(k("_kt"), ["expand", "reduce"], "expand", what="K-FAC weight sharing"),
              check_choice(k("_d"), damping_opts, 1e-8, format_func=_fmt_damping, what="damping"),
              check_choice(k("_am"), approx_opts, "same", what="approximation measurement"),
              check_range(k("_at"), 0, T - 1, DEFAULT_T, cast=int, what="timestep")]
    if with_measurement:
        warned += [check_choice(k("_im"), measure_opts, "loss", what="measurement"),
                   check_range(k("_it"), 0, T - 1, DEFAULT_T, cast=int, what="timestep")]
    box = st.expander(label, expanded=any(warned))
    c1, c2, c3, c4 = box.columns(4)
    with c1:
        method = st.radio("Hessian", ["kfac", "ekfac"], key=k("_h"), bind="query-params", horizontal=True,
                          help="kfac: K-FAC · ekfac: EK-FAC (K-FAC eigenbasis, re-fitted eigenvalues)")
        fisher = st.radio("Curvature", ["mc", "empirical"], key=k("_f"), bind="query-params", horizontal=True,
                          help="mc: MC-Fisher = GGN (the paper's) · empirical: empirical Fisher")
    with c2:
        kfac_type = st.radio("K-FAC weight sharing", ["expand", "reduce"], key=k("_kt"), bind="query-params",
                             horizontal=True)
        damping = st.select_slider("Damping λ (log scale)", damping_opts, value=1e-8, key=k("_d"),
                                   bind="query-params", format_func=_fmt_damping)
    measurement = DEFAULTS["measurement"]
    with c3:
        if with_measurement:
            m = st.selectbox("Measurement (attributed)", list(MEASURE_LABELS), key=k("_im"), bind="query-params",
                             help=" · ".join(f"{a}: {b}" for a, b in MEASURE_LABELS.items()))
            measurement = m
            if m == "lt":
                t = st.slider("Timestep t (0-indexed)", 0, T - 1, DEFAULT_T, key=k("_it"), bind="query-params")
                measurement = f"lt:{t}"
    with c4:
        am = st.selectbox("Measurement used in the approximation", approx_opts, key=k("_am"), bind="query-params",
                          help="same = the attributed one; paper Fig. 2b: the loss's gradient predicts the "
                               "ELBO's change better than the ELBO's own")
        approx = None if am == "same" else am
        if am == "lt":
            at = st.slider("Approximation timestep", 0, T - 1, DEFAULT_T, key=k("_at"), bind="query-params")
            approx = f"lt:{at}"
    return dict(method=method, fisher=fisher, kfac_type=kfac_type, damping=float(damping), measurement=measurement,
                approx_measurement=approx, train_draws=int(src["train_draws"]), query_draws=int(src["query_draws"]),
                seed=int(src.get("seed", 0)))


def describe(settings: dict) -> str:
    """One plain line for a caption: "EK-FAC, MC Fisher, expand, damping 1.0e-08, loss"."""
    name = "EK-FAC" if settings["method"] == "ekfac" else "K-FAC"
    fisher = "MC Fisher (GGN)" if settings["fisher"] == "mc" else "empirical Fisher"
    approx = f", gradient of the {settings['approx_measurement']}" if settings.get("approx_measurement") else ""
    return (f"{name}, {fisher}, {settings['kfac_type']}, damping {_fmt_damping(settings['damping'])}, "
            f"attributing the {settings['measurement']}{approx}")
