"""`make demo`: RigL at 90% sparsity (ERK) trains LeNet-300-100 on Fashion-MNIST on the CPU in about a minute.

Reads the real Fashion-MNIST IDX files (Debian's `dataset-fashion-mnist` puts them in
/usr/share/datasets/fashion-mnist). Prints the test accuracy, the achieved sparsity and each layer's density.

    python -m lightning_rigl.demo [--data-dir DIR] [--epochs 3] [--sparsity 0.9]
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rigl import RigL

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> torch.Tensor:
    """A tensor from an IDX file (gzipped or not): the MNIST family's on-disk format."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        _, dtype_code, ndim = struct.unpack(">HBB", file.read(4))
        if dtype_code != 0x08:
            raise ValueError(f"{path}: only unsigned-byte IDX files are supported")
        shape = struct.unpack(f">{ndim}I", file.read(4 * ndim))
        return torch.frombuffer(bytearray(file.read()), dtype=torch.uint8).reshape(shape)


def load_split(data_dir: Path, split: str) -> TensorDataset:
    prefix = "train" if split == "train" else "t10k"
    files = {kind: next(iter(sorted(data_dir.glob(f"{prefix}-{kind}-idx*-ubyte*"))), None)
             for kind in ("images", "labels")}
    missing = [kind for kind, path in files.items() if path is None]
    if missing:
        raise SystemExit(
            f"Fashion-MNIST {split} {missing} not found in {data_dir}. Install Debian's package "
            "(apt-get install dataset-fashion-mnist) or pass --data-dir with the IDX files."
        )
    images = read_idx(files["images"]).float().div_(255).sub_(0.2860).div_(0.3530)  # dataset mean and std
    return TensorDataset(images.flatten(1), read_idx(files["labels"]).long())


class LeNet300100(pl.LightningModule):
    """784 → 300 → 100 → 10 MLP (LeCun et al., 1998), trained with SGD + momentum."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()

    pl.seed_everything(0)
    train_set, test_set = load_split(args.data_dir, "train"), load_split(args.data_dir, "test")
    rigl = RigL(sparsity=args.sparsity, distribution="erk", update_interval=100, stop_at=0.75)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", callbacks=[rigl], logger=False,
                         enable_checkpointing=False)
    model = LeNet300100()
    trainer.fit(model, DataLoader(train_set, batch_size=128, shuffle=True))
    (result,) = trainer.test(model, DataLoader(test_set, batch_size=1000), verbose=False)

    print(f"\nRigL, ERK, target sparsity {args.sparsity}: test accuracy {result['test_acc']:.4f}, "
          f"achieved sparsity {1 - rigl.global_density():.4f}, {rigl.num_updates} mask updates")
    for name, mask in rigl.masks.items():
        print(f"  {name:<14} {tuple(mask.shape)!s:<12} density {mask.float().mean():.4f}")


if __name__ == "__main__":
    main()
