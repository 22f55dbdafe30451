"""Scores that rank connections: which to drop, grow or keep. Plain functions of a layer's tensors."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_rigl.sparsity.masks import Stream, generator


def dense_gradient(name: str, param: nn.Parameter) -> Tensor:
    """The parameter's gradient, dead positions included (the weight is a dense tensor with zeros there).

    Raises:
        RuntimeError: the parameter has no gradient (it took no part in the loss).
    """
    if param.grad is None:
        raise RuntimeError(
            f"The gradient of {name!r} is needed, but it has none: the parameter did not take part in the loss. "
            "Leave it out with exclude=[...]."
        )
    return param.grad


def magnitude(name: str, param: nn.Parameter) -> Tensor:
    """|w| (a fresh tensor): the score magnitude pruning keeps the largest of."""
    return param.detach().abs()


def gradient_magnitude(name: str, param: nn.Parameter) -> Tensor:
    """|∂L/∂w| at every position (a fresh tensor): RigL's growth score."""
    return dense_gradient(name, param).abs()


def saliency(name: str, param: nn.Parameter) -> Tensor:
    """|∂L/∂w · w| (a fresh tensor): SNIP's connection sensitivity."""
    return (dense_gradient(name, param) * param.detach()).abs_()


def random_scores(param: Tensor, seed: int, step: int, layer_index: int) -> Tensor:
    """Uniform scores in [0, 1) of the parameter's shape, drawn from the seed, step and layer alone: SET's growth."""
    scores = torch.rand(param.shape, generator=generator(seed, Stream.GROW_POSITIONS, step, layer_index))
    return scores.to(param.device)


def mean_magnitude(values: Tensor, mask: Tensor) -> float:
    """Mean |value| over the live positions of ``mask``: a layer's share statistic for redistribution."""
    live = values.detach()[mask]
    return float(live.abs().sum(dtype=torch.float64)) / max(live.numel(), 1)
