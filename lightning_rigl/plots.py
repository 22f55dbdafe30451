"""Figures of sparse runs, for people rather than loggers. Needs matplotlib (``pip install lightning-rigl[plot]``).

Every figure keeps its legend outside the axes, so no entry covers data however many lines there are. The
``draw_*`` functions return the matplotlib figure (tests read its layout); the ``plot_*`` ones save it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Points further than this many interquartile ranges outside the quartiles are outliers: drawn at the edge of
# the axes with their value, so that one failed run does not flatten every other difference.
_OUTLIER_FENCE = 3.0
_PANEL_SIZE = (4.6, 3.6)  # inches per panel
_MAX_COLUMNS = 3


@dataclass(frozen=True)
class Look:
    """How a line is drawn: colour, marker, line style, and whether its markers are filled."""

    color: str | None = None  # None: the next colour of matplotlib's cycle
    marker: str = "o"
    linestyle: str = "-"
    filled: bool = True


@dataclass
class Line:
    """Points ``(x, y, y error)`` (error 0: none) joined in order, drawn with ``look``.

    Args:
        label: the line's name in a legend built from the lines (when no legend of looks is given).
        notes: text written beside each point ("2x"), or empty.
    """

    points: list[tuple[float, float, float]]
    look: Look = field(default_factory=Look)
    label: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Panel:
    """One axes of a figure.

    Args:
        lines: drawn in order.
        title: above the axes.
        references: label -> y of a horizontal dashed grey line (a dense baseline).
        xticks: position -> label, replacing the automatic ticks (sparsities, layer names).
    """

    lines: list[Line] = field(default_factory=list)
    title: str = ""
    references: dict[str, float] = field(default_factory=dict)
    xticks: dict[float, str] | None = None


def plot_densities(densities: Mapping[str, float], path: str | Path, title: str = "",
                   targets: Mapping[str, float] | None = None) -> Path:
    """A bar chart of each layer's density (fraction of live weights, by layer name), in the mapping's order,
    with each layer's target density (the configuration's) as a black tick where given, saved to ``path``.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    plt = _pyplot()
    names = list(densities)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.3 * len(names) + 2), 4.5), layout="constrained")
    axes.bar(range(len(names)), list(densities.values()), color="tab:blue", label="achieved")
    if targets:
        positions = [i for i, name in enumerate(names) if name in targets]
        axes.scatter(positions, [targets[names[i]] for i in positions], marker="_", s=200, color="black",
                     label="target", zorder=3)
        figure.legend(loc="outside right center", fontsize=8)
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("density (fraction of live weights)")
    axes.set_title(title or "density per layer")
    return save_figure(figure, path)


def draw_panels(panels: Sequence[Panel], *, xlabel: str, ylabel: str, title: str,
                legend: Sequence[tuple[str, Look]] | None = None, xscale: str = "linear", invert_x: bool = False,
                share_y: bool = False, clip_outliers: bool = False, markers: bool = True, dodge: bool = False) -> Any:
    """Panels in a grid of at most four columns, with error bars where a point has an error, and one legend
    outside the axes: of ``legend``'s looks when given (a key to colours, markers and line styles, whatever the
    number of lines), else of the lines' labels.

    Args:
        xscale: "linear" or "log".
        invert_x: larger x to the left (log densities read as sparsity growing to the right).
        share_y: one y range for all panels.
        clip_outliers: y limits from the bulk of the points; a point outside is drawn at the edge of the axes as
            a triangle, with its value written beside it.
        markers: draw the points' markers (lines only when False).
        dodge: spread points of different lines at (nearly) the same x a little apart, in line order, so that
            their error bars stay visible (2.5% of x apart on a log axis, 1.2% of the x range on a linear one).

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    plt = _pyplot()
    columns = len(panels) if len(panels) <= _MAX_COLUMNS else min(_MAX_COLUMNS, math.ceil(math.sqrt(len(panels))))
    columns = max(1, columns if len(panels) != 4 else 2)
    rows = max(1, math.ceil(len(panels) / columns))
    figure, grid = plt.subplots(rows, columns, figsize=(_PANEL_SIZE[0] * columns + 2.5, _PANEL_SIZE[1] * rows + 0.6),
                                layout="constrained", squeeze=False, sharey=share_y)
    limits = [_bulk_limits(panels)] * len(panels) if share_y else [_bulk_limits([panel]) for panel in panels]
    for axes, panel, y_range in zip(grid.flat, panels, limits):
        xs = _dodged_xs(panel.lines, xscale == "log") if dodge else [[p[0] for p in ln.points] for ln in panel.lines]
        _draw_panel(axes, panel, xs, y_range if clip_outliers else None, markers)
        axes.set_xscale(xscale)  # before the ticks: setting the scale resets them
        if xscale == "log":
            _plain_log_ticks(axes)
        if panel.xticks is not None:
            axes.set_xticks(list(panel.xticks), list(panel.xticks.values()),
                            rotation=90 if len(panel.xticks) > 6 else 0, fontsize=7 if len(panel.xticks) > 6 else 8)
            axes.minorticks_off()
        if invert_x:
            axes.invert_xaxis()
        axes.set_xlabel(xlabel, fontsize=9)
        axes.set_ylabel(ylabel, fontsize=9)
        axes.set_title(panel.title, fontsize=10)
        axes.grid(alpha=0.3)
    for axes in list(grid.flat)[len(panels):]:
        axes.set_visible(False)
    if share_y:
        for axes in grid.flat:
            axes.yaxis.set_tick_params(labelleft=True)
    handles, labels = _legend_entries(grid.flat, panels, legend, markers)
    if handles:
        per_column = max(1, int((_PANEL_SIZE[1] * rows) * 72 / 14))  # entries of about 14 points each
        figure.legend(handles, labels, loc="outside right center", fontsize=8,
                      ncols=max(1, math.ceil(len(handles) / per_column)))
    figure.suptitle(title, fontsize=11)
    return figure


def plot_panels(panels: Sequence[Panel], path: str | Path, **options: Any) -> Path:
    """``draw_panels(panels, **options)`` saved to ``path``.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    return save_figure(draw_panels(panels, **options), path)


