"""Figures of a sparse run, for people rather than loggers. Needs matplotlib (``pip install lightning-rigl[plot]``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def plot_densities(densities: Mapping[str, float], path: str | Path, title: str = "") -> Path:
    """A bar chart of each layer's density (fraction of live weights, by layer name), in the mapping's order,
    saved to ``path``.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    names = list(densities)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.3 * len(names) + 2), 4.5), layout="constrained")
    axes.bar(range(len(names)), list(densities.values()), color="tab:blue")
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("density (fraction of live weights)")
    axes.set_title(title or "density per layer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
