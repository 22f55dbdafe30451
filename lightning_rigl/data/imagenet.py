"""ImageNet (ILSVRC-2012) or any dataset in the same two-folder layout, read with torchvision's ImageFolder."""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets, transforms

from lightning_rigl.data.augment import Transformed
from lightning_rigl.data.base import DataModule
from lightning_rigl.errors import ConfigError

# Per-channel pixel mean and std of ImageNet's training images, on the [0, 1] scale.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def class_folders(path: Path) -> list[str]:
    """The sub-folder names of ``path``, sorted: ImageFolder's classes, in label order."""
    return sorted(entry.name for entry in path.iterdir() if entry.is_dir())


class ImageNetDataModule(DataModule):
    """ImageFolder trees ``<data_dir>/train/<class>/*.JPEG`` and ``<data_dir>/val/<class>/*.JPEG``.

    Training images get a random resized crop of ``image_size`` pixels and a random horizontal flip, drawn from
    the run's seed, the epoch and the image's index alone (:class:`~lightning_rigl.data.augment.Transformed`);
    validation images are resized to ``image_size · 256/224`` pixels on their short side and centre-cropped to
    ``image_size``. Both are normalised by ImageNet's per-channel mean and std.

    The ``val`` folder serves both validation and test, as in the RigL paper, which reports accuracy on the
    ILSVRC-2012 validation set. There is no hold-out from the training folder, hence no ``val_size``.

    Args:
        data_dir: the folder holding ``train`` and ``val``; required. The 50,000 validation images of the
            ILSVRC-2012 archive come in one flat folder: sort them into one folder per class first.
        batch_size: images per batch and per process (DDP rank).
        num_workers: loader worker processes per process; JPEG decoding and cropping needs many.
        image_size: side of the square crops fed to the network, in pixels.
        num_classes: number of class folders expected in ``train`` and ``val``.

    Raises:
        ConfigError: no ``data_dir`` or bad arguments (here); a missing folder, a class count other than
            ``num_classes``, different classes in ``train`` and ``val``, or a class folder without images
            (at setup).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        num_workers: int = 8,
        image_size: int = 224,
        num_classes: int = 1000,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers)
        if data_dir is None:
            raise ConfigError("ImageNetDataModule needs --data.data_dir: the folder that holds train/ and val/.")
        if image_size < 1:
            raise ConfigError(f"data.image_size must be >= 1 pixel, got {image_size}.")
        if num_classes < 2:
            raise ConfigError(f"data.num_classes must be >= 2, got {num_classes}.")
        self.image_size = image_size
        self.num_classes = num_classes

    def _check_layout(self) -> None:
        assert self.data_dir is not None  # checked in __init__
        train_dir, val_dir = self.data_dir / "train", self.data_dir / "val"
        for folder in (train_dir, val_dir):
            if not folder.is_dir():
                raise ConfigError(f"{folder} does not exist: --data.data_dir must hold train/ and val/ folders.")
        train_classes = class_folders(train_dir)
        if len(train_classes) != self.num_classes:
            raise ConfigError(f"found {len(train_classes)} class folders in {train_dir}, expected "
                              f"{self.num_classes}: set data.num_classes to {len(train_classes)}.")
        # ImageFolder numbers classes by sorted name per tree: any difference would shift val labels silently.
        if class_folders(val_dir) != train_classes:
            raise ConfigError(f"{val_dir} must hold the same class folders as {train_dir}; the flat ILSVRC-2012 "
                              "validation images must be sorted into one folder per class.")

    def _folder(self, split: str, transform: transforms.Compose | None = None) -> datasets.ImageFolder:
        assert self.data_dir is not None  # checked in __init__
        try:
            return datasets.ImageFolder(str(self.data_dir / split), transform=transform)
        except FileNotFoundError as error:  # a class folder without any image file
            raise ConfigError(f"{error}; every class folder of {self.data_dir / split} needs images.") from error

    def _train_transform(self) -> transforms.Compose:
        return transforms.Compose([
            transforms.RandomResizedCrop(self.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ])

    def _eval_transform(self) -> transforms.Compose:
        return transforms.Compose([
            transforms.Resize(int(self.image_size * 256 / 224)),  # 256 for 224: the usual 0.875 crop ratio
            transforms.CenterCrop(self.image_size),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ])

    def _fit_sets(self) -> tuple[Transformed, datasets.ImageFolder]:
        val_set = self._test_set()  # checks the layout first
        return Transformed(self._folder("train"), self._train_transform()), val_set

    def _test_set(self) -> datasets.ImageFolder:
        self._check_layout()
        return self._folder("val", self._eval_transform())
