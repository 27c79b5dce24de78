"""Figures without pyplot: no global backend or figure registry, so the lab's plotting never touches a user's session."""
from __future__ import annotations

from matplotlib.figure import Figure


def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, constrained_layout: bool = False, **kwargs):
    """(fig, axes) as matplotlib.pyplot.subplots returns them, on a standalone Figure (savefig writes files)."""
    fig = Figure(figsize=figsize, layout="constrained" if constrained_layout else None)
    return fig, fig.subplots(nrows, ncols, **kwargs)
