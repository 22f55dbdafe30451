"""What every data module shares: argument checks, the loaders, and the seeded validation hold-out."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_rigl.data.augment import Transformed
from lightning_rigl.data.order import TrainingLoader, training_order
from lightning_rigl.errors import ConfigError


def default_download_dir() -> Path:
    """Where downloads go when ``data_dir`` is unset: ``$XDG_CACHE_HOME/lightning_rigl`` (``~/.cache/...``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning_rigl"


class DataModule(pl.LightningDataModule):
    """Serves the train, validation and test sets (of images, of token windows) that a subclass builds in
    ``_fit_sets`` and ``_test_set``.

    The training loader's order is a function of the seed and the epoch alone (:class:`EpochShuffle`, which
    shards it among DDP processes), so a resumed run sees the batches the uninterrupted one would have. The
    validation and test loaders add no sampler: under DDP, Lightning inserts a ``DistributedSampler`` itself.
    ``batch_size`` is per process. Without a validation set ``val_dataloader`` returns ``[]``, which Lightning
    reads as zero validation batches: it skips validation, after one warning ("Total length of `list` across
    ranks is zero") when the model has a ``validation_step``.

    Args:
        data_dir: the dataset's folder; each subclass says what it must hold and what ``None`` means.
        batch_size: examples per batch and per process (DDP rank), >= 1.
        num_workers: loader worker processes per process, >= 0 (0 loads in the main process).

    Raises:
        ConfigError: ``batch_size`` < 1 or ``num_workers`` < 0.
    """

    num_classes: int

    def __init__(self, data_dir: str | None, batch_size: int, num_workers: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}.")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}.")
        self.data_dir = None if data_dir is None else Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _fit_sets(self) -> tuple[Dataset, Dataset | None]:
        """The training set and the validation set (None: no validation)."""
        raise NotImplementedError

    def _test_set(self) -> Dataset:
        raise NotImplementedError

    @property
    def has_test_split(self) -> bool:
        """Whether the data holds a test split (one held out by a fraction may be set to none)."""
        return True

    def setup(self, stage: str) -> None:
        # Lightning calls setup once per trainer.fit/validate/test: build each split only once, and only the
        # splits the stage needs (listing ImageNet's train folder alone takes a while).
        if stage in ("fit", "validate") and self.train_set is None:
            self.train_set, self.val_set = self._fit_sets()
        if stage == "test" and self.test_set is None:
            self.test_set = self._test_set()

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("the data module is not set up: call setup() first (the Trainer does)")
        options: dict[str, Any] = {
            "batch_size": self.batch_size,
            "drop_last": False,
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            # Re-forking the workers every epoch costs seconds per epoch on small datasets.
            "persistent_workers": self.num_workers > 0,
        }
        if train and self.trainer is not None:
            return TrainingLoader(dataset, self.trainer, **options)
        return DataLoader(dataset, sampler=training_order(dataset, None) if train else None, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


def download(fetch: Callable[[], object], what: str, into: Path, instead: str) -> None:
    """Runs ``fetch`` (a torchvision download); a failed download (no network, a server or integrity error)
    becomes a ConfigError that says what failed and ``instead``, what to do without the network.

    Raises:
        ConfigError: the download failed.
    """
    try:
        fetch()
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError; torchvision's checks raise RuntimeError
        reason = str(getattr(error, "reason", "") or error).strip() or type(error).__name__
        raise ConfigError(f"could not download {what} into {into} ({reason}). {instead}") from None


def hold_out(size: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training and validation parts of ``range(size)``, ``val_size`` of them for validation.

    A generator seeded only by ``seed`` draws the split, so every run and every DDP rank holds out the same
    images.
    """
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return order[val_size:], order[:val_size]


class HoldOutDataModule(DataModule):
    """A data module whose validation set, if any, is held out from the training split.

    Training images go through ``_train_transform`` (augmentation, as a function of the run's seed, the epoch and
    the image's index alone: :class:`~lightning_rigl.data.augment.Transformed`), held-out images through
    ``_eval_transform``, so validation sees no augmentation.

    Args:
        data_dir, batch_size, num_workers: as in :class:`DataModule`.
        val_size: number of training images held out for validation, >= 0; 0 means no validation set.
        seed: seeds the hold-out split only (the shuffling and the augmentation follow ``seed_everything``).

    Raises:
        ConfigError: ``val_size`` < 0 (here), or not smaller than the training split (at setup).
    """

    def __init__(self, data_dir: str | None, batch_size: int, num_workers: int, val_size: int, seed: int) -> None:
        super().__init__(data_dir, batch_size, num_workers)
        if val_size < 0:
            raise ConfigError(f"data.val_size must be >= 0 (0: no validation set), got {val_size}.")
        self.val_size = val_size
        self.seed = seed

    def _train_split(self) -> Dataset:
        """The training split as read, ``(input, target)`` items before any transform."""
        raise NotImplementedError

    def _train_transform(self) -> Callable[[Any], Any] | None:
        """The training inputs' transform; None: none."""
        return None

    def _eval_transform(self) -> Callable[[Any], Any] | None:
        """The held-out and test inputs' transform; None: none."""
        return None

    def _fit_sets(self) -> tuple[Dataset, Dataset | None]:
        split = self._train_split()
        if self.val_size == 0:
            return _transformed(split, self._train_transform()), None
        size = len(split)  # type: ignore[arg-type]
        if self.val_size >= size:
            raise ConfigError(f"data.val_size={self.val_size} leaves no training images: the training split has "
                              f"{size}; set data.val_size below that.")
        train_idx, val_idx = hold_out(size, self.val_size, self.seed)
        return (_transformed(Subset(split, train_idx.tolist()), self._train_transform()),
                _transformed(Subset(split, val_idx.tolist()), self._eval_transform()))


def _transformed(dataset: Dataset, transform: Callable[[Any], Any] | None) -> Dataset:
    """``dataset`` with ``transform`` applied to its inputs (:class:`Transformed`), or as it is when None."""
    return dataset if transform is None else Transformed(dataset, transform)
