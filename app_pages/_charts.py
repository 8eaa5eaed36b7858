"""Plotly figures shared by the LDS page: bars with error bars whose value labels sit beyond the
error bar (never crossed by it), and a heatmap whose colour range spans the values it shows."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import plotly.graph_objects as go

from attribution.app_state import heat_range


def bars_with_errors(labels: Sequence[str], means: Sequence[float], sems: Sequence[float],
                     yaxis_title: str, colors: Optional[Sequence[str]] = None, title: Optional[str] = None,
                     digits: int = 1, height: int = 360) -> go.Figure:
    """Bars of ``means`` ± ``sems``; each value label is placed just beyond the end of its error bar."""
    sems = [0.0 if s is None or not math.isfinite(s) else float(s) for s in sems]
    ends = [m + s if m >= 0 else m - s for m, s in zip(means, sems)]
    fig = go.Figure(go.Bar(x=list(labels), y=list(means), marker_color=list(colors) if colors else None,
                           error_y=dict(type="data", array=sems, thickness=1.5, width=6),
                           hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=list(labels), y=ends, mode="text", showlegend=False, hoverinfo="skip",
                             text=[f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(means, sems)],
                             textposition=["top center" if m >= 0 else "bottom center" for m in means],
                             cliponaxis=False))
    lo, hi = min([0.0] + ends), max([0.0] + ends)
    pad = 0.15 * (hi - lo or 1.0)
    fig.update_layout(title=title, yaxis_title=yaxis_title, height=height, showlegend=False,
                      yaxis_range=[lo - (pad if lo < 0 else 0), hi + pad],
                      margin=dict(t=50 if title else 20, b=10))
    return fig


def heatmap(z, x: Sequence[str], y: Sequence[str], xaxis_title: str, yaxis_title: str, colorbar_title: str,
            colorscale: str = "Viridis", height: int = 420) -> go.Figure:
    """A heatmap coloured over the range of its off-diagonal values (see ``app_state.heat_range``)."""
    lo, hi = heat_range(z)
    fig = go.Figure(go.Heatmap(z=z, x=list(x), y=list(y), zmin=lo, zmax=hi, colorscale=colorscale,
                               colorbar=dict(title=colorbar_title),
                               hovertemplate="%{y} vs %{x}: %{z:.4f}<extra></extra>"))
    fig.update_layout(height=height, margin=dict(t=20, b=10), xaxis_title=xaxis_title, yaxis_title=yaxis_title,
                      xaxis=dict(showticklabels=len(x) <= 20), yaxis=dict(showticklabels=len(y) <= 20, autorange="reversed"))
    return fig
