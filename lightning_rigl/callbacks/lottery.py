"""The lottery ticket (Frankle & Carbin, 2019): retrain a finished run's mask from its rewound weights."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_rigl.callbacks.sparse_training import SparseTraining, saved_state
from lightning_rigl.checkpoints import is_sharded_checkpoint, read_checkpoint
from lightning_rigl.errors import ConfigError
from lightning_rigl.sparsity.sharding import write_local


class LotteryTicket(SparseTraining):
    """Retrain a winning ticket: the masks of a finished lightning-rigl run (any method), with every parameter
    of the model (sparse weights, biases, normalisation layers) rewound to the copy that run kept with
    ``rewind_step``; then the masks stay fixed. Resuming a ticket's own checkpoint continues it, no rewind.

    The usual recipe: ``GradualMagnitudePruning(sparsity=0.9, rewind_step=0)`` to the end, then
    ``LotteryTicket(checkpoint="runs/.../last.ckpt")`` on the same model, same layer selection.

    Example::

        trainer = pl.Trainer(max_steps=10_000, callbacks=[LotteryTicket(checkpoint="pruned.ckpt")])

    Args:
        checkpoint: path of a Lightning checkpoint written by a run with a lightning-rigl callback whose
            ``rewind_step`` was set.
        seed: unused by the ticket itself (its masks are given); kept for a uniform interface.
        kernels, live_step: as for every sparse callback (``SparseTraining``).

    Raises:
        ValueError: the file is missing, holds no lightning-rigl state or no rewind copy (here), or does not
            fit the model: other parameter names or shapes (at setup, before training).
    """

    def __init__(self, checkpoint: str, *, seed: int = 0, kernels: str = "dense", live_step: bool = True) -> None:
        state = _ticket_state(checkpoint)
        self.checkpoint = str(checkpoint)
        self.source_masks: dict[str, Tensor] = state["masks"]
        self.source_rewind: dict[str, Tensor] = state["rewind"]
        densities = {name: int(mask.sum()) / mask.numel() for name, mask in self.source_masks.items()}
        super().__init__(None, {name: 1.0 - d for name, d in densities.items()}, include=list(self.source_masks),
                         seed=seed, kernels=kernels, live_step=live_step)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_fits(pl_module)
        super().setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.masks:  # a fresh ticket, not a resumed one: rewind before the masks are applied
            with torch.no_grad():
                for name, param in pl_module.named_parameters():
                    write_local(param, self.source_rewind[name].to(param.device, param.dtype))
        super().on_fit_start(trainer, pl_module)

    @override
    def target_densities(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
        # Exactly the source's live counts (the mapping passed to the base class only names the layers).
        return {name: int(mask.sum()) / mask.numel() for name, mask in self.source_masks.items()}

    @override
    def initial_masks(self, scores: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        return {name: self.source_masks[name].to(param.device, torch.bool) for name, param in self._params.items()}

    @override
    def update_masks(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """A ticket's masks never change."""

    @override
    def may_change_masks(self, step: int) -> bool:
        return False

    def _check_fits(self, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        wrong = sorted(set(params) ^ set(self.source_rewind))
        for saved in (self.source_rewind, self.source_masks):
            wrong += [name for name, value in saved.items() if name in params and value.shape != params[name].shape]
        if wrong:
            raise ConfigError(
                f"The checkpoint {self.checkpoint} was trained on another model: parameters {wrong[:5]} differ in "
                "name or shape. Retrain the ticket on the model of the run that wrote the checkpoint."
            )


def _ticket_state(checkpoint: str | Path) -> dict[str, Any]:
    """The lightning-rigl state of ``checkpoint`` (a file, or a sharded checkpoint's folder), with its masks and
    rewind copy."""
    path = Path(checkpoint)
    if not path.is_file() and not is_sharded_checkpoint(path):
        raise ConfigError(f"LotteryTicket: no checkpoint at {path}.")
    state = saved_state(read_checkpoint(path, weights=False))
    if state is None:
        raise ConfigError(f"LotteryTicket: {path} holds no lightning-rigl masks; give a checkpoint of a run trained "
                          "with a lightning-rigl callback.")
    if state.get("rewind") is None:
        raise ConfigError(
            f"LotteryTicket: {path} holds masks but no rewind copy of the weights. Train the source run with "
            "rewind_step set, e.g. GradualMagnitudePruning(sparsity=..., rewind_step=0) for the initial weights."
        )
    return state
