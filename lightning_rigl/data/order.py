"""The training order: a permutation drawn from the seed and the epoch alone, so a resumed run sees the batches
the uninterrupted run would have seen, with one process or many."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytorch_lightning as pl
from torch.utils.data import Dataset, DistributedSampler


class EpochShuffle(DistributedSampler):
    """Each epoch, a permutation of the dataset drawn from ``seed + epoch`` (as ``DistributedSampler`` draws it),
    of which this process takes every ``num_replicas``-th index starting at ``rank``.

    Plain shuffling draws from the global random state, which a checkpoint does not hold, so a resumed run would
    see other batches. Lightning keeps a ``DistributedSampler`` it finds in a loader and calls ``set_epoch`` on it;
    but a resumed run's loader is iterated (and, with worker processes, its first indices drawn) before that
    call, so the epoch is read from ``epoch_of`` when iteration starts.

    Args:
        dataset: the training set.
        num_replicas, rank: the number of processes and this one's global rank.
        seed: the base seed, by default the one ``seed_everything`` set (``PL_GLOBAL_SEED``), as for the
            ``DistributedSampler`` Lightning would insert.
        epoch_of: the epoch (0-based) whose order iteration starts; None: the one ``set_epoch`` last gave.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int | None = None,
                 epoch_of: Callable[[], int] | None = None) -> None:
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.epoch_of = epoch_of

    def __iter__(self) -> Iterator[int]:
        if self.epoch_of is not None:
            self.set_epoch(self.epoch_of())
        return super().__iter__()


def training_order(dataset: Dataset, trainer: pl.Trainer | None) -> EpochShuffle:
    """The sampler of ``trainer``'s training loader: this process's share, epochs counted by its fit loop."""
    if trainer is None:
        return EpochShuffle(dataset)
    fit_loop = trainer.fit_loop
    # The count Lightning itself hands to set_epoch: epochs begun and run through, restored from a checkpoint.
    return EpochShuffle(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                        epoch_of=lambda: fit_loop.epoch_progress.current.processed)