def draw_heatmap(values: Sequence[Sequence[float]], row_labels: Sequence[str], column_labels: Sequence[str], *,
                 title: str, colorbar_label: str, group_ends: Sequence[int] = ()) -> Any:
    """A grid of values in (0, 1] on a logarithmic colour scale, one row per label, each cell with its value
    written in it when the cells are large enough; a thin white line after each row index in ``group_ends``.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    n_rows, n_columns = len(row_labels), len(column_labels)
    width = min(24.0, 3.5 + 0.9 * n_columns + 0.06 * max((len(label) for label in row_labels), default=0))
    # The column labels stand upright below the cells: room for the longest, so the cells keep 0.25 in a row.
    longest_column = max((len(label) for label in column_labels), default=0)
    figure, axes = plt.subplots(figsize=(width, 1.8 + 0.25 * n_rows + 0.075 * longest_column), layout="constrained")
    positive = [value for row in values for value in row if value > 0 and math.isfinite(value)]
    low = min(positive, default=0.01)
    image = axes.imshow(values, norm=LogNorm(vmin=min(low, 0.99), vmax=1.0), cmap="viridis", aspect="auto",
                        interpolation="nearest")
    axes.set_yticks(range(n_rows), row_labels, fontsize=7)
    axes.set_xticks(range(n_columns), column_labels, rotation=90 if n_columns > 6 else 0, fontsize=7)
    if n_columns <= 16:
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                dark = math.isfinite(value) and value > 0 and math.log(value) < math.log(low) / 2
                axes.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=6,
                          color="white" if dark else "black")
    for end in group_ends:
        axes.axhline(end + 0.5, color="white", linewidth=2)
    figure.colorbar(image, ax=axes, label=colorbar_label, shrink=min(1.0, 12 / max(n_rows, 1)) if n_rows > 12 else 1)
    axes.set_title(title, fontsize=10)
    return figure


def save_figure(figure: Any, path: str | Path) -> Path:
    """Writes a matplotlib figure to ``path`` (PNG at 120 dpi, folders created) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
    return path


def _draw_panel(axes: Any, panel: Panel, xs_by_line: Sequence[Sequence[float]],
                y_range: tuple[float, float] | None, markers: bool) -> None:
    for line, line_xs in zip(panel.lines, xs_by_line):
        points = [(x, y, error) for x, (_, y, error) in zip(line_xs, line.points)]
        inside = [p for p in points if y_range is None or y_range[0] <= p[1] <= y_range[1]]
        xs, ys, errors = zip(*inside) if inside else ((), (), ())
        drawn = axes.errorbar(xs, ys, yerr=errors if any(errors) else None, label=line.label,
                              **_style(line.look, markers))
        color = drawn.lines[0].get_color()
        for (x, y, _), note in zip(points, line.notes):
            if note and (y_range is None or y_range[0] <= y <= y_range[1]):
                axes.annotate(note, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6, color=color)
        if y_range is not None:
            _draw_outliers(axes, points, y_range, color)
    for index, (label, y) in enumerate(panel.references.items()):
        axes.axhline(y, color="gray", linewidth=1, label=label, **_reference_style(index))
    if y_range is not None:
        axes.set_ylim(*y_range)


