"""RigL (Evci et al., ICML 2020): grow where the dense gradient is largest."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn
from typing_extensions import override

from lightning_rigl.callbacks.dynamic import DynamicSparseTraining
from lightning_rigl.sparsity.criteria import gradient_magnitude


class RigL(DynamicSparseTraining):
    """Rigging the Lottery: drop the smallest-magnitude live weights and grow the positions with the largest
    |gradient| of the loss with respect to the (masked) weight, read just before the optimizer step.

    Dead positions receive a gradient too (the weight is a dense tensor with zeros), so no extra backward
    pass and no persistent dense-gradient buffer is needed.

    Example::

        trainer = pl.Trainer(max_steps=10_000, callbacks=[RigL(sparsity=0.9, distribution="erk")])
    """

    grows_by_gradient: ClassVar[bool] = True

    @override
    def grow_scores(self, name: str, param: nn.Parameter, step: int, layer_index: int) -> Tensor:
        return gradient_magnitude(name, param)
