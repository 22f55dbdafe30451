"""Layer-wise sparsity distributions: uniform, Erdős–Rényi (ER), Erdős–Rényi-Kernel (ERK), or a custom map.

All functions return *densities* (fraction of live weights, 0 < d <= 1) keyed by parameter name. Each layer
of N weights at sparsity s holds exactly N - ⌊s·N⌋ live weights, the float product floored as the official
code floors it, and its density is that count over N, so that ``live_count(N, d)`` gives the count back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import nn

from lightning_rigl.errors import ConfigError
from lightning_rigl.sparsity.targets import resolve_custom, resolve_patterns, sparsifiable_parameters

DISTRIBUTIONS = ("uniform", "er", "erk")
GLOBAL = "global"  # one ranking across all layers (SNIP, gradual magnitude pruning): the scores set the split
Distribution = str | Mapping[str, float]
Shapes = Mapping[str, Sequence[int]]

# Densities are counts over N; guards the way back, floor((1 - k/N)·N), against float error below N - k.
_COUNT_TOLERANCE = 1e-6


def live_count(numel: int, density: float) -> int:
    """Number of live weights of a layer of ``numel`` weights at ``density``: ``numel - floor((1-d)·numel)``,
    exact for a density that is a count over ``numel`` (as every density here is)."""
    return numel - math.floor((1.0 - density) * numel + _COUNT_TOLERANCE)


def count_density(numel: int, sparsity: float) -> float:
    """Density of a layer at ``sparsity`` counted as the official code counts: numel - ⌊sparsity·numel⌋ live
    weights (the float product floored, no tolerance), over numel."""
    return (numel - math.floor(sparsity * numel)) / numel


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _raw_score(shape: Sequence[int], kind: str, power: float) -> float:
    """Unnormalised density of ER ((n_in + n_out) / (n_in · n_out)) or ERK ((Σ dims / Π dims) to ``power``, the
    only score the official code raises to ``erk_power_scale``)."""
    if kind == "erk":
        return (sum(shape) / _numel(shape)) ** power
    n_out, n_in = shape[0], shape[1]
    return (n_in + n_out) / (n_in * n_out)


def _scaled_sparsities(
    shapes: Shapes, sparsity: float, kind: str, dense: set[str], custom: Mapping[str, float], power: float
) -> dict[str, float]:
    """ER / ERK as the official code solves it: sparsity_l = 1 - ε · raw_l over the layers being solved.

    The budget is in whole weights: the layers being solved share Σ (N_l − ⌊S·N_l⌋) live weights, less
    Σ ⌊S·N_l⌋ for every layer kept dense (dense layers count against the budget); layers with a custom
    sparsity are outside it. A layer whose ε · raw_l would exceed 1 is made dense (every layer tied at the
    largest raw score at once) and ε is solved again.
    """
    dense = set(dense)
    while True:
        budget = 0  # live weights left for the layers still being solved
        divisor = 0.0
        for name, shape in shapes.items():
            n_zeros = math.floor(sparsity * _numel(shape))
            if name in dense:
                budget -= n_zeros
            elif name not in custom:
                budget += _numel(shape) - n_zeros
                divisor += _raw_score(shape, kind, power) * _numel(shape)
        free = [name for name in shapes if name not in dense and name not in custom]
        if not free or budget <= 0:
            raise _InfeasibleError(sorted(dense))
        epsilon = budget / divisor
        max_raw = max(_raw_score(shapes[name], kind, power) for name in free)
        if epsilon * max_raw <= 1.0:
            break
        dense.update(name for name in free if _raw_score(shapes[name], kind, power) == max_raw)
    sparsities = {name: 1.0 - epsilon * _raw_score(shape, kind, power) for name, shape in shapes.items()}
    return {name: 0.0 if name in dense else custom.get(name, sparsities[name]) for name in shapes}


class _InfeasibleError(Exception):
    def __init__(self, layers: list[str]) -> None:
        self.layers = layers


def _densities_or_raise(
    shapes: Shapes, sparsity: float, distribution: str, dense: set[str], custom: Mapping[str, float], power: float
) -> dict[str, float]:
    if distribution == "uniform":
        first = next(iter(shapes))
        sparsities = {
            name: 0.0 if name in dense else custom[name] if name in custom else 0.0 if name == first else sparsity
            for name in shapes
        }
    else:
        sparsities = _scaled_sparsities(shapes, sparsity, distribution, dense, custom, power)
    return {name: count_density(_numel(shape), sparsities[name]) for name, shape in shapes.items()}


def _empty_layers(shapes: Shapes, densities: Mapping[str, float]) -> list[str]:
    return [name for name, shape in shapes.items() if live_count(_numel(shape), densities[name]) == 0]


def _feasible(shapes: Shapes, sparsity: float, distribution: str, dense: set[str], custom: Mapping[str, float],
              power: float) -> bool:
    try:
        return not _empty_layers(shapes, _densities_or_raise(shapes, sparsity, distribution, dense, custom, power))
    except _InfeasibleError:
        return False


def _largest_feasible_sparsity(shapes: Shapes, distribution: str, dense: set[str], custom: Mapping[str, float],
                               power: float) -> float:
    low, high = 0.0, 1.0  # feasible at low, infeasible at high
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if _feasible(shapes, mid, distribution, dense, custom, power) else (low, mid)
    return math.floor(low * 1e4) / 1e4


def densities_for_shapes(
    shapes: Shapes,
    sparsity: float | None,
    distribution: Distribution,
    dense: Sequence[str] = (),
    *,
    custom_sparsity: Mapping[str, float] | None = None,
    erk_power_scale: float = 1.0,
) -> dict[str, float]:
    """Per-layer densities for the given weight shapes (ordered: the first entry is the first layer).

    Args:
        shapes: parameter name -> shape, in model order.
        sparsity: target fraction of zeros over all weights in ``shapes`` (0 <= S < 1); must be None when
            ``distribution`` is a mapping.
        distribution: "uniform" (every layer at S, first layer dense), "er", "erk", or a mapping from
            parameter name to that layer's sparsity.
        dense: names kept fully dense. Under ER/ERK they count against the budget, so the other layers get
            sparser; under uniform they simply stay dense.
        custom_sparsity: names whose sparsity is fixed (name -> sparsity), outside the budget; the
            distribution spreads S over the other layers (the official ``custom_sparsity_map``).
        erk_power_scale: exponent on the raw ERK score (the official ``erk_power_scale``): 1 is ERK, 0 spreads
            S evenly over every layer, first included. "erk" only: the official code ignores it under ER.

    Raises:
        ValueError: bad sparsity, unknown distribution, a mapping that does not cover exactly the
            sparsified parameters, or a request that leaves some layer without live weights or overspends
            the budget (the message names the layers and the largest feasible sparsity).
    """
    check_distribution(sparsity, distribution, custom_sparsity=custom_sparsity, erk_power_scale=erk_power_scale)
    custom = dict(custom_sparsity or {})
    unknown = sorted(set(custom) - set(shapes))
    if unknown:
        raise ConfigError(f"custom_sparsity names {unknown}, which are not sparsified; sparsified parameters are "
                          f"{list(shapes)}.")
    dense_set = set(dense)
    if isinstance(distribution, Mapping):
        return _custom_densities(shapes, distribution, dense_set)
    try:
        densities = _densities_or_raise(shapes, sparsity, distribution, dense_set, custom, erk_power_scale)
        empty = _empty_layers(shapes, densities)
    except _InfeasibleError as error:
        empty = error.layers
    if empty:
        best = _largest_feasible_sparsity(shapes, distribution, dense_set, custom, erk_power_scale)
        raise ConfigError(
            f"Sparsity {sparsity} is infeasible with distribution {distribution!r}: layer(s) {empty} "
            f"cannot fit (a layer would have no live weight, or the dense layers use up the budget). "
            f"The largest feasible sparsity here is {best}; lower the sparsity or keep fewer layers dense."
        )
    return densities


def global_live_total(shapes: Shapes, sparsity: float, dense: set[str]) -> int:
    """Live weights the layers not in ``dense`` share under ``distribution="global"`` at ``sparsity``: the
    whole selection keeps N − ⌊S·N⌋, and the dense layers count against that, as under ER/ERK.

    Raises:
        ValueError: the dense layers leave fewer live weights than one per remaining layer.
    """
    total = sum(_numel(shape) for shape in shapes.values())
    pool = [name for name in shapes if name not in dense]
    live = total - math.floor(sparsity * total) - sum(_numel(shapes[name]) for name in dense)
    if live < len(pool):
        raise ConfigError(
            f"Sparsity {sparsity} is infeasible with distribution 'global': the dense layers {sorted(dense)} "
            "use up the budget. Lower the sparsity or keep fewer layers dense."
        )
    return live


def _custom_densities(shapes: Shapes, mapping: Mapping[str, float], dense: set[str]) -> dict[str, float]:
    unknown = sorted(set(mapping) - set(shapes))
    missing = sorted(set(shapes) - set(mapping) - dense)
    if unknown or missing:
        raise ConfigError(
            f"The sparsity mapping must name every sparsified parameter exactly once. Unknown: {unknown}; "
            f"missing: {missing}. Sparsified parameters are: {list(shapes)}."
        )
    densities = {}
    for name, shape in shapes.items():
        layer_sparsity = 0.0 if name in dense else mapping[name]
        densities[name] = count_density(_numel(shape), float(layer_sparsity))
        if live_count(_numel(shape), densities[name]) == 0:
            largest = 1.0 - 1.0 / _numel(shape)
            raise ConfigError(
                f"Sparsity {layer_sparsity} leaves layer {name!r} without live weights; the largest feasible "
                f"sparsity for it is {math.floor(largest * 1e4) / 1e4}."
            )
    return densities


def _check_fraction(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{what} must be a fraction of zeros in [0, 1), got {value!r}.")


def check_distribution(
    sparsity: float | None,
    distribution: Distribution,
    allow_global: bool = False,
    custom_sparsity: Mapping[str, float] | None = None,
    erk_power_scale: float = 1.0,
) -> None:
    """Checks what can be checked without a model.

    Args:
        allow_global: accept ``"global"`` (one ranking across all layers): only methods whose scores rank
            every layer together (SNIP, gradual magnitude pruning) can use it.

    Raises:
        ValueError: sparsity outside [0, 1) (or set together with a mapping), an unknown distribution name,
            "global" where it means nothing, a mapping or custom value outside [0, 1), custom sparsities
            beside a mapping, a negative erk_power_scale, or one other than 1 with a distribution other than "erk".
    """
    if isinstance(erk_power_scale, bool) or not isinstance(erk_power_scale, (int, float)) or erk_power_scale < 0:
        raise ConfigError(f"erk_power_scale must be a number >= 0, got {erk_power_scale!r}.")
    if erk_power_scale != 1 and distribution != "erk":
        # The official code raises only the ERK score to this power: under ER the flag changes nothing there.
        raise ConfigError(f"erk_power_scale={erk_power_scale} applies to distribution='erk' only (the official code "
                          f"ignores it under 'er'), not to {distribution!r}. Leave it at 1.0, or use 'erk'.")
    for name, value in (custom_sparsity or {}).items():
        _check_fraction(value, f"custom_sparsity of {name!r}")
    if custom_sparsity and (isinstance(distribution, Mapping) or distribution == GLOBAL):
        raise ConfigError("custom_sparsity applies with 'uniform', 'er' or 'erk'; a mapping sets every layer "
                          "already (put those layers in it), and 'global' lets the scores decide.")
    if distribution == GLOBAL:
        if not allow_global:
            raise ConfigError(
                "distribution='global' ranks all layers together by one score, which only SNIP, "
                "GradualMagnitudePruning and a start from the weights (start='magnitude') do; use one of "
                f"{DISTRIBUTIONS} or a mapping here."
            )
        _check_fraction(sparsity, "sparsity")
        return
    if isinstance(distribution, Mapping):
        if sparsity is not None:
            raise ConfigError("sparsity must be left unset when distribution is a mapping: the mapping sets it.")
        for name, value in distribution.items():
            _check_fraction(value, f"Sparsity of {name!r}")
        return
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"Unknown distribution {distribution!r}: use one of {DISTRIBUTIONS} or a mapping.")
    _check_fraction(sparsity, "sparsity")


def layer_densities(
    model: nn.Module,
    sparsity: float | None,
    distribution: Distribution = "erk",
    *,
    dense: Sequence[str] = (),
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    custom_sparsity: Mapping[str, float] | None = None,
    erk_power_scale: float = 1.0,
) -> dict[str, float]:
    """Density (fraction of live weights) of every sparsified parameter of ``model``; no Trainer needed.

    Args:
        model: the network.
        sparsity: target fraction of zeros over all sparsified weights, 0 <= S < 1 (None for a mapping).
        distribution: "uniform", "er", "erk", or a mapping from parameter name to sparsity.
        dense: glob patterns of sparsified parameters kept dense (counted in the budget under ER/ERK).
        include: glob patterns replacing the default selection (conv and linear weights).
        exclude: glob patterns removed from the selection (dense and outside the budget).
        custom_sparsity: glob pattern -> sparsity for layers whose sparsity is fixed, outside the budget.
        erk_power_scale: exponent on the raw ERK score (0: every layer at S); "erk" only.

    Raises:
        ValueError: see ``densities_for_shapes`` and ``sparsifiable_parameters``.
    """
    check_distribution(sparsity, distribution, custom_sparsity=custom_sparsity, erk_power_scale=erk_power_scale)
    params = sparsifiable_parameters(model, include=include, exclude=exclude)
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    return densities_for_shapes(
        shapes, sparsity, distribution, resolve_patterns(list(shapes), dense, "dense"),
        custom_sparsity=resolve_custom(list(shapes), custom_sparsity or {}), erk_power_scale=erk_power_scale,
    )
