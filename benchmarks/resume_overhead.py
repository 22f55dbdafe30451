"""What exact resume costs: ExactResume's seeding of every training batch, and augmentation drawn per example.

1. The global generators (torch CPU, NumPy, Python ``random``) seeded at the start of every training batch from
   (seed, epoch, batch, rank), against a real training step (forward, backward, SGD with Nesterov momentum) of the
   default config's LeNet-300-100 at batch 128, and of WRN-22-2 at CIFAR's 32×32, batch 128 (the CIFAR recipes),
   in the same process; and, for comparison, saving and restoring the three states instead.
2. CIFAR's training augmentation (4-pixel-padded random crop, flip, ToTensor, Normalize) on 32×32 images, plain
   (drawing from the global state) and through ``Transformed`` (seeded per example): per image in the main
   process (which saves and restores the global states around each example), and images per second through a
   DataLoader with loader workers (which leave them seeded).

The images are random pixels (there is no CIFAR-10 here); the transforms' work does not depend on the content.

    python benchmarks/resume_overhead.py [--repeats 200] [--images 10000] [--workers 2]
"""

from __future__ import annotations

import argparse
import random
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from timing import median_seconds
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_rigl import ExactResume
from lightning_rigl.data import CIFAR10DataModule, ExampleKey, Transformed
from lightning_rigl.data.order import EpochShuffle
from lightning_rigl.models import create_model


def step_time(arch: str, num_classes: int, shape: tuple[int, ...], repeats: int) -> float:
    """Median seconds of a training step of ``arch`` at batch ``shape``."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=num_classes).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x, y = torch.randn(shape), torch.randint(0, num_classes, shape[:1])

    def training_step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    training_step()
    return median_seconds(training_step, repeats)


def seeding_time(repeats: int) -> float:
    """Median seconds of ExactResume's batch-start hook."""
    exact, trainer = ExactResume(), SimpleNamespace(current_epoch=3, global_rank=0)
    exact.seed = 0
    return median_seconds(lambda: exact.on_train_batch_start(trainer, None, None, 17), repeats)


def save_and_restore_time(repeats: int) -> float:
    """Median seconds of saving the three global states and restoring them (the alternative to seeding)."""
    def save_and_restore() -> None:
        states = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])

    return median_seconds(save_and_restore, repeats)


class RandomImages(Dataset):
    """``size`` random 32×32 RGB PIL images with label 0, as torchvision's CIFAR10 serves them."""

    def __init__(self, size: int) -> None:
        pixels = np.random.default_rng(0).integers(0, 256, (size, 32, 32, 3), dtype=np.uint8)
        self.images = [Image.fromarray(p) for p in pixels]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index], 0


def images_per_second(dataset: Dataset, keys: bool, workers: int) -> float:
    order = EpochShuffle(dataset, seed=0, epoch_of=lambda: 0, keys=keys)
    loader = DataLoader(dataset, batch_size=128, sampler=order, num_workers=workers)
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads")

    print("1. ExactResume's seeding of each training batch")
    seeding, saving = seeding_time(args.repeats * 10), save_and_restore_time(args.repeats * 10)
    print(f"  seeding: {seeding * 1e6:.1f} us; saving and restoring the states instead: {saving * 1e6:.1f} us")
    for arch, classes, shape in (("lenet300_100", 10, (128, 1, 28, 28)), ("wrn22_2", 10, (128, 3, 32, 32))):
        step = step_time(arch, classes, shape, args.repeats if arch == "lenet300_100" else max(args.repeats // 10, 5))
        print(f"  {arch}, batch {shape[0]}: training step {step * 1e3:.2f} ms; seeding {seeding / step:.2%} of it, "
              f"saving and restoring {saving / step:.2%}")

    print(f"2. CIFAR's training augmentation, {args.images} random 32x32 images")
    transform = CIFAR10DataModule()._train_transform()
    images = RandomImages(args.images)
    seeded = Transformed(images, transform)
    plain = median_seconds(lambda: transform(images.images[0]), args.repeats * 10)
    keyed = median_seconds(lambda: seeded[ExampleKey(0, 0, 0)], args.repeats * 10)
    print(f"  one image in the main process: plain {plain * 1e6:.0f} us, Transformed {keyed * 1e6:.0f} us "
          f"({keyed / plain:.2f}x)")
    for workers in (0, args.workers):  # without keys, Transformed runs the transform as it is, on the global state
        plain_rate = images_per_second(seeded, keys=False, workers=workers)
        keyed_rate = images_per_second(seeded, keys=True, workers=workers)
        print(f"  DataLoader, {workers} workers, batch 128: plain {plain_rate:,.0f} images/s, Transformed "
              f"{keyed_rate:,.0f} images/s ({keyed_rate / plain_rate:.2f}x)")


if __name__ == "__main__":
    main()
