"""The training order: a permutation drawn from the seed and the epoch alone, so a resumed run sees the batches
the uninterrupted run would have seen, with one process or many; and a training loader whose position in the
epoch goes into checkpoints, so that a run resumed in the middle of an epoch takes up the same batches."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from lightning_rigl.data.augment import ExampleKey, takes_example_keys
from lightning_rigl.errors import ConfigError

if TYPE_CHECKING:
    from pytorch_lightning.loops.fit_loop import _FitLoop


class EpochShuffle(DistributedSampler):
    """Each epoch, a permutation of the dataset drawn from ``seed + epoch`` (as ``DistributedSampler`` draws it),
    of which this process takes every ``num_replicas``-th index starting at ``rank``; when the dataset does not
    divide evenly, the first indices are repeated so that every process gets as many.

    Plain shuffling draws from the global random state, which a checkpoint does not hold, so a resumed run would
    see other batches. Lightning keeps a ``DistributedSampler`` it finds in a loader (it inserts none of its own,
    whatever ``use_distributed_sampler`` says) and calls ``set_epoch`` on it; but a resumed run's loader is
    iterated (and, with worker processes, its first indices drawn) before that call, so the epoch is read from
    ``epoch_of`` when iteration starts.

    Args:
        dataset: the training set.
        num_replicas, rank: the number of processes sharing each epoch and this one's rank among them; None:
            from the initialized process group, else 1 and 0. In a Trainer, use :func:`training_order`.
        seed: the base seed, by default the one ``seed_everything`` set (``PL_GLOBAL_SEED``), as for the
            ``DistributedSampler`` Lightning would insert.
        epoch_of: the epoch (0-based) whose order iteration starts; None: the one ``set_epoch`` last gave.
        keys: yield :class:`~lightning_rigl.data.augment.ExampleKey` items (index, epoch, seed) instead of bare
            indices, for a dataset that augments each example as a function of them
            (:class:`~lightning_rigl.data.augment.Transformed`).
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None,
                 seed: int | None = None, epoch_of: Callable[[], int] | None = None, keys: bool = False) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.epoch_of = epoch_of
        self.keys = keys
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, done: int) -> None:
        """Make iterations of ``epoch`` start after the first ``done`` indices of this process's share (those a run
        resumed in the middle of that epoch has trained on already); iterations of later epochs are whole."""
        self._resume = (epoch, done)

    def __iter__(self) -> Iterator[int] | Iterator[ExampleKey]:
        if self.epoch_of is not None:
            self.set_epoch(self.epoch_of())
        indices = super().__iter__()
        if self._resume is not None and self.epoch > self._resume[0]:
            self._resume = None
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = itertools.islice(indices, self._resume[1], None)
        if self.keys:
            epoch, seed = self.epoch, self.seed
            return (ExampleKey(index, epoch, seed) for index in indices)
        return indices


class TrainingLoader(DataLoader):
    """A ``DataLoader`` of ``training_order``'s order that Lightning checkpoints with the run: its position (the
    epoch and the batches of it trained on) goes into every checkpoint, and a run resumed from a checkpoint taken
    in the middle of an epoch takes up that epoch's remaining batches in the uninterrupted run's order (Lightning
    2.x saves and restores loaders with ``state_dict`` / ``load_state_dict``; a plain loader would restart the
    epoch's order, with a warning). With one process, with loader workers, and under DDP.

    Args:
        dataset: the training set.
        trainer: the trainer that fits on it (``self.trainer`` in a data module or LightningModule).
        batch_size: examples per batch, per process.
        loader_options: any other ``DataLoader`` option but ``sampler``, ``shuffle`` and ``batch_sampler``.
    """

    def __init__(self, dataset: Dataset, trainer: pl.Trainer, batch_size: int = 1, **loader_options: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=training_order(dataset, trainer), **loader_options)
        self.trainer = trainer

    def state_dict(self) -> dict[str, int]:
        """The epoch begun last and the batches of it this process has finished, from the fit loop (at an epoch's
        end as well as in its middle)."""
        loop = self.trainer.fit_loop
        return {"epoch": loop.epoch_progress.current.started - 1,
                "batches": loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        assert isinstance(self.sampler, EpochShuffle)
        self.sampler.resume_at(state["epoch"], state["batches"] * self.batch_size)


def training_order(dataset: Dataset, trainer: pl.Trainer | None) -> EpochShuffle:
    """The sampler of ``trainer``'s training loader: this process's share (as the strategy's data-parallel
    processes split it), epochs counted by the trainer's fit loop; keys instead of indices for a dataset that
    takes them (:func:`~lightning_rigl.data.augment.takes_example_keys`).

    Raises:
        ConfigError: ``dataset`` is a ``Subset`` of a dataset that takes keys (it would get plain indices).
    """
    if isinstance(dataset, Subset) and takes_example_keys(dataset.dataset):
        raise ConfigError("The training set is a Subset of a dataset that augments by example key: the Subset hands it "
                          "plain indices, so its augmentation would draw from the global random state. Wrap the "
                          "Subset instead: Transformed(Subset(images, indices), transform).")
    keys = takes_example_keys(dataset)
    if trainer is None:
        return EpochShuffle(dataset, keys=keys)
    share = trainer.distributed_sampler_kwargs or {"num_replicas": 1, "rank": 0}
    return EpochShuffle(dataset, num_replicas=share["num_replicas"], rank=share["rank"],
                        epoch_of=lambda: _epoch_to_draw(trainer.fit_loop), keys=keys)


def _epoch_to_draw(fit_loop: _FitLoop) -> int:
    """The epoch whose order the training loader is about to draw: the count Lightning hands to ``set_epoch``
    (epochs begun and run through), except in a run resumed from a checkpoint saved after an epoch's last batch
    but before the epoch's end (``ModelCheckpoint(every_n_train_steps=...)`` landing there). Lightning creates
    that run's iterator before it counts the finished epoch, so the count is one short."""
    epochs = fit_loop.epoch_progress.current
    finished_uncounted = (fit_loop.restarting and fit_loop.epoch_loop.batch_progress.is_last_batch
                          and epochs.processed < epochs.started)
    return epochs.processed + 1 if finished_uncounted else epochs.processed
