"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) through torchvision, with the standard crop-and-flip augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torchvision import datasets, transforms

from lightning_rigl.data.augment import Transformed
from lightning_rigl.data.base import HoldOutDataModule, default_download_dir, download
from lightning_rigl.errors import ConfigError


class CIFARDataModule(HoldOutDataModule):
    """A CIFAR dataset of 50,000 training and 10,000 test images of 32 × 32 RGB pixels, read by torchvision.

    Training images get a random 32 × 32 crop of the image padded by 4 pixels of zeros and a random horizontal
    flip, drawn from the run's seed, the epoch and the image's index alone (so a resumed run, and a run with
    another number of loader workers, augments each image as the uninterrupted one does); every image is then
    scaled to [0, 1] and normalised per channel by the training split's mean and std. Validation (held out from
    the training split) and test images are only normalised.

    Args:
        data_dir: the folder holding torchvision's extracted archive (``cifar-10-batches-py`` or
            ``cifar-100-python``), where ``download`` puts it. None: ``~/.cache/lightning_rigl``.
        batch_size: images per batch and per process (DDP rank).
        num_workers: loader worker processes per process; the PIL augmentation needs a few to keep up with
            a GPU.
        val_size: training images held out for validation (0: no validation; the reproducibility report
            holds out 5,000).
        seed: seeds the hold-out split.
        download: fetch and extract the archive (about 170 MB) when it is missing.

    Raises:
        ConfigError: bad arguments (here); the dataset missing with ``download`` off (at setup).
    """

    dataset_class: ClassVar[type[datasets.CIFAR10]]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        num_workers: int = 4,
        val_size: int = 0,
        seed: int = 0,
        download: bool = False,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_size, seed)
        self.download = download

    @property
    def root(self) -> Path:
        return self.data_dir if self.data_dir is not None else default_download_dir()

    def prepare_data(self) -> None:
        if self.download:
            name, folder = _names(self.dataset_class)
            download(lambda: self.dataset_class(str(self.root), train=True, download=True), name,
                     self.root, f"Without a network, put the extracted {folder} folder (from "
                     f"https://www.cs.toronto.edu/~kriz/cifar.html) in a folder, pass it with --data.data_dir and set "
                     "--data.download false.")

    def _eval_transform(self) -> transforms.Compose:
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def _train_transform(self) -> transforms.Compose:
        return transforms.Compose([
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])

    def _load(self, train: bool) -> datasets.CIFAR10:
        try:
            return self.dataset_class(str(self.root), train=train)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
            folder = self.root / self.dataset_class.base_folder
            raise ConfigError(
                f"{self.dataset_class.__name__} not found or corrupted in {folder}. Set --data.download true to "
                f"fetch it into {self.root}, or set --data.data_dir to the folder that holds "
                f"{self.dataset_class.base_folder}."
            ) from error

    def _train_split(self) -> datasets.CIFAR10:
        return self._load(train=True)

    def _test_set(self) -> Transformed:
        return Transformed(self._load(train=False), self._eval_transform())


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: 10 classes, 6,000 images each. Arguments as in :class:`CIFARDataModule`."""

    dataset_class = datasets.CIFAR10
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100: 100 fine classes, 600 images each. Arguments as in :class:`CIFARDataModule`."""

    dataset_class = datasets.CIFAR100
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)


def _names(dataset_class: type) -> tuple[str, str]:
    """The dataset's name and the folder its archive extracts to, for messages."""
    return getattr(dataset_class, "__name__", "CIFAR"), getattr(dataset_class, "base_folder", "dataset")
