"""SNIP (Lee et al., 2019): one-shot pruning by connection sensitivity at the first optimizer step."""

from __future__ import annotations

from typing import ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override

from lightning_rigl.callbacks.pruning import PruningFromDense
from lightning_rigl.callbacks.sparse_training import gradients_ready
from lightning_rigl.sparsity.criteria import saliency


class SNIP(PruningFromDense):
    """Single-shot network pruning: at the first optimizer step, keep the connections with the largest
    sensitivity |∂L/∂w · w| (that step's accumulated, all-reduced gradient and the initial weights), per layer
    under the distribution (as the official RigL code does) or across all layers at once with
    ``distribution="global"`` (as the SNIP paper does); the first step then trains the pruned network, and
    the masks never change again. Under fp16, pruning waits for the first step with finite gradients.

    Example::

        trainer = pl.Trainer(max_steps=10_000, callbacks=[SNIP(sparsity=0.9, distribution="global")])

    Takes the options of ``SparseTraining``; ``distribution`` may also be "global".
    """

    reads_gradients: ClassVar[bool] = True

    @override
    def reads_dense_gradient(self, step: int) -> bool:
        return self.num_updates == 0  # the pruning step; the masks never change after it

    @override
    def may_change_masks(self, step: int) -> bool:
        return self.num_updates == 0

    @override
    def update_masks(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        if self.num_updates:
            return
        if not gradients_ready(optimizer):
            rank_zero_warn(f"SNIP pruning postponed: gradients at step {trainer.global_step} are missing or not "
                           "finite.")
            return
        self.dense_gradient_read = True  # |g·w| needs the gradient at every position
        self.prune_to(trainer, optimizer, saliency, 1.0)
