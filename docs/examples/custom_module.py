"""Your own LightningModule, trained sparse: a small MLP on Fashion-MNIST with RigL, then SET, then Static.

    python docs/examples/custom_module.py [--data-dir DIR] [--max-steps 2000] [--sparsity 0.9]

The data comes from Debian's dataset-fashion-mnist (or ``--data-dir``, a folder with the four IDX files).
Nothing here is specific to lightning-rigl except the one callback per Trainer: any LightningModule with one
optimizer works.
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_rigl import SET, RigL, Static
from lightning_rigl.data import FashionMNISTDataModule


class MLP(pl.LightningModule):
    """784 -> 300 -> 100 -> 10 with ReLU, trained by SGD with momentum."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                                 nn.Linear(100, 10))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images), labels)
        self.log("train/loss", loss)
        return loss

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.log("test/accuracy", (self(images).argmax(1) == labels).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()

    # One callback per run; each keeps exactly (1 - sparsity) of the weights of every Linear layer, ERK-shaped.
    methods = {
        "RigL": RigL(sparsity=args.sparsity, distribution="erk", update_interval=100, drop_fraction=0.3),
        "SET": SET(sparsity=args.sparsity, distribution="erk", update_interval=100, drop_fraction=0.3),
        "Static": Static(sparsity=args.sparsity, distribution="erk"),
    }
    for name, callback in methods.items():
        pl.seed_everything(0, verbose=False)
        data = FashionMNISTDataModule(args.data_dir, batch_size=128)
        trainer = pl.Trainer(max_steps=args.max_steps, callbacks=[callback], accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        model = MLP()
        trainer.fit(model, datamodule=data)
        (result,) = trainer.test(model, datamodule=data, verbose=False)
        print(f"{name}: test accuracy {result['test/accuracy']:.4f}, sparsity {1 - callback.global_density():.4f}, "
              f"layer densities {[round(d, 3) for d in callback.achieved_densities().values()]}")


if __name__ == "__main__":
    main()
