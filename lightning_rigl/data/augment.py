"""Augmentation that is a function of the run's seed, the epoch and the example's index alone: an example is
augmented the same way whatever the point a run resumed from, the number of loader workers and the number of
processes.

Random transforms (torchvision's ``RandomCrop``, ``RandomResizedCrop``, ``RandomHorizontalFlip``, ...) draw from the
process's global random state: in the main process, one that every earlier example and training step advanced; in a
loader worker, one seeded at iterator creation from a base seed the main process draws. Neither is in a checkpoint,
and both depend on how the examples were spread over the workers. :class:`Transformed` runs the transform with the
global generators seeded from the example's :class:`ExampleKey`, which :class:`~lightning_rigl.data.order.EpochShuffle`
hands it in place of the bare index.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from lightning_rigl.seeding import key_seed, seed_global_generators


class ExampleKey(NamedTuple):
    """What the training order hands a dataset that takes keys: the example's index in the dataset, the epoch
    (0-based) it is drawn in, and the run's seed."""

    index: int
    epoch: int
    seed: int


def takes_example_keys(dataset: Dataset) -> bool:
    """Whether ``dataset`` asks the training order for :class:`ExampleKey` items instead of indices (a class
    attribute ``takes_example_keys = True``, as :class:`Transformed` has)."""
    return bool(getattr(dataset, "takes_example_keys", False))


@contextmanager
def seeded_randomness(key: ExampleKey) -> Iterator[None]:
    """Runs the block with torch's CPU generator, Python's ``random`` and NumPy's global generator seeded from
    ``key`` alone.

    In the main process the three states are put back afterwards, so training draws as if the block had not run.
    A loader worker's are left as the block leaves them: nothing else of the run draws from them, and NumPy's
    state takes about 0.1 ms to save and restore, about half a CIFAR image's augmentation.
    """
    in_worker = get_worker_info() is not None
    saved = None if in_worker else (torch.get_rng_state(), random.getstate(), np.random.get_state())
    seed_global_generators(key_seed(b"lightning_rigl/x", key.seed, key.epoch, key.index))
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class Transformed(Dataset):
    """``dataset``'s ``(input, target)`` items with ``transform`` applied to the input.

    Served through :class:`~lightning_rigl.data.order.TrainingLoader` (or any loader whose sampler is
    :func:`~lightning_rigl.data.order.training_order`), it is indexed by :class:`ExampleKey` and the transform draws
    its random numbers from generators seeded by the run's seed, the epoch and the example's index alone
    (:func:`seeded_randomness`). Indexed by a plain int (evaluation loaders), the transform runs as it is: use it
    there only for transforms that draw nothing.

    Args:
        dataset: a map-style dataset of ``(input, target)`` pairs (torchvision's datasets without a transform, a
            ``Subset`` of one, ...).
        transform: applied to each input; its randomness must come from torch, Python's ``random`` or NumPy's
            global generator (torchvision's transforms draw from torch's).
    """

    takes_example_keys = True

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: ExampleKey | int) -> tuple[Any, Any]:
        keyed = isinstance(key, ExampleKey)
        image, target = self.dataset[key.index if keyed else key]
        with seeded_randomness(key) if keyed else nullcontext():
            return self.transform(image), target
