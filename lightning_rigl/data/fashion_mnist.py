"""Fashion-MNIST (Xiao et al., 2017) from its IDX files, held in memory as normalised tensors."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import TensorDataset
from torchvision.datasets import FashionMNIST

from lightning_rigl.data.base import HoldOutDataModule, default_download_dir, download
from lightning_rigl.data.idx import read_idx
from lightning_rigl.errors import ConfigError

_WHERE_TO_PUT = ("set --data.data_dir to a folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                 "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each may be .gz)")
# Debian's `dataset-fashion-mnist` installs the four gzipped IDX files here.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

# Pixel mean and standard deviation of the training images, on the [0, 1] scale.
MEAN, STD = 0.2860, 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_files(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in ``directory`` by name, each plain or gzipped; None when any is missing."""
    found = {}
    for name in (name for pair in _FILES.values() for name in pair):
        path = next((p for p in (directory / name, directory / f"{name}.gz") if p.is_file()), None)
        if path is None:
            return None
        found[name] = path
    return found


def load_tensors(images_path: Path, labels_path: Path) -> TensorDataset:
    """A Fashion-MNIST split from its two IDX files: images (N, 1, 28, 28) float32, normalised by the dataset's
    mean and std, and int64 labels (N,).

    Raises:
        ValueError: files that do not hold N images of 28 × 28 pixels and N labels.
    """
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise ValueError(f"{images_path} {tuple(images.shape)} and {labels_path} {tuple(labels.shape)} do not "
                         "form a Fashion-MNIST split of (N, 28, 28) images and N labels")
    pixels = images.unsqueeze(1).float().div_(255).sub_(MEAN).div_(STD)
    return TensorDataset(pixels, labels.long())


class FashionMNISTDataModule(HoldOutDataModule):
    """Fashion-MNIST: 60,000 training and 10,000 test images of 28 × 28 grey pixels in 10 classes.

    The whole dataset (about 220 MB as float32) sits in memory, normalised once; there is no augmentation.

    Args:
        data_dir: folder with the IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``), or the root
            torchvision downloads into (files in ``<data_dir>/FashionMNIST/raw``). None: Debian's
            ``/usr/share/datasets/fashion-mnist``, else ``~/.cache/lightning_rigl``.
        batch_size: images per batch and per process (DDP rank).
        num_workers: loader worker processes; 0 by default because the tensors are already in memory and
            worker processes would only add copying.
        val_size: training images held out for validation (0: no validation).
        seed: seeds the hold-out split.
        download: fetch the files with torchvision (into ``data_dir`` or ``~/.cache/lightning_rigl``) when
            they are not found.

    Raises:
        ConfigError: bad arguments (here); files missing with ``download`` off (at setup).
    """

    num_classes = 10

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 0,
        seed: int = 0,
        download: bool = False,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_size, seed)
        self.download = download

    def _download_root(self) -> Path:
        return self.data_dir if self.data_dir is not None else default_download_dir()

    def _candidate_dirs(self) -> list[Path]:
        torchvision_dir = self._download_root() / "FashionMNIST" / "raw"
        return [self.data_dir if self.data_dir is not None else DEBIAN_DIR, torchvision_dir]

    def _find_files(self) -> dict[str, Path] | None:
        return next((files for d in self._candidate_dirs() if (files := _idx_files(d)) is not None), None)

    def prepare_data(self) -> None:
        if self.download and self._find_files() is None:
            root = self._download_root()
            download(lambda: FashionMNIST(str(root), download=True), "Fashion-MNIST", root,
                     f"Without a network, {_WHERE_TO_PUT}")

    def _load(self, split: str) -> TensorDataset:
        files = self._find_files()
        if files is None:
            searched = " and ".join(str(d) for d in self._candidate_dirs())
            # Debian's package only helps a user who named no folder.
            debian = "" if self.data_dir is not None else "install Debian's package (apt-get install " \
                "dataset-fashion-mnist), or "
            raise ConfigError(
                f"Fashion-MNIST IDX files not found in {searched}. Either {debian}{_WHERE_TO_PUT}, or set "
                f"--data.download true to fetch them into {self._download_root()}."
            )
        image_name, label_name = _FILES[split]
        return load_tensors(files[image_name], files[label_name])

    def _train_split(self) -> TensorDataset:
        return self._load("train")  # no augmentation: training and validation read the same tensors

    def _test_set(self) -> TensorDataset:
        return self._load("test")
