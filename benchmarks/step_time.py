"""Time per training step with each callback against the same dense training, on the CPU.

Each (model, method) trains with a real Trainer and ImageClassifier (SGD, Nesterov momentum) on random inputs of
the model's shape, so every step is a real forward, backward and optimizer step. A step's time is the wall time
between the starts of two consecutive batches: it includes data loading, the callbacks' ``self.log`` calls (no
logger is attached) and every callback hook. Pruning starts dense and reaches the sparsity at the end.
Methods that change masks do so every ``--interval`` steps (and until the end of the run) so that update steps
occur in the timed window; they are reported apart from the other steps. Rounds alternate the methods, each
round starting at the next one, so slow phases of a shared machine and a method's place in the sequence hit all
of them; the figures are medians over all rounds.

Per method: the median step without a mask update, its ratio to dense, the median step with an update, and the
cost per step at the recipes' update interval of 100 steps (a plain step plus a hundredth of an update's extra).

    python benchmarks/step_time.py [--models lenet300_100 wrn22_2 resnet50] [--steps N] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytorch_lightning as pl
import torch
from memory import MODELS
from torch.utils.data import DataLoader, TensorDataset

from lightning_rigl import SET, SNFS, SNIP, GradualMagnitudePruning, ImageClassifier, RigL, SparseTraining, Static

WARMUP_STEPS = 3  # the first steps allocate buffers and optimizer state
STEPS = {"lenet300_100": 200, "wrn22_2": 40, "resnet50": 20}  # timed steps per run: a few seconds to a minute
RECIPE_INTERVAL = 100


def make_callback(method: str, sparsity: float, interval: int) -> SparseTraining | None:
    """The method's callback at ``sparsity`` (ERK), changing masks every ``interval`` steps until the end."""
    dynamic = {"update_interval": interval, "stop_at": 1.0}
    return {
        "dense": lambda: None,
        "Static": lambda: Static(sparsity=sparsity),
        "SNIP": lambda: SNIP(sparsity=sparsity),
        "SET": lambda: SET(sparsity=sparsity, **dynamic),
        "RigL": lambda: RigL(sparsity=sparsity, **dynamic),
        "SNFS": lambda: SNFS(sparsity=sparsity, **dynamic),
        "pruning": lambda: GradualMagnitudePruning(sparsity=sparsity, update_interval=interval, start_at=0.0,
                                                   stop_at=1.0),
    }[method]()


class StepClock(pl.Callback):
    """Records each batch's start time and the sparse callback's update count at that moment."""

    def __init__(self, sparse: SparseTraining | None) -> None:
        self.sparse = sparse
        self.starts: list[float] = []
        self.updates: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())
        self.updates.append(self.sparse.num_updates if self.sparse is not None else 0)

    def steps(self) -> tuple[list[float], list[float]]:
        """Times of the steps without and with a mask change (the last batch has no successor to time it)."""
        plain, changed = [], []
        for i in range(WARMUP_STEPS, len(self.starts) - 1):
            seconds = self.starts[i + 1] - self.starts[i]
            (changed if self.updates[i + 1] != self.updates[i] else plain).append(seconds)
        return plain, changed


def time_steps(arch: str, method: str, steps: int, sparsity: float, interval: int) -> tuple[list[float], list[float]]:
    """One short training run; the times of its steps without and with a mask change, in seconds."""
    shape, classes, batch = MODELS[arch]
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(batch * (steps + 1), *shape), torch.randint(0, classes, (batch * (steps + 1),)))
    sparse = make_callback(method, sparsity, interval)
    clock = StepClock(sparse)
    trainer = pl.Trainer(max_steps=steps + 1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[clock] + ([sparse] if sparse is not None else []))
    trainer.fit(ImageClassifier(arch=arch, num_classes=classes, lr=0.01), DataLoader(data, batch_size=batch))
    return clock.steps()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["dense", "Static", "SNIP", "SET", "RigL", "SNFS", "pruning"])
    parser.add_argument("--steps", type=int, help=f"timed steps per run (default: {STEPS})")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interval", type=int, default=10, help="steps between mask changes in the timed runs")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.steps is not None and args.steps <= WARMUP_STEPS + args.interval:
        parser.error(f"--steps must exceed {WARMUP_STEPS} warm-up steps plus --interval ({args.interval})")
    torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, sparsity {args.sparsity} (ERK), "
          f"{args.rounds} rounds per method, a mask change every {args.interval} steps\n")
    print("| model (input, batch) | method | step, no update (ms) | against dense | step with update (ms) "
          f"| per step at an update every {RECIPE_INTERVAL} |\n|---|---|---|---|---|---|")
    for arch in args.models:
        plain: dict[str, list[float]] = {m: [] for m in args.methods}
        changed: dict[str, list[float]] = {m: [] for m in args.methods}
        for round_index in range(args.rounds):
            # Each round starts at another method, so a method's place in the sequence does not bias it.
            shift = round_index % len(args.methods)
            for method in args.methods[shift:] + args.methods[:shift]:
                without, with_update = time_steps(arch, method, args.steps or STEPS[arch], args.sparsity,
                                                  args.interval)
                plain[method] += without
                changed[method] += with_update
        dense = statistics.median(plain["dense"]) if "dense" in plain else None
        shape, _, batch = MODELS[arch]
        label = f"{arch} ({'x'.join(map(str, shape))}, {batch})"
        for method in args.methods:
            step = statistics.median(plain[method])
            ratio = f"{step / dense:.3f}x" if dense else ""
            if changed[method]:
                update = statistics.median(changed[method])
                amortized = step + (update - step) / RECIPE_INTERVAL
                update_text, amortized_text = f"{update * 1e3:.1f}", f"{amortized / dense:.3f}x" if dense else ""
            else:
                update_text, amortized_text = "", ratio
            print(f"| {label} | {method} | {step * 1e3:.2f} | {ratio} | {update_text} | {amortized_text} |", flush=True)


if __name__ == "__main__":
    main()
