"""Line plots as PNG files that `dvc plots show` embeds as images: its Vega plots load their library from a CDN and
stay blank offline, an image does not.

The bytes depend on the numbers alone: a fixed size and dpi, no software-version text chunk (matplotlib writes
its version into every PNG by default) and no timestamp, so an output that reruns to the same numbers is
byte-identical and DVC sees no change. Plot only computed series here, never measured time.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.artifacts import atomic_write

SIZE_IN, DPI = (6.4, 4.0), 100  # 640 x 400 px
PNG_METADATA = {"Software": None}  # None drops matplotlib's default "Software: Matplotlib version ..." chunk


def line_plot(
    path: str | Path, x: list, series: dict[str, list], title: str, xlabel: str, ylabel: str, empty: str = "no points"
) -> Path:
    """Write `path`: one line per entry of `series` (label -> y values, aligned with `x`; None is a gap), or the
    text `empty` when there is no x."""
    fig = Figure(figsize=SIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no pyplot state shared between calls
    ax = fig.subplots()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if x:
        for label, ys in series.items():
            ax.plot(x, [math.nan if y is None else float(y) for y in ys], marker="o", markersize=3, label=label)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    else:
        ax.set(xticks=[], yticks=[])  # no numbers on an axis without data
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata=PNG_METADATA))
