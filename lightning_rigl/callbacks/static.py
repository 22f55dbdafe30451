"""Static sparse training: a random mask under the layer distribution, never changed."""

from __future__ import annotations

from typing import ClassVar

import pytorch_lightning as pl
import torch
from typing_extensions import override

from lightning_rigl.callbacks.sparse_training import SparseTraining


class Static(SparseTraining):
    """Train with a fixed random mask: the baseline every dynamic method must beat.

    Example::

        trainer = pl.Trainer(max_epochs=10, callbacks=[Static(sparsity=0.9, distribution="erk")])
    """

    supports_structure: ClassVar[bool] = True

    @override
    def update_masks(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Static masks never change."""

    @override
    def may_change_masks(self, step: int) -> bool:
        return False
