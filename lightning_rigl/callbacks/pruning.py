"""Methods that start dense and only ever remove connections: what they share, and gradual magnitude pruning."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_rigl.callbacks.sparse_training import SparseTraining
from lightning_rigl.errors import ConfigError
from lightning_rigl.sparsity.criteria import magnitude
from lightning_rigl.sparsity.distributed_top_k import order_keys, top_k_over_processes
from lightning_rigl.sparsity.distributions import GLOBAL, global_live_total, live_count
from lightning_rigl.sparsity.masks import MaskChange, apply_change
from lightning_rigl.sparsity.schedules import check_step_or_fraction, cubic_sparsity, is_pruning_step, resolve_step
from lightning_rigl.sparsity.sharding import gather, is_sharded, local, local_positions
from lightning_rigl.sparsity.targets import resolve_patterns
from lightning_rigl.sparsity.selection import check_rankable
from lightning_rigl.sparsity.updates import prune, prune_globally

Scores = Callable[[str, nn.Parameter], Tensor]


class PruningFromDense(SparseTraining):
    """Starts dense (every mask all True, ``densities`` all 1) and prunes towards the targets, keeping the
    connections a score ranks highest: per layer under the distribution, or across all layers at once with
    ``distribution="global"`` (each layer keeps at least one connection). Masks only shrink.
    """

    supports_global: ClassVar[bool] = True
    supports_start: ClassVar[bool] = False  # it starts dense

    @override
    def start_densities(self) -> dict[str, float]:
        return dict.fromkeys(self.targets, 1.0)

    @override
    def why_not_sparse_kernels(self, optimizer: torch.optim.Optimizer) -> str | None:
        return (f"{type(self).__name__} starts dense, where sparse kernels only cost time; kernels='auto' moves each "
                "layer to them once it is sparse enough to gain")

    @override
    def _check_fit(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        super()._check_fit(trainer, optimizer)
        if self.distribution != GLOBAL:
            return
        sharded = {name: is_sharded(self._params[name]) for name in self._global_pool()}
        if any(sharded.values()) and not all(sharded.values()):
            raise ConfigError(
                "distribution='global' under FSDP2 ranks each process's rows of every layer, so every sparsified "
                "parameter must be sharded by fully_shard; these are not: "
                f"{[name for name, is_shard in sharded.items() if not is_shard]}. Apply fully_shard to the modules "
                "that hold them (or to the root module), or exclude them."
            )

    def prune_to(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, scores: Scores, fraction: float) -> None:
        """Prune every layer to ``fraction`` of its target sparsity (1: the targets), or, under "global", the
        whole selection to ``fraction`` of the sparsity; the highest ``scores(name, param)`` survive."""
        if self.distribution == GLOBAL:
            self._prune_globally(optimizer, scores, fraction)
        else:

            keep = {name: live_count(p.numel(), 1.0 - (1.0 - self.targets[name]) * fraction)
                    for name, p in self._params.items()}

            def prune_layer(index: int, name: str, whole: Tensor) -> None:
                param = self._params[name]
                apply_change(param, prune(self.masks[name], scores(name, whole), keep[name]), optimizer)
                self.densities[name] = keep[name] / param.numel()

            self.for_each_whole_layer(prune_layer, [name for name, p in self._params.items()
                                                    if keep[name] < live_count(p.numel(), self.densities[name])])
        self.num_updates += 1
        self.check_agreement(trainer.global_step)
        self._log(trainer, {"sparsity/target": fraction * self._target_sparsity(), **self.density_metrics()})

    def _global_pool(self) -> list[str]:
        """The layers ``distribution="global"`` ranks together: the sparsified ones outside ``dense``."""
        dense = resolve_patterns(list(self._params), self.dense, "dense")
        return [name for name in self._params if name not in dense]

    def _prune_globally(self, optimizer: torch.optim.Optimizer, scores: Scores, fraction: float) -> None:
        shapes = {name: tuple(p.shape) for name, p in self._params.items()}
        pool = self._global_pool()
        n_keep = global_live_total(shapes, self.sparsity * fraction, set(shapes) - set(pool))
        if n_keep >= sum(live_count(self._params[name].numel(), self.densities[name]) for name in pool):
            return
        if any(is_sharded(self._params[name]) for name in pool):
            changes = self._prune_shards_globally(pool, scores, n_keep)
        else:
            changes = prune_globally({name: self.masks[name] for name in pool},
                                     {name: scores(name, self._params[name]) for name in pool}, n_keep)
            for name in changes:
                self._record(name, self.masks[name])
        for name, change in changes.items():
            param = self._params[name]
            apply_change(param, change, optimizer)
            self.densities[name] = self.live_counts[name] / param.numel()

    def _prune_shards_globally(self, pool: list[str], scores: Scores, n_keep: int) -> dict[str, MaskChange]:
        """``prune_globally`` under FSDP2 without gathering the pool: each layer is gathered alone to score it
        (its best connection marked to survive), each process keeps its rows' live scores, and the ranking runs
        across the processes (``top_k_over_processes``). Changes hold whole-weight positions."""

        def score_layer(index: int, name: str, whole: Tensor) -> tuple[Tensor, Tensor]:
            """This process's rows of the layer: the keys of their live scores, and their whole-weight positions."""
            live = self.masks[name].view(-1).nonzero().squeeze(1)
            values = scores(name, whole).reshape(-1).take(live).to(torch.float64)
            check_rankable(values, name)  # the whole layer: every process raises alike
            values[values.argmax()] = math.inf  # each layer's best connection survives (the first, if tied)
            first, end = local_positions(self._params[name])
            here = (live >= first) & (live < end)
            return order_keys(values[here]), live[here]

        keys, positions = zip(*self.for_each_whole_layer(score_layer, pool).values())
        kept = top_k_over_processes(torch.cat(keys), n_keep, [p.numel() for p in positions], self._params[pool[0]])
        changes = {}
        for name, position, survives in zip(pool, positions, kept.split([p.numel() for p in positions])):
            removed = position[~survives]
            first = local_positions(self._params[name])[0]
            local(self.masks[name]).view(-1).index_fill_(0, removed - first, False)
            self._record(name, gather(self.masks[name]))
            changes[name] = MaskChange(removed=removed, added=removed.new_empty(0))
        return changes

    def _target_sparsity(self) -> float:
        """Fraction of zeros over all sparsified weights once the targets are reached."""
        total = sum(p.numel() for p in self._params.values())
        live = sum(live_count(p.numel(), self.targets[name]) for name, p in self._params.items())
        return 1.0 - live / total


