"""Figures of sparse runs, for people rather than loggers. Needs matplotlib (``pip install lightning-rigl[plot]``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Panel:
    """One axes of a figure: lines by label, each a sequence of points ``(x, y, y_error)`` (error 0: none).

    Args:
        series: label -> points, drawn in the given order.
        xticklabels: names for the x positions 0, 1, ... (layer names), or None for numeric ticks.
        references: label -> y of a horizontal dashed line (a dense baseline).
    """

    series: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    xticklabels: list[str] | None = None
    references: dict[str, float] = field(default_factory=dict)


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
        axes.legend(fontsize=8)
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("density (fraction of live weights)")
    axes.set_title(title or "density per layer")
    return _save(plt, figure, path)


def plot_panels(panels: Mapping[str, Panel], path: str | Path, *, xlabel: str, ylabel: str, title: str,
                markers: bool = True, xscale: str = "linear") -> Path:
    """Line plots side by side, one per panel (titled by its key), with error bars where a point has an error,
    saved to ``path``.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    plt = _pyplot()
    widest = max((len(panel.xticklabels or ()) for panel in panels.values()), default=0)
    width = max(6.0, 0.25 * widest + 2)
    figure, axes_row = plt.subplots(1, max(1, len(panels)), figsize=(width * max(1, len(panels)), 4.8),
                                    layout="constrained", squeeze=False)
    for axes, (panel_title, panel) in zip(axes_row[0], panels.items()):
        for index, (label, points) in enumerate(panel.series.items()):
            xs, ys, errors = zip(*points) if points else ((), (), ())
            style: dict[str, Any] = {"marker": "o", "markersize": 4, "capsize": 3} if markers else {}
            style["linestyle"] = ("-", "--", ":")[index // 10 % 3]  # the colour cycle repeats after ten lines
            axes.errorbar(xs, ys, yerr=errors if any(errors) else None, label=label, **style)
        for label, y in panel.references.items():
            axes.axhline(y, linestyle="--", color="gray", label=label)
        axes.set_xscale(xscale)  # first: setting the scale resets the ticks
        if panel.xticklabels is not None:
            axes.set_xticks(range(len(panel.xticklabels)), panel.xticklabels, rotation=90, fontsize=6)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_title(panel_title, fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(title)
    return _save(plt, figure, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, figure: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
