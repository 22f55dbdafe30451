"""Training with sparse kernels, whole steps: time per optimizer step and peak memory against the dense path.

Each configuration trains in a fresh process (so that its peak resident memory is its own) with a real Trainer on
real data (Fashion-MNIST images; text for ``gpt_tiny``): a step is a real forward, backward, callback hooks and
optimizer step (SGD with Nesterov momentum and weight decay; AdamW for ``gpt_tiny``), and its time is the wall time between two consecutive batch starts, after the first
``WARMUP`` steps (the first step of "auto" is its timing step). Rounds alternate the configurations, each round
starting at the next one; medians over rounds.

Models:

- ``mlp_stack``: ViT-B/16's MLP blocks: images cut into 16 patches of 7×7, embedded to 768, then ``--depth``
  blocks of LayerNorm → 768→3072 → GELU → 3072→768 with a residual, mean over tokens, a linear classifier;
  ``--images`` images a batch (16 tokens each: rows = 16 × images).
- ``lenet300_100``: the default run's model and batch (128).
- ``gpt_tiny``: the language-model study's model, optimizer and batch (``CausalLM``: AdamW, 16 windows of 256
  bytes of this Python's standard library source, ``TextDataModule``'s default corpus), without the study's
  gradient clipping, which turns the live step off.

Methods: dense training (no callback), and RigL (ERK, ΔT = 100, so no update in the window) with
``kernels="dense"`` (the masked dense path), ``"sparse"`` and ``"auto"`` (the optimizer stepping live weights
only, ``live_step=True``, the default), and ``"sparse"`` with ``live_step=False`` (a dense gradient and a dense
optimizer step, as before the live step).

    python benchmarks/sparse_training_step.py [--models mlp_stack lenet300_100] [--sparsities 0.9 0.98]
        [--rounds 3] [--steps 30] [--images 16] [--depth 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rigl import CausalLM, ImageClassifier, RigL
from lightning_rigl.data import TextDataModule
from lightning_rigl.data.idx import read_idx

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
WARMUP = 3
KERNELS = ("dense", "sparse", "auto", "sparse/dense-step")  # "K/dense-step": kernels K with live_step=False


def measure(model_name: str, sparsity: float, kernels: str | None, steps: int, images: int, depth: int,
            threads: int) -> None:
    """Trains in this process and prints {"step_ms": ..., "peak_mb": ..., "kernels": ...} on the last line."""
    torch.set_num_threads(threads)
    pl.seed_everything(0, verbose=False)
    n_batches = steps + WARMUP + 1
    if model_name == "gpt_tiny":
        text = TextDataModule(context=256, batch_size=16)
        text.prepare_data()
        text.setup("fit")
        model, data = CausalLM(arch="gpt_tiny"), text.train_dataloader()
    else:
        x = read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz").float().div(255).unsqueeze(1)
        y = read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz").long()
        if model_name == "lenet300_100":
            model, batch = ImageClassifier(arch="lenet300_100", lr=0.05, momentum=0.9, nesterov=True,
                                           weight_decay=5e-4), 128
        else:
            model, batch = MLPStack(depth), images
        data = DataLoader(TensorDataset(x[: batch * n_batches], y[: batch * n_batches]), batch_size=batch)

    class Clock(pl.Callback):
        starts: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts.append(time.perf_counter())

    clock = Clock()
    sparse = None if kernels is None else RigL(sparsity=sparsity, update_interval=100, kernels=kernels.split("/")[0],
                                               live_step=not kernels.endswith("/dense-step"))
    trainer = pl.Trainer(max_steps=n_batches, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[clock] + ([sparse] if sparse else []))
    trainer.fit(model, data)
    step_ms = 1e3 * statistics.median(b - a for a, b in zip(clock.starts[WARMUP:], clock.starts[WARMUP + 1:]))
    used = {} if sparse is None else {**sparse.kernels_used, "optimizer step": sparse.live_step_used or "dense"}
    print(json.dumps({"step_ms": step_ms, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "kernels": used}))


class MLPStack(pl.LightningModule):
    """ViT-B/16's MLP blocks on 16 patch tokens of a Fashion-MNIST image (see the module's docstring)."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.embed = nn.Linear(49, 768)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(768), nn.Linear(768, 3072), nn.GELU(),
                                                  nn.Linear(3072, 768)) for _ in range(depth))
        self.head = nn.Linear(768, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images.unfold(2, 7, 7).unfold(3, 7, 7).reshape(images.shape[0], 16, 49))  # (B, 16, 768)
        for block in self.blocks:
            tokens = tokens + block(tokens)
        return self.head(tokens.mean(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp_stack", "lenet300_100"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.98])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", nargs=3, metavar=("MODEL", "SPARSITY", "KERNELS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        model, sparsity, kernels = args.measure
        measure(model, float(sparsity), None if kernels == "none" else kernels, args.steps, args.images, args.depth,
                args.threads)
        return
    print("| model | sparsity | kernels | step (ms) | against dense path | peak memory (MB) | layer kernels |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        configs = [(0.0, "none")] + [(s, k) for s in args.sparsities for k in KERNELS]
        results: dict[tuple[float, str], list[dict]] = {config: [] for config in configs}
        for round_index in range(args.rounds):
            order = configs[round_index % len(configs):] + configs[:round_index % len(configs)]
            for sparsity, kernels in order:
                out = subprocess.run([sys.executable, __file__, "--measure", model, str(sparsity), kernels,
                                      "--steps", str(args.steps), "--images", str(args.images), "--depth",
                                      str(args.depth), "--threads", str(args.threads)],
                                     capture_output=True, text=True, check=True)
                results[(sparsity, kernels)].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for sparsity, kernels in configs:
            runs = results[(sparsity, kernels)]
            step = statistics.median(run["step_ms"] for run in runs)
            peak = statistics.median(run["peak_mb"] for run in runs)
            baseline = statistics.median(run["step_ms"] for run in results[(sparsity, "dense")]) \
                if kernels != "none" else step
            used = sorted(set(runs[-1]["kernels"].values()))
            print(f"| {model} | {sparsity:g} | {'(dense training)' if kernels == 'none' else kernels} | {step:.1f} | "
                  f"{baseline / step:.2f}× | {peak:.0f} | {', '.join(used)} |", flush=True)


if __name__ == "__main__":
    main()
