"""Dynamic sparse training: every ΔT optimizer steps until T_end, drop the weakest live connections and grow new
ones; a method states what it grows by (``grow_scores``)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_rigl.callbacks.sparse_training import SparseTraining, gradients_ready
from lightning_rigl.errors import ConfigError
from lightning_rigl.sparsity.criteria import dense_gradient, mean_magnitude
from lightning_rigl.sparsity.distributions import Distribution, live_count
from lightning_rigl.sparsity.masks import MaskChange, Stream, apply_change, generator
from lightning_rigl.sparsity.redistribution import grow_counts
from lightning_rigl.sparsity.schedules import (
    DROP_SCHEDULES,
    check_step_or_fraction,
    drop_fraction,
    is_update_step,
    resolve_step,
)
from lightning_rigl.sparsity.sharding import gather, local, shard_like
from lightning_rigl.sparsity.updates import drop_and_grow

GROW_INITS = ("zeros", "normal", "uniform")
REDISTRIBUTIONS = ("none", "gradient", "momentum")
UPDATE_PLACEMENTS = ("before_step", "skip_step")
# Decay of the callback's own moving average of the dense gradient, where redistribution="momentum" finds no
# momentum in the optimizer (SNFS sets its own).
DEFAULT_MOMENTUM = 0.9


class DynamicSparseTraining(SparseTraining):
    """Every ``update_interval`` optimizer steps from ``start_at`` until ``stop_at``, each layer drops its
    ``f(t) · n_live`` smallest-magnitude live weights and grows new ones where ``grow_scores`` is largest.
    Layer densities stay fixed, or move between layers with ``redistribution``.

    The update reads the fully accumulated, all-reduced and unscaled gradient (``on_before_optimizer_step``).
    If the gradients of an update step are not finite (an fp16 overflow, which the GradScaler skips), the
    update waits for the next finite step.

    Besides the options of ``SparseTraining``:

    Args:
        update_interval: ΔT, optimizer steps between mask updates (>= 1).
        drop_fraction: α, the fraction of each layer's live weights exchanged by an update at step 0; the
            schedule lowers it from there (at step t < T_end: α/2·(1 + cos(π·t/(T_end - t_0))) for "cosine").
        drop_schedule: how the fraction decays: "cosine", "constant" (α throughout), "linear" (α at the first
            update t_0, then α·(1 - (t - t_0)/(T_end - t_0)), the official linear anneal).
        start_at: t_0, the first update step (the official ``maskupdate_begin_step``); updates then follow at
            t_0 + ΔT, t_0 + 2ΔT, ... before T_end, and the schedule decays over T_end - t_0 steps, as in the
            official code (cosine from the raw step t, linear from t_0). An int is a step, a float in [0, 1) a
            fraction of the run. None (the default): the first update is at ΔT, after the random mask has
            trained, and the schedule decays over T_end; 0: the first update is at step 0, as in the official
            code's default.
        stop_at: T_end, from which masks stay fixed: a float in (0, 1] is a fraction of the run's total
            optimizer steps (``trainer.estimated_stepping_batches``); an int is an absolute step.
        grow_init: value of new connections: "zeros"; "normal" (std of the layer's current weights);
            "uniform" (within ±mean |w| of the layer), as in the official implementation.
        redistribution: how the layers share the grown connections: "none" (each layer grows what it
            dropped: densities stay); "gradient" (RigL-SG: in proportion to the layer's mean |gradient| over
            its live weights); "momentum" (RigL-SM: its mean |momentum| over live weights: SGD's momentum
            buffer or Adam's first moment, else a moving average of the dense gradient kept by the callback).
            The global live count stays exactly the target; every layer keeps between 1 and all of its weights.
        update_placement: "before_step": the update's optimizer step trains the new mask; "skip_step": the
            update replaces that optimizer step (the official TensorFlow RigL), which then changes no weight.

    Raises:
        ValueError: any option outside the ranges above; ``start_at`` not before ``stop_at``, both given as steps
            (at fit start; as fractions of a run too short for an update, a warning).
    """

    reads_gradients: ClassVar[bool] = True
    supports_structure: ClassVar[bool] = True
    grows_by_gradient: ClassVar[bool] = False  # growth reads the dense gradient at update steps (RigL)

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
        structure: str | None = None,
        start: str = "random",
        calibration_batches: int = 8,
        update_interval: int = 100,
        drop_fraction: float = 0.3,
        drop_schedule: str = "cosine",
        start_at: int | float | None = None,  # int first: LightningCLI tries a union in order, and 75000 is a step
        stop_at: int | float = 0.75,
        grow_init: str = "zeros",
        redistribution: str = "none",
        update_placement: str = "before_step",
        rewind_step: int | None = None,
        seed: int = 0,
        kernels: str = "dense",
        live_step: bool = True,
    ) -> None:
        super().__init__(sparsity, distribution, dense=dense, include=include, exclude=exclude,
                         custom_sparsity=custom_sparsity, erk_power_scale=erk_power_scale, structure=structure,
                         start=start, calibration_batches=calibration_batches, rewind_step=rewind_step,
                         seed=seed, kernels=kernels, live_step=live_step)
        if isinstance(update_interval, bool) or not isinstance(update_interval, int) or update_interval < 1:
            raise ConfigError(f"update_interval must be an int >= 1 (optimizer steps), got {update_interval!r}.")
        if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or not 0 < drop_fraction <= 1:
            raise ConfigError(f"drop_fraction must be a fraction in (0, 1], got {drop_fraction!r}.")
        _check_choice("drop_schedule", drop_schedule, DROP_SCHEDULES)
        if start_at is not None:
            check_step_or_fraction("start_at", start_at, allow_zero=True)
        check_step_or_fraction("stop_at", stop_at, allow_zero=False)
        _check_choice("grow_init", grow_init, GROW_INITS)
        _check_choice("redistribution", redistribution, REDISTRIBUTIONS)
        _check_choice("update_placement", update_placement, UPDATE_PLACEMENTS)
        if self.structure is not None and redistribution != "none":
            raise ConfigError(f"redistribution={redistribution!r} moves live weights between layers, which a structure "
                              f"({self.structure}) fixes per layer. Use redistribution='none' or leave structure unset.")
        self.update_interval = update_interval
        self.drop_fraction = float(drop_fraction)
        self.drop_schedule = drop_schedule
        self.start_at = start_at
        self.stop_at = stop_at
        self.grow_init = grow_init
        self.redistribution = redistribution
        self.update_placement = update_placement
        self.momentum = DEFAULT_MOMENTUM
        self.start_step = 0
        self.stop_step = 0
        self.moving_average: dict[str, Tensor] | None = None  # of the dense gradient, where the method needs one
        self._pending_step: int | None = None  # an update step still waiting for finite gradients

    # ------------------------------------------------------------------------------------------ policy

    @abstractmethod
    def grow_scores(self, name: str, param: nn.Parameter, step: int, layer_index: int) -> Tensor:
        """Scores of the parameter's shape; the largest among positions not kept grow. Only read."""

    def change_mask(self, name: str, weights: Tensor, scores: Tensor, n_drop: int, n_grow: int) -> MaskChange:
        """Drop ``n_drop`` of the layer's live weights and grow ``n_grow`` by ``scores``, in ``masks[name]``: the
        smallest |w| go, the largest scores not kept come (within the structure). A method with another rule
        for which connections change (SRigL's ablation) overrides this."""
        return drop_and_grow(self.masks[name], weights, scores, n_drop, n_grow, self.layer_structure(name))

    def densities_move(self) -> bool:
        """Whether updates change layer densities (then logged at every update): under redistribution."""
        return self.redistribution != "none"

    @override
    def per_weight_state(self) -> list[dict[str, Tensor]]:
        return super().per_weight_state() + ([] if self.moving_average is None else [self.moving_average])

    @override
    def reads_dense_gradient(self, step: int) -> bool:
        # The moving average reads it every step until T_end. An update step reads it where growth or "gradient"
        # redistribution does, and wherever its optimizer step trains the new mask: grown weights take their
        # gradient from it.
        if self.moving_average is not None:
            return True
        if not (self.grows_by_gradient or self.redistribution == "gradient" or self.update_placement == "before_step"):
            return False
        return self._pending_step is not None or is_update_step(step, self.update_interval, self.start_step,
                                                                self.stop_step)

    @override
    def may_change_masks(self, step: int) -> bool:
        return self._pending_step is not None or is_update_step(step, self.update_interval, self.start_step,
                                                                self.stop_step)

    @override
    def why_not_sparse_kernels(self, optimizer: torch.optim.Optimizer) -> str | None:
        if self.needs_moving_average(optimizer):
            return (f"{type(self).__name__} keeps a moving average of the dense gradient, which it reads at every "
                    "step until stop_at")
        return None

    def needs_moving_average(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the callback keeps a moving average of the dense gradient (``moving_average``), updated at
        every optimizer step until T_end: for redistribution="momentum" when the optimizer keeps no momentum."""
        return self.redistribution == "momentum" and _momentum_key(optimizer) is None

    # ------------------------------------------------------------------------------------------- hooks

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        optimizer = trainer.optimizers[0]
        if not self.needs_moving_average(optimizer) or self._updates_done(trainer.global_step):
            self.moving_average = None
        elif self.moving_average is None:
            self.moving_average = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self._params.items()}

    @override
    def update_masks(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        if is_update_step(step, self.update_interval, self.start_step, self.stop_step):
            self._pending_step = step
        if self.moving_average is not None and self._updates_done(step):
            self.moving_average = None  # masks are final: nothing reads it any more
        if self._pending_step is None and self.moving_average is None:
            return
        if not gradients_ready(optimizer):
            if self._pending_step is not None:
                rank_zero_warn(f"Mask update of step {self._pending_step} postponed: gradients at step {step} "
                               "are missing or not finite.")
            return
        if self.moving_average is not None:
            self._track_gradients()
        if self._pending_step is not None:
            self._update(trainer, optimizer, self._pending_step)
            self._pending_step = None
            if self.update_placement == "skip_step":
                _skip_optimizer_step(optimizer)

    @override
    def saved_tensors(self) -> dict[str, dict[str, Tensor]]:
        tensors = super().saved_tensors()
        return tensors if self.moving_average is None else {**tensors, "moving_average": self.moving_average}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pending_step": self._pending_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_step = state_dict["pending_step"]
        self.moving_average = state_dict.get("moving_average")
        super().load_state_dict(state_dict)

    @override
    def _place_restored_state(self, step: int | None) -> None:
        if self.moving_average is not None:  # restored from a checkpoint: whole, on the CPU
            self.moving_average = {name: shard_like(self.moving_average[name], p) for name, p in self._params.items()}
        super()._place_restored_state(step)

    # ----------------------------------------------------------------------------------------- helpers

    @override
    def _check_fit(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        super()._check_fit(trainer, optimizer)
        total = trainer.estimated_stepping_batches
        self.stop_step = resolve_step("stop_at", self.stop_at, total)
        explicit = self.start_at is not None
        self.start_step = resolve_step("start_at", self.start_at, total) if explicit else self.update_interval
        if self.start_step >= self.stop_step:
            message = (f"start_at (step {self.start_step}) is not before stop_at (step {self.stop_step}): no mask will "
                       "be updated. Start earlier or stop later.")
            if not isinstance(self.start_at, float) and isinstance(self.stop_at, int):
                raise ConfigError(message)
            rank_zero_warn(message)  # fractions of a very short run: the settings are fine, the run is short

    def _updates_done(self, step: int) -> bool:
        """T_end is reached and no postponed update is left."""
        return step >= self.stop_step and self._pending_step is None

    def _track_gradients(self) -> None:
        # An exponential moving average of the dense gradient: m ← β·m + (1 - β)·g, before g is masked.
        self.dense_gradient_read = True
        for name, param in self._params.items():
            average = local(self.moving_average[name])
            average.lerp_(local(dense_gradient(name, param)).to(average.dtype), 1.0 - self.momentum)

    def _update(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, step: int) -> None:
        decay_from = 0 if self.start_at is None else self.start_step
        fraction = drop_fraction(step, self.drop_fraction, self.stop_step, self.drop_schedule, decay_from)
        self.dense_gradient_read |= self.grows_by_gradient
        # Layers the configuration keeps dense (dense patterns, uniform's first layer, ER/ERK overflow) stay so.
        names = [name for name in self._params if self.targets[name] < 1.0]
        numel = [self._params[name].numel() for name in names]
        live = [live_count(n, self.densities[name]) for name, n in zip(names, numel)]
        drops = [int(fraction * n) for n in live]
        grows = drops
        if self.redistribution != "none" and names:
            shares = []
            for name in names:
                with self.whole_layer(name) as whole:
                    shares.append(self._share(name, whole, self._params[name], optimizer))
            grows = grow_counts(live, drops, numel, shares)
        counts = {name: (n, n_drop, n_grow) for name, n, n_drop, n_grow in zip(names, live, drops, grows)}

        def update_layer(index: int, name: str, whole: Tensor) -> int:
            n_live, n_drop, n_grow = counts[name]
            weights = whole.detach()
            scores = self.grow_scores(name, whole, step, index)
            change = self.change_mask(name, weights, scores, n_drop, n_grow)
            values = self._grow_values(weights, change, step, index)
            param = self._params[name]
            apply_change(param, change, optimizer, values)
            self.densities[name] = (n_live - change.removed.numel() + change.added.numel()) / param.numel()
            return change.added.numel()

        changing = [name for name, (_, n_drop, n_grow) in counts.items() if n_drop or n_grow]
        changed = sum(self.for_each_whole_layer(update_layer, changing).values())
        self.num_updates += 1
        self.check_agreement(trainer.global_step)
        metrics = {"sparsity/drop_fraction": fraction, "sparsity/changed": float(changed)}
        if self.densities_move():
            metrics.update(self.density_metrics())
        self._log(trainer, metrics)

    def _share(self, name: str, whole: Tensor, param: nn.Parameter, optimizer: torch.optim.Optimizer) -> float:
        """The layer's redistribution statistic: mean |gradient| or |momentum| over its live weights, read inside
        ``whole_layer`` (``whole``: the weight it yields, ``param``: the parameter the optimizer knows)."""
        if self.redistribution == "gradient":
            return mean_magnitude(dense_gradient(name, whole), self.masks[name])
        if self.moving_average is not None:
            return mean_magnitude(self.moving_average[name], self.masks[name])
        momentum = optimizer.state.get(param, {}).get(_momentum_key(optimizer))
        return 0.0 if momentum is None else mean_magnitude(gather(momentum), self.masks[name])  # none before step 1

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


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"Unknown {option} {value!r}: use one of {choices}.")


def _momentum_key(optimizer: torch.optim.Optimizer) -> str | None:
    """The optimizer-state entry holding a parameter's momentum: SGD's (and RMSprop's) ``momentum_buffer``
    when momentum > 0, the Adam family's first moment ``exp_avg``; None for optimizers without one."""
    groups = optimizer.param_groups
    if any(group.get("momentum", 0) for group in groups):
        return "momentum_buffer"
    if any("betas" in group for group in groups):
        return "exp_avg"
    return None


def _skip_optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """Make this iteration's optimizer step a no-op: PyTorch optimizers leave parameters without a gradient
    untouched (no step, no weight decay, no momentum, no step count), exactly as after ``zero_grad``."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
