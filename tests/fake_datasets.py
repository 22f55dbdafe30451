"""Tiny datasets in the real on-disk formats, so the real readers (ours and torchvision's) load them.

Importable from any test as ``from fake_datasets import ...``: pytest puts tests/ on sys.path, since
tests/conftest.py sits in a folder without ``__init__.py``. Images are random uint8 pixels; labels cycle
through the classes so every class occurs.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _pixels(shape: Sequence[int], seed: int) -> torch.Tensor:
    return torch.randint(0, 256, tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _write_idx(path: Path, values: torch.Tensor, gzipped: bool) -> None:
    # Magic number: two zero bytes, 0x08 (unsigned byte), the number of dimensions; 0x00000803 for images.
    header = struct.pack(">HBB", 0, 0x08, values.dim()) + struct.pack(f">{values.dim()}I", *values.shape)
    opener = gzip.open if gzipped else open
    with opener(path.with_name(path.name + ".gz") if gzipped else path, "wb") as file:
        file.write(header + values.numpy().tobytes())


def write_fashion_mnist(
    root: Path, n_train: int = 12, n_test: int = 6, gzipped: bool = True, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Writes Fashion-MNIST's four IDX files into ``root`` (``.gz`` when ``gzipped``).

    Returns, per split ("train", "test"), the uint8 images (N, 28, 28) and int64 labels (N,) written.
    """
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for offset, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        images, labels = _pixels((n, 28, 28), seed + offset), torch.arange(n) % 10
        image_name, label_name = FASHION_MNIST_FILES[split]
        _write_idx(root / image_name, images, gzipped)
        _write_idx(root / label_name, labels.to(torch.uint8), gzipped)
        written[split] = (images, labels)
    return written


def _write_pickle(path: Path, content: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump(content, file)


def _cifar_batch(n: int, num_classes: int, seed: int, label_key: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    images = _pixels((n, 32, 32, 3), seed)  # HWC, as torchvision hands them to PIL
    labels = (torch.arange(n) + seed) % num_classes
    # The files store each image as 3072 bytes: the red plane, then green, then blue (CHW, row-major).
    content = {"data": images.permute(0, 3, 1, 2).reshape(n, 3072).numpy(), label_key: labels.tolist()}
    return content, images, labels


def write_cifar10(
    root: Path, n_per_batch: int = 4, n_test: int = 6, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Writes ``root/cifar-10-batches-py``: data_batch_1..5 (``n_per_batch`` images each), test_batch and
    batches.meta, in torchvision's pickle format. Load it after :func:`allow_fake_cifar`.

    Returns, per split ("train", "test"), the uint8 images (N, 32, 32, 3) and int64 labels (N,) in file order.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train = [_cifar_batch(n_per_batch, 10, seed + i, "labels") for i in range(5)]
    for i, (content, _, _) in enumerate(train, start=1):
        _write_pickle(folder / f"data_batch_{i}", content)
    test_content, test_images, test_labels = _cifar_batch(n_test, 10, seed + 5, "labels")
    _write_pickle(folder / "test_batch", test_content)
    _write_pickle(folder / "batches.meta", {"label_names": [f"class_{i}" for i in range(10)]})
    return {
        "train": (torch.cat([images for _, images, _ in train]), torch.cat([labels for _, _, labels in train])),
        "test": (test_images, test_labels),
    }


def write_cifar100(
    root: Path, n_train: int = 20, n_test: int = 6, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Writes ``root/cifar-100-python``: train, test and meta, labels under ``fine_labels``. Load it after
    :func:`allow_fake_cifar`.

    Returns, per split ("train", "test"), the uint8 images (N, 32, 32, 3) and int64 labels (N,) in file order.
    """
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for offset, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        content, images, labels = _cifar_batch(n, 100, seed + offset, "fine_labels")
        content["coarse_labels"] = (labels // 5).tolist()
        _write_pickle(folder / split, content)
        written[split] = (images, labels)
    _write_pickle(folder / "meta", {"fine_label_names": [f"fine_{i}" for i in range(100)],
                                    "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    return written


def allow_fake_cifar(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets torchvision's CIFAR10/CIFAR100 load the files above, for this test only.

    torchvision checks each file against the real dataset's md5; an md5 of None makes ``check_integrity``
    test only that the file exists.
    """
    for cls in (datasets.CIFAR10, datasets.CIFAR100):
        monkeypatch.setattr(cls, "train_list", [[name, None] for name, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[name, None] for name, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})


def write_imagenet_folder(
    root: Path,
    classes: Sequence[str] = ("n01440764", "n01443537"),
    n_train: int = 3,
    n_val: int = 2,
    size: tuple[int, int] = (48, 40),
    seed: int = 0,
) -> Path:
    """Writes ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``: ``n_train`` and ``n_val`` RGB JPEGs
    of ``size`` (width, height) pixels per class. Returns ``root``."""
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = _pixels((size[1], size[0], 3), seed + 1000 * c + i + (500 if split == "val" else 0))
                Image.fromarray(pixels.numpy()).save(folder / f"{name}_{i}.JPEG", format="JPEG")
    return root


def write_text_folder(folder: Path, documents: int = 30, size: int = 3000) -> None:
    """A folder of small text files (nested, with a hidden file and a binary file that must be skipped)."""
    rng = np.random.default_rng(0)
    words = ["def", "return", "lambda", "class", "import", "self", "value", "x", "+", "(", ")", ":"]
    (folder / "pkg").mkdir(parents=True)
    for index in range(documents):
        text = " ".join(rng.choice(words, size // 5)) + "\n"
        (folder / ("pkg" if index % 3 else ".") / f"doc{index:02d}.py").write_text(text[:size])
    (folder / ".hidden").write_text("never read")
    (folder / "image.bin").write_bytes(bytes(range(256)))


def write_tokenizer(folder: Path, eos: bool = True, reverse: bool = False) -> Path:
    """A Hugging Face tokenizer saved in ``folder`` as ``from_pretrained`` reads one, made here without a download:
    a word-level vocabulary of the words ``write_text_folder`` writes (``reverse``: numbered the other way
    round), an unknown token and GPT-2's ``<|endoftext|>``, its end-of-sequence token unless not ``eos`` (ids 0
    and 1), which it appends itself to what it encodes with special tokens (as T5's does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["def", "return", "lambda", "class", "import", "self", "value", "x", "+", "(", ")", ":"]
    ordered = words[::-1] if reverse else words
    vocab = {"[UNK]": 0, "<|endoftext|>": 1, **{word: index + 2 for index, word in enumerate(ordered)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                        special_tokens=[("<|endoftext|>", 1)])
    special = {"eos_token": "<|endoftext|>"} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", **special).save_pretrained(folder)
    return folder
