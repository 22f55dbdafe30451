"""Per-step cost of the callback on steps without a mask update, as a fraction of a training step.

A small conv net (two 3×3 convs and two linear layers, batch 128 of 1×28×28) is trained for a few steps
under RigL so the callback is fully set up; then, in the same process, the median time of one plain
training step (forward, backward, SGD step) and the median time of the callback's per-step hooks are taken.
With ``--kernels sparse`` the linear layers train with sparse kernels, the step is timed with them, and the
hooks timed are all three the callback runs each step (batch start, before the optimizer step, batch end).

    python benchmarks/step_overhead.py [--repeats 200] [--kernels dense|sparse]
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from timing import median_seconds
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rigl import RigL


class SmallConvNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--kernels", choices=["dense", "sparse"], default="dense")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    model = SmallConvNet()
    rigl = RigL(sparsity=0.9, update_interval=10**9, stop_at=1.0, kernels=args.kernels)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", callbacks=[rigl], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=128))
    # on_fit_end released the model; set the callback up again on the trained model for the hook timing.
    rigl.on_fit_start(trainer, model)
    optimizer = trainer.optimizers[0]

    def training_step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    training_step()
    step = median_seconds(training_step, args.repeats)
    hook, kernels = 0.0, rigl.training_kernels

    def after_a_backward() -> None:  # what a backward through the kernels leaves: gradients they alone computed
        for layer in kernels.layers.values():
            layer.clean = True

    if kernels is not None:
        hook += median_seconds(lambda: rigl.on_train_batch_start(trainer, model, (x, y), 0), args.repeats * 10)
    hook += median_seconds(lambda: rigl.on_before_optimizer_step(trainer, model, optimizer), args.repeats * 10,
                           before=after_a_backward if kernels is not None else None)
    n_sparse = sum(m.numel() for m in rigl.masks.values())
    print(f"Small conv net ({n_sparse / 1e6:.2f}M sparsified weights), batch 128, {torch.get_num_threads()} threads, "
          f"kernels={args.kernels} ({rigl.kernels_used})")
    print(f"  training step (forward, backward, SGD):  {step * 1e3:.2f} ms (median of {args.repeats})")
    print(f"  callback per-step hook, no update:       {hook * 1e6:.1f} us (median of {args.repeats * 10})")
    print(f"  overhead: {hook / step:.2%} of a training step")


if __name__ == "__main__":
    main()
