"""Width multipliers: how one becomes channel counts, and which one gives a Small-Dense baseline its budget.

A Small-Dense baseline is a dense network shrunk until it has as many parameters as a sparse one keeps:

    target = sparse_parameter_count(create_model("wrn22_2", 10), 0.9, "erk")
    width = match_width("wrn22_2", 10, target)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_rigl.errors import ConfigError
from lightning_rigl.models.registry import create_model
from lightning_rigl.sparsity.distributions import Distribution, layer_densities, live_count

# Doubling the width this many times without reaching the target means the target is not a sensible size.
_MAX_DOUBLINGS = 12


def scale_channels(channels: int, width: float) -> int:
    """``channels · width`` rounded half up, at least 1: the channel (or unit) count of a scaled layer."""
    return max(1, math.floor(channels * width + 0.5))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (scalars) of ``model``, each shared parameter once."""
    return sum(p.numel() for p in model.parameters())


def sparse_parameter_count(model: nn.Module, sparsity: float, distribution: Distribution = "erk") -> int:
    """Parameters a sparse ``model`` keeps: the live weights of every sparsified tensor plus every other parameter.

    Args:
        model: the dense network; only the shapes are read.
        sparsity: fraction of zeros over the sparsified weights, in [0, 1).
        distribution: "uniform", "er", "erk" or a per-layer mapping, as in ``layer_densities``.

    Raises:
        ValueError: see ``lightning_rigl.sparsity.distributions.layer_densities``.
    """
    densities = layer_densities(model, sparsity, distribution)
    return sum(
        live_count(p.numel(), densities[name]) if name in densities else p.numel()
        for name, p in model.named_parameters()
    )


def match_width(name: str, num_classes: int, target_params: int, *, tolerance: float = 1e-4, **kwargs: object) -> float:
    """The width at which the registered model ``name`` has the dense parameter count closest to ``target_params``.

    The count is a non-decreasing step function of the width (channel counts are rounded). Bisection narrows
    the step that crosses the target to ``[lo, hi]`` with ``hi - lo <= tolerance``, count(lo) < target <=
    count(hi); the result is whichever of the two is closer to the target (the smaller width on a tie). Every
    width below ``lo`` has at most count(lo) parameters and every width above ``hi`` at least count(hi), so
    this is the closest count any width gives, unless two channel steps fall within ``tolerance`` of each
    other. Models are built on the meta device: no memory is allocated and nothing is initialised.

    Args:
        name: a registered model.
        num_classes: its output size.
        target_params: the parameter count to match, e.g. ``sparse_parameter_count(...)``.
        tolerance: width resolution of the bisection (dimensionless, like the width).
        **kwargs: the model's own options, passed to ``create_model``.

    Raises:
        ConfigError: ``target_params`` < 1, ``tolerance`` not in (0, 1), an unknown model or option, or a
            target beyond the count at width ``2**12``.
    """
    if isinstance(target_params, bool) or not isinstance(target_params, int) or target_params < 1:
        raise ConfigError(f"target_params must be an integer >= 1, got {target_params!r}.")
    if not 0.0 < tolerance < 1.0:
        raise ConfigError(f"tolerance must be in (0, 1), got {tolerance!r}.")

    def count(width: float) -> int:
        with torch.device("meta"):
            return count_parameters(create_model(name, num_classes, width, **kwargs))

    lo, hi = tolerance, 1.0
    if count(lo) >= target_params:
        return lo  # already the narrowest network: every channel count is 1
    for _ in range(_MAX_DOUBLINGS):
        if count(hi) >= target_params:
            break
        lo, hi = hi, 2.0 * hi
    else:
        raise ConfigError(
            f"{name!r} has only {count(hi)} parameters at width {hi}, fewer than the target {target_params}."
        )
    while hi - lo > tolerance:
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if count(mid) < target_params else (lo, mid)
    return min((lo, hi), key=lambda width: (abs(count(width) - target_params), width))
