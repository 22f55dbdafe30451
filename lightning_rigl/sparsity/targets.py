"""Which parameters are sparsified.

By default: every weight matrix the network multiplies its activations by: the ``weight`` of every convolution
(any dimensionality, transposed included), every linear layer and every Hugging Face ``Conv1D`` (GPT-2's
projections, stored (in, out)), and the projections that ``nn.MultiheadAttention`` keeps outside a linear layer
(``in_proj_weight``, or ``q_proj_weight``, ``k_proj_weight`` and ``v_proj_weight`` when keys and values have their
own sizes; its ``out_proj`` is a linear layer). Biases, normalisation layers, embedding tables (also where a
tied output head reads one), positional embeddings and class tokens stay dense, and so does a Hugging Face
model's output head (``get_output_embeddings()``, tied or not), as pruned language models keep it. Names are
those of ``model.named_parameters()``.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Mapping, Sequence

from torch import nn
from torch.nn.modules.conv import _ConvNd

from lightning_rigl.errors import ConfigError

SPARSIFIABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, _ConvNd)
_ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def huggingface_conv1d() -> type[nn.Module] | None:
    """Hugging Face's ``Conv1D`` (``transformers.pytorch_utils``), a linear layer whose weight is stored
    (in, out), when transformers is imported, as it is wherever a model holds one; None otherwise."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def neurons_in_columns(model: nn.Module, params: Mapping[str, nn.Parameter]) -> set[str]:
    """The names among ``params`` of weights stored (in, out), whose neurons are columns: the weights of Hugging
    Face ``Conv1D`` layers."""
    conv1d = huggingface_conv1d()
    if conv1d is None:
        return set()
    stored_transposed = {id(module.weight) for module in model.modules() if isinstance(module, conv1d)}
    return {name for name, param in params.items() if id(param) in stored_transposed}


def _output_head(module: nn.Module) -> object:
    """A Hugging Face model's ``get_output_embeddings()``; None for a module without one, or whose method takes
    arguments or is not implemented (as some models' own code leaves it)."""
    method = getattr(module, "get_output_embeddings", None)
    if not callable(method):
        return None
    try:
        return method()
    except (NotImplementedError, TypeError):
        return None


def _default_weights(model: nn.Module) -> set[int]:
    """The ids of the weight matrices selected by default (see the module's docstring)."""
    layers = SPARSIFIABLE_MODULES + tuple(filter(None, [huggingface_conv1d()]))
    chosen, kept_dense = set(), set()
    for module in model.modules():
        if isinstance(module, layers):
            candidates = [module.weight]
        elif isinstance(module, nn.MultiheadAttention):
            candidates = [getattr(module, name) for name in _ATTENTION_PROJECTIONS]
        else:
            candidates = []
        if isinstance(module, nn.Embedding):
            kept_dense.add(id(module.weight))
        head = _output_head(module)
        if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), nn.Parameter):
            kept_dense.add(id(head.weight))
        chosen.update(id(p) for p in candidates if isinstance(p, nn.Parameter))
    return chosen - kept_dense


def _matching(names: Sequence[str], pattern: str) -> list[str]:
    return [name for name in names if fnmatch.fnmatchcase(name, pattern)]


def _check_patterns(names: Sequence[str], patterns: Sequence[str], option: str) -> None:
    for pattern in patterns:
        if not _matching(names, pattern):
            raise ConfigError(
                f"{option} pattern {pattern!r} matches no parameter. Patterns are shell-style globs "
                f"(fnmatch) over parameter names such as {list(names)[:3]}; fix or remove the pattern."
            )


def sparsifiable_parameters(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, nn.Parameter]:
    """Select the parameters to sparsify, in ``named_parameters()`` order.

    Args:
        model: the network.
        include: glob patterns over parameter names. When given, exactly the matching parameters with at
            least two dimensions are sparsified instead of the default weight matrices (conv, linear,
            attention projections).
        exclude: glob patterns over parameter names removed from the selection (kept dense and left out of
            the sparsity budget).

    Raises:
        ValueError: a pattern matches no parameter, an included parameter has fewer than two dimensions,
            or nothing is left to sparsify.
    """
    all_params = dict(model.named_parameters())
    names = list(all_params)
    if include is not None:
        _check_patterns(names, include, "include")
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)]
        too_flat = [n for n in chosen if all_params[n].dim() < 2]
        if too_flat:
            raise ConfigError(
                f"include selects parameters with fewer than two dimensions: {too_flat}. Only weight "
                "matrices and kernels can be sparsified; narrow the include patterns."
            )
    else:
        weight_ids = _default_weights(model)
        chosen = [n for n in names if id(all_params[n]) in weight_ids]
    _check_patterns(names, exclude, "exclude")
    chosen = [n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if not chosen:
        raise ConfigError(
            f"{type(model).__name__} has nothing to sparsify: no convolution, linear or attention weight is left "
            "after include/exclude. Check the model and the patterns."
        )
    return {name: all_params[name] for name in chosen}


def resolve_patterns(names: Sequence[str], patterns: Sequence[str], option: str) -> set[str]:
    """Names among ``names`` matched by the glob patterns of ``option`` (``dense``, say).

    Raises:
        ValueError: a pattern matches none of the sparsified parameters.
    """
    _check_patterns(names, patterns, option)
    return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def resolve_custom(names: Sequence[str], patterns: Mapping[str, float]) -> dict[str, float]:
    """Name -> sparsity for every name among ``names`` matched by a ``custom_sparsity`` glob pattern.

    Raises:
        ValueError: a pattern matches none of the sparsified parameters, or a name matches two patterns.
    """
    _check_patterns(names, list(patterns), "custom_sparsity")
    resolved: dict[str, float] = {}
    for pattern, sparsity in patterns.items():
        for name in _matching(names, pattern):
            if name in resolved:
                raise ConfigError(f"custom_sparsity: {name!r} matches more than one pattern; make them disjoint.")
            resolved[name] = sparsity
    return resolved
