"""SET (Mocanu et al., 2018): grow at random."""

from __future__ import annotations

from torch import Tensor, nn
from typing_extensions import override

from lightning_rigl.callbacks.dynamic import DynamicSparseTraining
from lightning_rigl.sparsity.criteria import random_scores


class SET(DynamicSparseTraining):
    """Sparse Evolutionary Training: drop the smallest-magnitude live weights and grow as many at positions
    drawn uniformly at random among those not kept. The draw depends only on ``seed``, the step and the
    layer, so every DDP rank and every resumed run makes the same choice."""

    @override
    def grow_scores(self, name: str, param: nn.Parameter, step: int, layer_index: int) -> Tensor:
        return random_scores(param, self.seed, step, layer_index)
