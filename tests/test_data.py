"""The data modules on tiny datasets written in the real on-disk formats (see fake_datasets.py)."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from fake_datasets import (
    allow_fake_cifar,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_imagenet_folder,
)
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

from lightning_rigl.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    ExampleKey,
    FashionMNISTDataModule,
    ImageNetDataModule,
    Transformed,
)
from lightning_rigl.data import fashion_mnist as fashion_mnist_module
from lightning_rigl.data.order import EpochShuffle
from lightning_rigl.errors import ConfigError

CIFAR = [
    pytest.param(CIFAR10DataModule, write_cifar10, 10, id="cifar10"),
    pytest.param(CIFAR100DataModule, write_cifar100, 100, id="cifar100"),
]


def everything(loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of ``loader``, concatenated in its order."""
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def fashion_normalised(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> (N, 1, 28, 28), as the module must serve them."""
    return ((images.float() / 255 - 0.2860) / 0.3530).unsqueeze(1)


def cifar_normalised(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) -> normalised (N, 3, 32, 32): ToTensor + Normalize by hand."""
    pixels = images.permute(0, 3, 1, 2).float() / 255
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# --- Fashion-MNIST -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gzipped", [True, False], ids=["gz", "plain"])
def test_fashion_mnist_reads_idx_files_as_normalised_tensors(tmp_path: Path, gzipped: bool) -> None:
    written = write_fashion_mnist(tmp_path, n_train=12, n_test=6, gzipped=gzipped)
    dm = FashionMNISTDataModule(str(tmp_path), batch_size=5)
    assert dm.num_classes == 10
    dm.setup("fit")
    dm.setup("test")

    train_images, train_labels = dm.train_set.tensors
    assert train_images.shape == (12, 1, 28, 28) and train_images.dtype == torch.float32
    torch.testing.assert_close(train_images, fashion_normalised(written["train"][0]))
    assert torch.equal(train_labels, written["train"][1])

    test_images, test_labels = everything(dm.test_dataloader())
    torch.testing.assert_close(test_images, fashion_normalised(written["test"][0]))
    assert torch.equal(test_labels, written["test"][1]) and test_labels.dtype == torch.int64
    assert next(iter(dm.train_dataloader()))[0].shape == (5, 1, 28, 28)


def test_fashion_mnist_rejects_a_file_cut_short(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, gzipped=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        FashionMNISTDataModule(str(tmp_path)).setup("fit")


def test_fashion_mnist_without_data_dir_reads_debians_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_fashion_mnist(tmp_path / "debian", n_train=7)
    monkeypatch.setattr(fashion_mnist_module, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dm = FashionMNISTDataModule()
    dm.setup("fit")
    assert torch.equal(dm.train_set.tensors[1], written["train"][1])


def test_fashion_mnist_download_goes_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_torchvision_fashion_mnist(root: str, download: bool) -> None:
        calls.append((Path(root), download))
        write_fashion_mnist(Path(root) / "FashionMNIST" / "raw", n_train=9)  # where torchvision puts the files

    monkeypatch.setattr(fashion_mnist_module, "FashionMNIST", fake_torchvision_fashion_mnist)
    monkeypatch.setattr(fashion_mnist_module, "DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    dm = FashionMNISTDataModule(download=True)
    dm.prepare_data()
    assert calls == [(tmp_path / "cache" / "lightning_rigl", True)]
    dm.setup("fit")
    assert len(dm.train_set) == 9
    FashionMNISTDataModule(download=True).prepare_data()
    assert len(calls) == 1, "files already there: no second download"


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fashion_mnist_module, "DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for dm in (FashionMNISTDataModule(), FashionMNISTDataModule(str(tmp_path / "empty"))):
        dm.prepare_data()  # download off: must not fetch anything
        with pytest.raises(ConfigError) as error:
            dm.setup("fit")
        for fix in ("--data.data_dir", "--data.download true"):
            assert fix in str(error.value)
        # Debian's package helps only a user who named no folder.
        assert ("apt-get install dataset-fashion-mnist" in str(error.value)) == (dm.data_dir is None)


@pytest.mark.skipif(not fashion_mnist_module.DEBIAN_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_is_standardised() -> None:
    dm = FashionMNISTDataModule()
    dm.setup("fit")
    images, labels = dm.train_set.tensors
    assert images.shape == (60_000, 1, 28, 28)
    assert abs(images.mean().item()) < 1e-2 and abs(images.std().item() - 1) < 1e-2
    assert torch.equal(labels.bincount(), torch.full((10,), 6000))


# --- the validation hold-out and the loaders -----------------------------------------------------------------


def test_hold_out_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    written = write_fashion_mnist(tmp_path, n_train=12)

    def split(seed: int) -> FashionMNISTDataModule:
        dm = FashionMNISTDataModule(str(tmp_path), batch_size=3, val_size=4, seed=seed)
        dm.setup("fit")
        return dm

    dm = split(seed=0)
    train_idx, val_idx = dm.train_set.indices, dm.val_set.indices
    assert len(dm.train_set) == 8 and len(dm.val_set) == 4
    assert set(train_idx).isdisjoint(val_idx) and set(train_idx) | set(val_idx) == set(range(12))
    assert (split(seed=0).train_set.indices, split(seed=0).val_set.indices) == (train_idx, val_idx)
    assert split(seed=1).val_set.indices != val_idx

    val_images, val_labels = everything(dm.val_dataloader())
    torch.testing.assert_close(val_images, fashion_normalised(written["train"][0][val_idx]))
    assert torch.equal(val_labels, written["train"][1][val_idx])


def test_no_val_size_means_no_validation_loader(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    dm = FashionMNISTDataModule(str(tmp_path))
    dm.setup("fit")
    assert dm.val_set is None and dm.val_dataloader() == []


def test_val_size_must_leave_training_images(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=12)
    with pytest.raises(ConfigError, match="val_size=12"):
        FashionMNISTDataModule(str(tmp_path), val_size=12).setup("fit")


@pytest.mark.parametrize("module", [FashionMNISTDataModule, CIFAR10DataModule, CIFAR100DataModule])
@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"num_workers": -1}, {"val_size": -1}])
def test_bad_arguments_fail_at_construction(module: type, bad: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match=f"data.{next(iter(bad))}"):
        module(**bad)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_settings(tmp_path: Path, num_workers: int) -> None:
    write_fashion_mnist(tmp_path)
    dm = FashionMNISTDataModule(str(tmp_path), batch_size=5, num_workers=num_workers, val_size=2)
    dm.setup("fit")
    dm.setup("test")
    train, val, test = dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()
    assert isinstance(train.sampler, EpochShuffle) and train.sampler.shuffle and train.sampler.num_replicas == 1
    assert not train.drop_last and train.batch_size == 5
    assert isinstance(val.sampler, SequentialSampler) and isinstance(test.sampler, SequentialSampler)
    for loader in (train, val, test):
        assert loader.num_workers == num_workers
        assert loader.persistent_workers == (num_workers > 0)
        assert loader.pin_memory == torch.cuda.is_available()


class Counting(pl.LightningModule):
    """A linear classifier on Fashion-MNIST that counts the images each stage sees."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
        self.seen = {"val": 0, "test": 0}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.seen["val"] += len(batch[1])

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.seen["test"] += len(batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("val_size", [0, 4])
def test_trainer_fits_and_tests_with_and_without_validation(tmp_path: Path, val_size: int) -> None:
    write_fashion_mnist(tmp_path, n_train=12, n_test=6)
    dm = FashionMNISTDataModule(str(tmp_path), batch_size=4, val_size=val_size)
    model = Counting()
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    assert model.seen["val"] == val_size  # one validation pass at the end of the 2-step epoch, or none
    trainer.test(model, datamodule=dm, verbose=False)
    assert model.seen["test"] == 6


# --- CIFAR-10 / CIFAR-100 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("module", "write", "num_classes"), CIFAR)
def test_cifar_reads_torchvision_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: type, write: Callable, num_classes: int
) -> None:
    allow_fake_cifar(monkeypatch)
    written = write(tmp_path)
    dm = module(str(tmp_path), batch_size=4, num_workers=0)
    assert dm.num_classes == num_classes
    dm.setup("fit")
    dm.setup("test")

    test_images, test_labels = everything(dm.test_dataloader())
    torch.testing.assert_close(test_images, cifar_normalised(written["test"][0], module.mean, module.std))
    assert torch.equal(test_labels, written["test"][1])
    train_images, train_labels = everything(dm.train_dataloader())
    assert train_images.shape == (len(written["train"][1]), 3, 32, 32) and train_images.dtype == torch.float32
    assert torch.equal(train_labels.sort().values, written["train"][1].sort().values)  # shuffled, all there


@pytest.mark.parametrize(("module", "write", "num_classes"), CIFAR)
def test_cifar_augments_training_images_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: type, write: Callable, num_classes: int
) -> None:
    allow_fake_cifar(monkeypatch)
    train_images, train_labels = write(tmp_path)["train"]
    dm = module(str(tmp_path), val_size=5, num_workers=0)
    dm.setup("fit")
    plain = cifar_normalised(train_images, module.mean, module.std)

    val_idx = dm.val_set.dataset.indices
    val_images, val_labels = everything(dm.val_dataloader())
    torch.testing.assert_close(val_images, plain[val_idx])  # held out with the test-time transform
    assert torch.equal(val_labels, train_labels[val_idx])

    train_idx = dm.train_set.dataset.indices[0]
    draws = [dm.train_set[ExampleKey(0, epoch, 0)][0] for epoch in range(8)]
    assert all(draw.shape == (3, 32, 32) for draw in draws)
    assert any(not torch.allclose(draw, plain[train_idx]) for draw in draws), "crop and flip never applied"


def _draws(image: torch.Tensor) -> tuple[float, float, float, float]:
    """A transform that draws from each global generator a transform may use, and reads the image."""
    return torch.rand(()).item(), random.random(), float(np.random.rand()), image.sum().item()


def _global_states() -> tuple:
    return torch.get_rng_state().tolist(), random.getstate(), np.random.get_state()[1].tolist()


def test_an_example_is_augmented_as_a_function_of_the_seed_the_epoch_and_its_index_alone() -> None:
    images = torch.arange(5.0).view(5, 1)
    dataset = Transformed(TensorDataset(images, torch.zeros(5)), _draws)
    key = ExampleKey(index=3, epoch=1, seed=7)
    before = _global_states()
    first = dataset[key][0]
    assert _global_states() == before  # training's draws are left as they were
    torch.rand(4), random.random(), np.random.rand()  # whatever the global states hold
    assert dataset[key][0] == first and first[3] == 3.0
    for other in (key._replace(epoch=2), key._replace(seed=8), key._replace(index=2)):
        draws = dataset[other][0][:3]
        assert all(a != b for a, b in zip(draws, first[:3])), other  # torch, random and NumPy each reseeded
    assert dataset[3][0][3] == 3.0  # a plain index (evaluation): the transform as it is


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_workers_augment_as_the_main_process_does(num_workers: int) -> None:
    dataset = Transformed(TensorDataset(torch.arange(12.0).view(12, 1), torch.zeros(12)), _draws)
    order = EpochShuffle(dataset, seed=5, epoch_of=lambda: 1, keys=True)
    expected = [dataset[key][0] for key in order]
    loader = DataLoader(dataset, batch_size=4, sampler=order, num_workers=num_workers)
    served = [tuple(row) for images, _ in loader for row in torch.stack(images, dim=1).tolist()]
    assert served == expected  # floats collate to float64: exact


@pytest.mark.parametrize(("module", "write", "num_classes"), CIFAR)
def test_cifar_missing_data_says_how_to_get_it(
    tmp_path: Path, module: type, write: Callable, num_classes: int
) -> None:
    dm = module(str(tmp_path), num_workers=0)
    dm.prepare_data()  # download off: must not fetch anything
    with pytest.raises(ConfigError, match="--data.download true") as error:
        dm.setup("fit")
    assert "--data.data_dir" in str(error.value) and isinstance(error.value.__cause__, RuntimeError)


@pytest.mark.parametrize(("module", "write", "num_classes"), CIFAR)
def test_cifar_download_fetches_into_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: type, write: Callable, num_classes: int
) -> None:
    calls = []
    # staticmethod: a plain function stored on the class would be bound to the instance.
    fake = staticmethod(lambda root, **kwargs: calls.append((root, kwargs)))
    monkeypatch.setattr(module, "dataset_class", fake)
    module(str(tmp_path), download=True).prepare_data()
    assert calls == [(str(tmp_path), {"train": True, "download": True})]


# --- ImageNet ------------------------------------------------------------------------------------------------


def test_imagenet_folders_give_square_crops(tmp_path: Path) -> None:
    write_imagenet_folder(tmp_path, n_train=3, n_val=2)
    dm = ImageNetDataModule(str(tmp_path), batch_size=4, num_workers=0, image_size=32, num_classes=2)
    assert dm.num_classes == 2
    dm.setup("fit")
    dm.setup("test")

    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and set(labels.tolist()) <= {0, 1}
    assert len(dm.train_set) == 6
    val_images, val_labels = everything(dm.val_dataloader())
    test_images, test_labels = everything(dm.test_dataloader())
    assert val_images.shape == (4, 3, 32, 32) and val_labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(val_images, test_images) and torch.equal(val_labels, test_labels)  # the val folder, twice


def test_imagenet_class_count_must_match(tmp_path: Path) -> None:
    write_imagenet_folder(tmp_path)
    dm = ImageNetDataModule(str(tmp_path), num_workers=0)
    with pytest.raises(ConfigError, match="found 2 class folders .* expected 1000: set data.num_classes to 2"):
        dm.setup("fit")
    with pytest.raises(ConfigError, match="set data.num_classes"):
        dm.setup("test")


@pytest.mark.parametrize(("damage", "message"), [
    ("no_val", "val does not exist"),
    ("other_val_class", "must hold the same class folders"),
    ("empty_class", "every class folder .* needs images"),
])
def test_imagenet_bad_layout_is_a_config_error(tmp_path: Path, damage: str, message: str) -> None:
    write_imagenet_folder(tmp_path, classes=("a", "b"))
    if damage == "no_val":
        shutil.rmtree(tmp_path / "val")
    elif damage == "other_val_class":
        (tmp_path / "val" / "b").rename(tmp_path / "val" / "c")
    else:
        for path in (tmp_path / "train" / "b").iterdir():
            path.unlink()
    dm = ImageNetDataModule(str(tmp_path), num_workers=0, num_classes=2)
    with pytest.raises(ConfigError, match=message):
        dm.setup("fit")


def test_imagenet_needs_a_data_dir() -> None:
    with pytest.raises(ConfigError, match="--data.data_dir"):
        ImageNetDataModule()


def test_imagenet_missing_data_says_what_to_set(tmp_path: Path) -> None:
    dm = ImageNetDataModule(str(tmp_path / "nowhere"), num_workers=0)
    with pytest.raises(ConfigError, match="--data.data_dir must hold train/ and val/"):
        dm.setup("test")


def test_loaders_need_setup() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        FashionMNISTDataModule().train_dataloader()
