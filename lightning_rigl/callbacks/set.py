"""SET (Mocanu et al., 2018): grow at random."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_rigl.callbacks.dynamic import DynamicSparseTraining
from lightning_rigl.sparsity.masks import generator


class SET(DynamicSparseTraining):
    """Sparse Evolutionary Training: drop the smallest-magnitude live weights and grow as many at positions
    drawn uniformly at random among those not kept. The draw depends only on ``seed``, the step and the
    layer, so every DDP rank and every resumed run makes the same choice."""

    def grow_scores(self, name: str, param: nn.Parameter, step: int, layer_index: int) -> Tensor:
        scores = torch.rand(param.shape, generator=generator(self.seed, step, layer_index, 0))
        return scores.to(param.device)
