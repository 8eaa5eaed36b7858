"""URL parameters of bound widgets: say when one is invalid and which value is used instead.

Streamlit ignores an invalid value of a ``bind="query-params"`` widget without a word (a
selectbox, select_slider, slider or number_input falls back to its default; a multiselect keeps
the valid entries). Call a ``check_*`` function just BEFORE creating the widget, with the same
key, options, format and default as the widget::

    from app_pages._url import check_choice, check_range

    check_choice("a_m", list(MEASURE_LABELS), "loss", what="measurement")
    measurement = st.selectbox("Measurement", list(MEASURE_LABELS), key="a_m", bind="query-params")
    check_choice("a_q", list(range(n_q)), default_q, what="query index")
    check_choice("a_d", log_damping_options(), 1e-8, format_func=lambda v: f"{v:.1e}", what="damping")
    check_range("a_t", 0, T - 1, 499, cast=int, what="timestep")
    check_choice("c_m", list(METHODS), ["kfac"], multi=True, what="method")

An invalid value shows ``st.warning("URL parameter a_d=-1 is not a valid damping (expected one of
1.0e-12, …); using 1.0e-08 instead.")`` where the call is, and the warning stays on later reruns
until that widget's value changes (Streamlit removes the bad value from the URL at once).
``format_func`` must be the widget's: Streamlit matches URL values against formatted options.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import streamlit as st

_STATE = "_url_warnings"  # session_state: {key: {"message", "used"}}


def _short(items: Sequence[str], limit: int = 8) -> str:
    items = list(items)
    return ", ".join(items) if len(items) <= limit else ", ".join(items[:4] + ["…"] + items[-2:])


def _formatted(value: Any, format_func: Callable, multi: bool) -> list[str]:
    if multi:
        return [format_func(v) for v in (value or [])]
    return [] if value is None else [format_func(value)]


def _show(key: str, current: list[str], fresh: bool) -> Optional[str]:
    """Show (and keep) the recorded warning of ``key`` while the widget still has the fallback value
    (``fresh``: recorded in this run, before the widget has a value)."""
    rec = st.session_state.get(_STATE, {}).get(key)
    if rec is None:
        return None
    if not fresh and rec["used"] != current:
        st.session_state[_STATE].pop(key, None)
        return None
    st.warning(rec["message"], icon=":material/link_off:")
    return rec["message"]


def _record(key: str, message: str, used: list[str]) -> None:
    st.session_state.setdefault(_STATE, {})[key] = {"message": message, "used": used}


def _describe_used(used: list[str], multi: bool) -> str:
    if multi:
        return "[" + ", ".join(used) + "]" if used else "none"
    return used[0] if used else "none"


def check_choice(key: str, options: Sequence, default: Any, *, format_func: Callable[[Any], str] = str,
                 multi: bool = False, what: str = "value") -> Optional[str]:
    """Warn when ``?key=`` holds a value that is not one of ``options`` (formatted with
    ``format_func``). ``default``: the widget's default (a list when ``multi``). Returns the
    warning shown, if any."""
    formatted = [format_func(o) for o in options]
    raw = [v for v in st.query_params.get_all(key) if v != ""]  # "?key=" clears a multiselect: valid
    bad = [v for v in raw if v not in formatted]
    if bad:
        if multi:
            valid = [v for v in raw if v in formatted]
            used = list(dict.fromkeys(valid)) or _formatted(default, format_func, True)
        else:
            used = _formatted(st.session_state.get(key, default), format_func, False)
        shown = "&".join(f"{key}={v}" for v in bad)
        _record(key, f"URL parameter `{shown}` is not a valid {what} (expected one of {_short(formatted)}); "
                     f"using `{_describe_used(used, multi)}` instead.", used)
    current = st.session_state.get(key, default)
    return _show(key, _formatted(current, format_func, multi), fresh=bool(bad))


def check_range(key: str, lo: float, hi: float, default: float, *, cast: Callable[[str], Any] = float,
                what: str = "value") -> Optional[str]:
    """Warn when ``?key=`` is not a number ``cast`` accepts in ``[lo, hi]`` (slider, number_input)."""
    raw = [v for v in st.query_params.get_all(key) if v != ""][-1:]
    bad = False
    if raw:
        try:
            ok = lo <= cast(raw[0]) <= hi
        except (TypeError, ValueError):
            ok = False
        if not ok:
            bad = True
            used = [str(st.session_state.get(key, default))]
            kind = "whole number" if cast is int else "number"
            _record(key, f"URL parameter `{key}={raw[0]}` is not a valid {what} (expected a {kind} from {lo} to "
                         f"{hi}); using `{used[0]}` instead.", used)
    return _show(key, [str(st.session_state.get(key, default))], fresh=bad)
