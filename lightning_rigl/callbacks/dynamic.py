"""Dynamic sparse training: drop and grow every ΔT optimizer steps until T_end."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_rigl.callbacks.sparse_training import SparseTraining, gradients_finite
from lightning_rigl.errors import ConfigError
from lightning_rigl.sparsity.distributions import Distribution, live_count
from lightning_rigl.sparsity.masks import MaskChange, Stream, apply_change, generator
from lightning_rigl.sparsity.parallel import for_each_layer
from lightning_rigl.sparsity.schedules import DROP_SCHEDULES, drop_fraction, is_update_step, resolve_stop_step
from lightning_rigl.sparsity.updates import drop_and_grow

GROW_INITS = ("zeros", "normal", "uniform")


class DynamicSparseTraining(SparseTraining):
    """Every ``update_interval`` optimizer steps, each layer drops its ``f(t) · n_live`` smallest-magnitude
    live weights and grows as many new ones chosen by ``grow_scores``; layer densities never change.

    The update runs in ``on_before_optimizer_step`` of update steps, on the fully accumulated, all-reduced
    and unscaled gradient; that same optimizer step then trains the new mask. Updates happen at steps
    ΔT, 2ΔT, ... strictly before T_end (step 0 is not an update). If the gradients of an update step are
    not finite (an fp16 overflow, which the GradScaler skips), the update waits for the next finite step.

    Besides the options of ``SparseTraining``:

    Args:
        update_interval: ΔT, optimizer steps between mask updates (>= 1).
        drop_fraction: α, the fraction of each layer's live weights exchanged at the first update, (0, 1].
        drop_schedule: how the fraction decays: "cosine" (α/2·(1 + cos(π·t/T_end))), "constant", "linear".
        stop_at: T_end, after which masks stay fixed: a float in (0, 1] is a fraction of the run's total
            optimizer steps (``trainer.estimated_stepping_batches``); an int is an absolute step.
        grow_init: value of new connections: "zeros"; "normal" (std of the layer's current weights);
            "uniform" (within ±mean |w| of the layer), as in the official implementation.

    Raises:
        ValueError: any option outside the ranges above.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        distribution: Distribution = "erk",
        *,
        dense: Sequence[str] = (),
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        custom_sparsity: Mapping[str, float] | None = None,
        erk_power_scale: float = 1.0,
        update_interval: int = 100,
        drop_fraction: float = 0.3,
        drop_schedule: str = "cosine",
        stop_at: int | float = 0.75,  # int first: LightningCLI tries a union in order, and 75000 is a step
        grow_init: str = "zeros",
        seed: int = 0,
    ) -> None:
        super().__init__(sparsity, distribution, dense=dense, include=include, exclude=exclude,
                         custom_sparsity=custom_sparsity, erk_power_scale=erk_power_scale, seed=seed)
        if isinstance(update_interval, bool) or not isinstance(update_interval, int) or update_interval < 1:
            raise ConfigError(f"update_interval must be an int >= 1 (optimizer steps), got {update_interval!r}.")
        if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or not 0 < drop_fraction <= 1:
            raise ConfigError(f"drop_fraction must be a fraction in (0, 1], got {drop_fraction!r}.")
        if drop_schedule not in DROP_SCHEDULES:
            raise ConfigError(f"Unknown drop_schedule {drop_schedule!r}: use one of {DROP_SCHEDULES}.")
        if isinstance(stop_at, bool) or not (
            (isinstance(stop_at, int) and stop_at >= 1) or (isinstance(stop_at, float) and 0 < stop_at <= 1)
        ):
            raise ConfigError(
                f"stop_at must be a fraction of the run in (0, 1] (a float) or an optimizer step >= 1 (an int), "
                f"got {stop_at!r}."
            )
        if grow_init not in GROW_INITS:
            raise ConfigError(f"Unknown grow_init {grow_init!r}: use one of {GROW_INITS}.")
        self.update_interval = update_interval
        self.drop_fraction = float(drop_fraction)
        self.drop_schedule = drop_schedule
        self.stop_at = stop_at
        self.grow_init = grow_init
        self.stop_step = 0
        self._pending_step: int | None = None  # an update step still waiting for finite gradients

    # ------------------------------------------------------------------------------------------ policy

    @abstractmethod
    def grow_scores(self, name: str, param: nn.Parameter, step: int, layer_index: int) -> Tensor:
        """Non-negative scores of the parameter's shape; the largest among non-kept positions grow. Must
        return a fresh tensor (it is overwritten)."""

    # ------------------------------------------------------------------------------------------- hooks

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.stop_step = resolve_stop_step(self.stop_at, trainer.estimated_stepping_batches)

    @override
    def update_masks(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        if is_update_step(step, self.update_interval, self.stop_step):
            self._pending_step = step
        if self._pending_step is None:
            return
        if not gradients_finite(optimizer):
            rank_zero_warn(f"Mask update of step {self._pending_step} postponed: gradients at step {step} are not finite.")
            return
        self._update(trainer, optimizer, self._pending_step)
        self._pending_step = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pending_step": self._pending_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._pending_step = state_dict["pending_step"]

    # ----------------------------------------------------------------------------------------- helpers

    def _update(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, step: int) -> None:
        fraction = drop_fraction(step, self.drop_fraction, self.stop_step, self.drop_schedule)

        def update_layer(index: int, name: str, param: nn.Parameter) -> int:
            n_swap = int(fraction * live_count(param.numel(), self.densities[name]))
            if n_swap == 0:
                return 0
            weights = param.detach()
            change = drop_and_grow(self.masks[name], weights, self.grow_scores(name, param, step, index), n_swap, n_swap)
            apply_change(param, change, optimizer, self._grow_values(weights, change, step, index))
            return change.added.numel()

        changed = sum(for_each_layer(update_layer, self._params).values())
        self.num_updates += 1
        self._sync_masks(trainer, optimizer)
        self._log(trainer, {"sparsity/drop_fraction": fraction, "sparsity/changed": float(changed)})

    def _grow_values(self, weights: Tensor, change: MaskChange, step: int, layer_index: int) -> Tensor | None:
        if self.grow_init == "zeros":
            return None
        gen = generator(self.seed, Stream.GROW_VALUES, step, layer_index)
        count = change.added.numel()
        if self.grow_init == "normal":
            values = torch.randn(count, generator=gen) * float(weights.float().std())
        else:
            bound = float(weights.abs().float().mean())
            values = (torch.rand(count, generator=gen) * 2 - 1) * bound
        return values.to(weights.device)