class GradualMagnitudePruning(PruningFromDense):
    """Gradual magnitude pruning (Zhu & Gupta, 2018): dense at first; every ``update_interval`` optimizer steps
    from ``start_at`` to ``stop_at`` (both included) the smallest-magnitude live weights are removed so that
    the sparsity follows the cubic schedule s_t = s_f·(1 - (1 - (t - t_0)/(t_1 - t_0))³), reaching the target
    s_f exactly at ``stop_at``. Every layer follows it towards its own target under the distribution
    (uniform, ER, ERK, a mapping), or all layers are ranked together with ``distribution="global"``.

    With ``rewind_step=0`` the run keeps the initial weights, from which ``LotteryTicket`` retrains its mask.

    Example::

        trainer = pl.Trainer(max_steps=10_000, callbacks=[GradualMagnitudePruning(sparsity=0.9, rewind_step=0)])

    Besides the options of ``SparseTraining`` (``distribution`` may also be "global"):

    Args:
        update_interval: optimizer steps between pruning steps (>= 1). The reproducibility report prunes at
            RigL's ΔT = 100 for a fair comparison; the official CIFAR recipe every 1,000 steps.
        start_at: t_0, the first pruning step: a float in [0, 1) is a fraction of the run's optimizer steps,
            an int a step.
        stop_at: t_1, the last pruning step, where the target is reached: a float in (0, 1] or an int step.

    Raises:
        ValueError: an option outside the ranges above, or ``stop_at`` before ``start_at`` (at fit start). A
            ``stop_at`` past the end of the run is a warning: the target is not reached.
    """

    def __init__(self, *args: Any, update_interval: int = 100, start_at: int | float = 0.2,
                 stop_at: int | float = 0.75, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(update_interval, bool) or not isinstance(update_interval, int) or update_interval < 1:
            raise ConfigError(f"update_interval must be an int >= 1 (optimizer steps), got {update_interval!r}.")
        check_step_or_fraction("start_at", start_at, allow_zero=True)
        check_step_or_fraction("stop_at", stop_at, allow_zero=False)
        self.update_interval = update_interval
        self.start_at = start_at
        self.stop_at = stop_at
        self.start_step = 0
        self.stop_step = 0

    @override
    def _check_fit(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        super()._check_fit(trainer, optimizer)
        total = trainer.estimated_stepping_batches
        self.start_step = resolve_step("start_at", self.start_at, total)
        self.stop_step = resolve_step("stop_at", self.stop_at, total)
        if isinstance(self.stop_at, float):  # a fraction up to 1: the last step of the run at most
            self.stop_step = min(self.stop_step, int(total) - 1)
        if self.stop_step < self.start_step:
            raise ConfigError(f"stop_at (step {self.stop_step}) comes before start_at (step {self.start_step}); "
                              "pruning must end after it starts.")
        if self.stop_step >= total:  # a shortened run (a smoke test, say) is legitimate, but should say so
            rank_zero_warn(f"stop_at (step {self.stop_step}) is not within the run ({total} optimizer steps): the "
                           "target sparsity will not be reached. Stop earlier or train longer.")

    @override
    def may_change_masks(self, step: int) -> bool:
        return is_pruning_step(step, self.update_interval, self.start_step, self.stop_step)

    @override
    def update_masks(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        if is_pruning_step(step, self.update_interval, self.start_step, self.stop_step):
            fraction = cubic_sparsity(step, 1.0, self.start_step, self.stop_step)
            if fraction > 0:  # at t_0 the schedule is still at sparsity 0
                self.prune_to(trainer, optimizer, magnitude, fraction)
