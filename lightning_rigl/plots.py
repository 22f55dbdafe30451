"""Figures of a sparse run, for people rather than loggers. Needs matplotlib (``pip install lightning-rigl[plot]``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor


def plot_densities(masks: Mapping[str, Tensor], path: str | Path, title: str = "") -> Path:
    """A bar chart of each sparse layer's density (fraction of live weights), in model order, saved to ``path``.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    names = list(masks)
    densities = [float(mask.float().mean()) for mask in masks.values()]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.3 * len(names) + 2), 4.5), layout="constrained")
    axes.bar(range(len(names)), densities, color="tab:blue")
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("density (fraction of live weights)")
    axes.set_title(title or "density per layer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
