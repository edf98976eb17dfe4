"""Line plots for the paradigm report, drawn with matplotlib's Agg canvas straight into memory.

`line_panels` draws side-by-side panels of named series (the training curves; the over-optimisation
plot) and returns a PIL image; nothing touches pyplot's global state or the disk.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass
class Series:
    """One line: `label` in the legend, points (x[i], y[i]) joined in the order given; with `lower`
    and `upper` (one value per point, e.g. a 95% interval) a shaded band is drawn between them (an error
    bar for a single point)."""

    label: str
    x: list[float]
    y: list[float]
    colour: str | None = None  # a matplotlib colour ("C3", "#1f77b4"); None takes the next in the cycle
    marker: str = "o"  # matplotlib marker drawn at every point ("" for none)
    lower: list[float] | None = None
    upper: list[float] | None = None


@dataclass
class Panel:
    """One set of axes: a title, the axis labels and its series (an empty panel is drawn empty);
    `references` are labelled horizontal lines (a baseline, a target), `xscale` is "linear" or "log"."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    references: list[tuple[float, str]] = field(default_factory=list)
    xscale: str = "linear"


def _spread_ticks(values: list[float], ratio: float = 1.5) -> list[float]:
    """The sorted `values` thinned so that each kept tick is at least `ratio` times the one before
    (on a log axis, labels of nearby values such as 240 and 256 would overlap)."""
    kept: list[float] = []
    for value in values:
        if not kept or value >= ratio * kept[-1]:
            kept.append(value)
    return kept


def line_panels(
    panels: Sequence[Panel], panel_size: tuple[float, float] = (4.6, 3.4), dpi: int = 100
) -> Image.Image:
    """Draw `panels` side by side (one row) and return the figure as an RGB PIL image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("line_panels needs at least one panel")
    for panel in panels:
        for series in panel.series:
            if len(series.x) != len(series.y):
                raise ValueError(
                    f"series {series.label!r} of panel {panel.title!r}: {len(series.x)} x values "
                    f"but {len(series.y)} y values"
                )
            if (series.lower is None) != (series.upper is None):
                raise ValueError(f"series {series.label!r} of panel {panel.title!r}: lower without upper")
            for name in ("lower", "upper"):
                band = getattr(series, name)
                if band is not None and len(band) != len(series.x):
                    raise ValueError(
                        f"series {series.label!r} of panel {panel.title!r}: {len(band)} {name} values "
                        f"for {len(series.x)} points"
                    )
    width, height = panel_size
    figure = Figure(figsize=(width * len(panels), height), dpi=dpi)
    FigureCanvasAgg(figure)  # attaches the Agg canvas: no GUI backend, no pyplot figure registry
    for k, panel in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), k + 1)
        for series in panel.series:
            (line,) = axes.plot(  # a NaN (a diverged step) leaves a gap in the line
                series.x,
                series.y,
                marker=series.marker or None,
                markersize=3,
                color=series.colour,
                label=series.label,
            )
            if series.lower is not None and len(series.x) == 1:  # a band needs two points: an error bar
                below, above = series.y[0] - series.lower[0], series.upper[0] - series.y[0]
                axes.errorbar(series.x, series.y, yerr=[[below], [above]], color=line.get_color(), capsize=3)
            elif series.lower is not None:
                axes.fill_between(series.x, series.lower, series.upper, color=line.get_color(), alpha=0.15)
        for k_ref, (value, label) in enumerate(panel.references):
            axes.axhline(value, color="0.4", linestyle=("--", ":", "-.")[k_ref % 3], linewidth=1, label=label)
        axes.set_xscale(panel.xscale)
        if panel.xscale == "log":  # ticks at the data's own x values ("2,000"), not powers of ten
            ticks = _spread_ticks(sorted({x for series in panel.series for x in series.x if x > 0}))
            if ticks:
                axes.minorticks_off()
                axes.set_xticks(ticks, [f"{t:,.0f}" if t >= 1 else f"{t:g}" for t in ticks])
        axes.set_title(panel.title, fontsize=10)
        axes.set_xlabel(panel.xlabel)
        axes.set_ylabel(panel.ylabel)
        axes.grid(alpha=0.3)
        if panel.series or panel.references:
            axes.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    image = Image.open(io.BytesIO(buffer.getvalue()))
    return image.convert("RGB")


def save_figure(image: Image.Image, path: Path) -> Path:
    """Write a figure of `line_panels` to `path` (parent folders created), say so, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    print(f"wrote {path}")
    return path
