"""Words for the Attribute page (no streamlit): measurement names, the sign legend that follows
the measurement, gallery captions and their key, what a build computes and why, and labels of
settings and Hessian variants (shown to other sessions and in progress lines)."""

from __future__ import annotations

import math
from typing import Optional

MEASURE_LABELS = {"loss": "loss", "lt": "l_t (one timestep)", "elbo": "ELBO", "elbo-simple": "simplified ELBO",
                  "trajectory": "trajectory log-prob", "square-norm": "square norm (D-TRAK)"}
METHOD_LABELS = {"kfac": "K-FAC", "ekfac": "EK-FAC"}
FISHER_LABELS = {"mc": "MC Fisher", "empirical": "empirical Fisher"}
VARIANTS = [(m, f, k) for m in ("kfac", "ekfac") for f in ("mc", "empirical") for k in ("expand", "reduce")]

CAPTION_KEY = ("Captions: rank · training id · label · τ (influence score) · ✓ when the image stays in the top-k "
               "within its 90% rank interval (a robust proponent / opponent, not a lucky draw)")
BASELINE_CAPTION_KEY = "Captions: rank · training id · label · similarity (or TRAK score)"

# What each measurement is, as the quantity tau explains; all are oriented like a loss (lower =
# the model finds the query more likely), see attribution/measurements.py.
_QUANTITY = {
    "loss": "the query's diffusion loss",
    "lt": "the query's diffusion loss at timestep t",
    "elbo": ("the negative ELBO of the query (in nats; an upper bound on −log p(query), so it is "
             "attributed as a loss-like quantity: lower = more likely)"),
    "elbo-simple": "the simplified negative ELBO of the query (weighted denoising errors; loss-like)",
    "trajectory": ("the negative log-density of the query's sampling trajectory (loss-like: lower = the "
                   "model is more likely to take that path)"),
    "square-norm": "D-TRAK's squared norm of the predicted noise (not a likelihood; a proxy D-TRAK uses)",
}


def measurement_name(measurement: str) -> str:
    """``"lt:499"`` -> ``"lt"`` (the key of :data:`MEASURE_LABELS`)."""
    return str(measurement).split(":")[0]


def sign_legend(measurement: str) -> str:
    """The sign convention of method.md §2 in the words of this measurement."""
    name = measurement_name(measurement)
    quantity = _QUANTITY.get(name, f"the {name}")
    if name == "square-norm":
        return (f"τ explains {quantity}. τ > 0: removing the training image is predicted to increase it; "
                "τ < 0: to decrease it · neutral: |τ| smallest.")
    return (f"τ explains {quantity}. τ > 0: removing the training image is predicted to increase it, i.e. "
            "the image helped the model generate the query (a proponent) · τ < 0: removing it is predicted "
            "to lower it (an opponent) · neutral: |τ| smallest.")


def default_approx(measurement: str) -> str:
    """The approximation measurement a page starts from: the loss for the ELBO (paper Fig. 2b),
    else the attributed measurement itself ("same")."""
    return "loss" if measurement_name(measurement) == "elbo" else "same"


def approx_note(measurement: str, approx: str) -> Optional[str]:
    """One line on why the approximation uses another measurement's gradient (or None)."""
    if measurement_name(measurement) == "elbo" and approx == "loss":
        return ("The ELBO is explained with the loss's gradient: in the paper (Fig. 2b) that predicts how "
                "retraining changes the ELBO better than the ELBO's own, much noisier gradient.")
    if approx not in ("same", measurement_name(measurement)):
        return (f"The {MEASURE_LABELS.get(approx, approx)}'s gradient stands in for the "
                f"{MEASURE_LABELS.get(measurement_name(measurement), measurement)}'s (measurement substitution).")
    return None


def variant_label(method: str, fisher: str, kfac_type: str) -> str:
    """``"EK-FAC · empirical Fisher · reduce"``."""
    return f"{METHOD_LABELS.get(method, method)} · {FISHER_LABELS.get(fisher, fisher)} · {kfac_type}"


def settings_label(settings: dict, query_set: str, query: int) -> str:
    """Everything that decides a gallery, in words (also shown to other sessions)."""
    m = settings.get("measurement", "loss")
    approx = settings.get("approx_measurement")
    text = (f"{variant_label(settings.get('method', 'kfac'), settings.get('fisher', 'mc'), settings.get('kfac_type', 'expand'))}"
            f" · damping {float(settings.get('damping', 0)):.0e} · {MEASURE_LABELS.get(measurement_name(m), m)}"
            + (f" at t = {m.split(':')[1]}" if ":" in str(m) else ""))
    if approx:
        text += f" (via the {MEASURE_LABELS.get(measurement_name(approx), approx)}'s gradient)"
    return text + f" · query {query_set}[{query}]"


def format_score(v: float) -> str:
    """Short signed score, at most 7 characters: ``+3.1e-6``, ``-0.042``, ``+153``, ``+4.0e3``."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    a = abs(v)
    if 1 <= a < 1000:
        return f"{v:+.0f}" if a >= 100 else f"{v:+.2g}" if a < 10 else f"{v:+.0f}"
    if 1e-3 <= a < 1:
        return f"{v:+.2g}"
    mant, exp = f"{v:+.1e}".split("e")
    return f"{mant}e{int(exp)}"


def caption(rank: int, train_id: str, label: str, score: float, tau: bool = True) -> str:
    """``"#1 · 1234 · 7 · τ+3.1e-6"``: short tokens joined by " · " (the only places a caption may
    wrap), so no token breaks at a narrow width."""
    short_id = str(train_id).split(":")[-1]
    return f"#{rank} · {short_id} · {label} · {'τ' if tau else ''}{format_score(float(score))}"


def build_summary(have: dict, settings: dict, n_train: Optional[int], query_set: str, query: int) -> Optional[str]:
    """What must be computed before these settings can be scored, and why, in plain words
    (``have``: ``influence_status``'s dict; None when nothing is missing)."""
    m = settings.get("approx_measurement") or settings.get("measurement", "loss")
    n = f"{n_train:,} " if n_train else ""
    parts = []
    if have.get("store") is False:
        parts.append(f"the gradients of the {n}training images ({settings.get('train_draws')} noise draws each; "
                     "computed once, shared by every Hessian, damping and measurement)")
    if have.get("factors") is False:
        parts.append(f"the {variant_label(settings.get('method', 'kfac'), settings.get('fisher', 'mc'), settings.get('kfac_type', 'expand'))} "
                     "curvature of the training loss (once per Hessian variant)")
    if have.get("query_gradients") is False:
        parts.append(f"the gradient of the {MEASURE_LABELS.get(measurement_name(m), m)} for query "
                     f"{query_set}[{query}] ({settings.get('query_draws')} noise draws)")
    others = [k for k, v in have.items() if v is False and k not in ("store", "factors", "query_gradients")]
    parts += [k.replace("_", " ") for k in others]
    if not parts:
        return None
    return ("First computing " + "; ".join(parts) + ". Once saved, a new damping re-scores in about a "
            "second; a new query or measurement needs only its own query gradient (seconds).")
