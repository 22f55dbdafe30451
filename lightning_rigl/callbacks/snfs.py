"""SNFS, sparse momentum (Dettmers & Zettlemoyer, 2019): grow where the moving average of the gradient is largest."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_rigl.callbacks.dynamic import DynamicSparseTraining
from lightning_rigl.errors import ConfigError


class SNFS(DynamicSparseTraining):
    """Sparse Networks From Scratch: drop the smallest-magnitude live weights, grow where the exponential
    moving average of the dense gradient (the "momentum") is largest among positions not kept, and
    redistribute the grown connections across layers in proportion to each layer's mean |momentum| over its
    live weights (the sparse_learning rule).

    The moving average needs the dense gradient at every step, which the optimizer never sees (it gets the
    masked one), so the callback keeps it: one fp32 tensor the size of every sparsified weight, updated once
    per optimizer step after accumulation and all-reduce, saved in checkpoints, freed at T_end.

    Example::

        trainer = pl.Trainer(max_steps=10_000, callbacks=[SNFS(sparsity=0.9, distribution="erk")])

    Besides the options of ``DynamicSparseTraining`` (``redistribution`` defaults to "momentum" here;
    "none" gives the official TensorFlow "momentum" method, which grows by the average but keeps densities):

    Args:
        momentum: β of the moving average m ← β·m + (1 - β)·g of the dense gradient, in [0, 1).

    Raises:
        ValueError: momentum outside [0, 1), or any option of ``DynamicSparseTraining`` out of range.
    """

    def __init__(self, *args: Any, momentum: float = 0.9, redistribution: str = "momentum", **kwargs: Any) -> None:
        super().__init__(*args, redistribution=redistribution, **kwargs)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ConfigError(f"momentum must be a decay in [0, 1), got {momentum!r}.")
        self.momentum = float(momentum)

    @override
    def needs_moving_average(self, optimizer: torch.optim.Optimizer) -> bool:
        return True

    @override
    def grow_scores(self, name: str, param: nn.Parameter, step: int, layer_index: int) -> Tensor:
        return self.moving_average[name].abs()
