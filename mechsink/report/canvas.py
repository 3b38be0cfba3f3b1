"""The one way a figure is made: a matplotlib Figure with seaborn styling and no pyplot state."""
from __future__ import annotations

import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, Axes]:
    """A Figure with one seaborn-styled axes on an Agg canvas (no pyplot state)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    with sns.axes_style("whitegrid"):
        ax = fig.add_subplot()
    return fig, ax


def label(ax, title: str | None, xlabel: str | None, ylabel: str | None) -> None:
    """Title and axis labels (None leaves a label as it is)."""
    if title:
        ax.set_title(title)
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