def _draw_outliers(axes: Any, points: Sequence[tuple[float, float, float]], y_range: tuple[float, float],
                   color: str) -> None:
    """Points outside ``y_range``: a triangle at the edge they lie beyond, with their value beside it (on the
    side of the axes' centre, so that it stays inside)."""
    low, high = y_range
    inset = 0.02 * (high - low)
    for x, y, error in points:
        if low <= y <= high:
            continue
        below = y < low
        edge = low + inset if below else high - inset
        axes.plot([x], [edge], marker="v" if below else "^", color=color, markersize=7, linestyle="none")
        value = f"{y:.3g}" + (f" ± {error:.2g}" if error else "")
        axes.annotate(value, (x, edge), textcoords="offset points", xytext=(0, 7 if below else -13), fontsize=7,
                      color=color, ha="center")


def _dodged_xs(lines: Sequence[Line], log: bool) -> list[list[float]]:
    """Each line's x values, those of different lines within 1% of one another spread apart in line order."""
    xs = [[p[0] for p in line.points] for line in lines]
    spots = sorted((x, i, j) for i, line_xs in enumerate(xs) for j, x in enumerate(line_xs) if math.isfinite(x))
    finite = [x for x, _, _ in spots]
    span = (max(finite) - min(finite)) if finite else 0.0
    clusters: list[list[tuple[float, int, int]]] = []
    for spot in spots:
        if clusters and abs(spot[0] - clusters[-1][0][0]) <= 0.01 * max(abs(clusters[-1][0][0]), 1e-12):
            clusters[-1].append(spot)
        else:
            clusters.append([spot])
    for cluster in clusters:
        lines_here = sorted({i for _, i, _ in cluster})
        if len(lines_here) < 2:
            continue
        for x, i, j in cluster:
            slot = lines_here.index(i) - (len(lines_here) - 1) / 2
            xs[i][j] = x * math.exp(0.025 * slot) if log and x > 0 else x + 0.012 * span * slot
    return xs


def _plain_log_ticks(axes: Any) -> None:
    """Log-axis ticks at 1, 2 and 5 times the powers of ten, written as plain numbers (0.2, not 2×10⁻¹)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(NullFormatter())


def _reference_style(index: int) -> dict[str, Any]:
    return {"linestyle": ("--", ":", "-.")[index % 3]}


def _style(look: Look, markers: bool) -> dict[str, Any]:
    style: dict[str, Any] = {"linestyle": look.linestyle, "linewidth": 1.3}
    if look.color is not None:
        style["color"] = look.color
    if markers:
        style.update(marker=look.marker, markersize=5, capsize=2.5, elinewidth=0.8)
        if not look.filled:
            style["markerfacecolor"] = "white"
    return style


def _bulk_limits(panels: Sequence[Panel]) -> tuple[float, float] | None:
    """y limits that hold every point between the fences (with its error bar) and every reference line, with a
    margin; None when there is nothing to draw."""
    points = [p for panel in panels for line in panel.lines for p in line.points if math.isfinite(p[1])]
    references = [y for panel in panels for y in panel.references.values()]
    ys = sorted(p[1] for p in points)
    if not ys and not references:
        return None
    if len(ys) >= 4:
        q1, _, q3 = statistics.quantiles(ys, n=4)
        spread = max(q3 - q1, 1e-9)
        fences = (q1 - _OUTLIER_FENCE * spread, q3 + _OUTLIER_FENCE * spread)
    else:
        fences = (-math.inf, math.inf)
    bulk = [p for p in points if fences[0] <= p[1] <= fences[1]]
    low = min([p[1] - p[2] for p in bulk] + references)
    high = max([p[1] + p[2] for p in bulk] + references)
    margin = 0.08 * (high - low) or 0.5
    return low - margin, high + margin


def _legend_entries(axes_list: Any, panels: Sequence[Panel], legend: Sequence[tuple[str, Look]] | None,
                    markers: bool) -> tuple[list[Any], list[str]]:
    """The lines' labels (and the references'), or ``legend``'s looks followed by the references."""
    if legend is None:
        seen: dict[str, Any] = {}
        for axes in axes_list:
            for handle, label in zip(*axes.get_legend_handles_labels()):
                if label and not label.startswith("_"):
                    seen.setdefault(label, handle)
        return list(seen.values()), list(seen)
    from matplotlib.lines import Line2D

    handles, labels = [], []
    for label, look in legend:
        style = _style(look, markers)
        for key in ("capsize", "elinewidth"):
            style.pop(key, None)
        style.setdefault("color", "black")
        handles.append(Line2D([], [], **style))
        labels.append(label)
    references = {label: index for panel in panels for index, label in enumerate(panel.references)}
    for label, index in references.items():
        handles.append(Line2D([], [], color="gray", linewidth=1, **_reference_style(index)))
        labels.append(label)
    return handles, labels


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


