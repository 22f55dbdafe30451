"""Memory of sparse training on the CPU: against dense training, and per process when sharded with FSDP2.

Replicated (the default): each (model, method) trains in a fresh process (so that one peak does not hide
another) for a few optimizer steps of SGD with Nesterov momentum on random inputs of the model's shape (memory
does not depend on the values), and reports ru_maxrss. The dense run of the same model, in the same invocation,
is the baseline; SNFS's moving average of the dense gradient (4 bytes per sparsified weight) shows as its
difference to RigL.

    python benchmarks/memory.py [--models lenet300_100 wrn22_2 resnet50] [--steps 10]

Sharded (``--sharded``): one model trained by 1, 2 and 4 processes on this machine (gloo), under DDP and under
FSDP2 (ModelParallelStrategy, fully_shard per block), with a mask update at every step. Per process: the bytes of
the masks and of the method's per-weight state it holds (SNFS's moving average, the rewind copy), against its
share of the sparsified parameters; the transient peak of one update (the growth of the process's peak resident
set over the update, VmHWM reset through /proc/self/clear_refs, with glibc's mmap threshold fixed so that freed
tensors leave the resident set); and the wall time of one update (after a barrier; the slowest process).

    python benchmarks/memory.py --sharded [--model vit_b_16] [--world-sizes 1 2 4] [--methods RigL SNFS]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {"lenet300_100": ((1, 28, 28), 10, 64), "wrn22_2": ((3, 32, 32), 10, 32), "resnet50": ((3, 64, 64), 1000, 16)}
METHODS = ("dense", "Static", "SET", "RigL", "SNFS")


def measure(arch: str, method: str, steps: int) -> None:
    """Trains in this process and prints {"peak_mb": ...} as JSON on the last line."""
    import resource

    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_rigl
    from lightning_rigl import ImageClassifier

    shape, classes, batch = MODELS[arch]
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(batch * steps, *shape), torch.randint(0, classes, (batch * steps,)))
    updates = {} if method == "Static" else {"update_interval": 2}  # dynamic methods update every other step
    callbacks = [] if method == "dense" else [getattr(lightning_rigl, method)(sparsity=0.9, **updates)]
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ImageClassifier(arch=arch, num_classes=classes, lr=0.01), DataLoader(data, batch_size=batch))
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


SHARDED_INPUTS = {"vit_b_16": ((3, 224, 224), 1000), "vit_tiny": ((1, 28, 28), 10), "resnet50": ((3, 64, 64), 1000)}
STRATEGIES = ("ddp", "fsdp2")
SHARDED_STEPS = 4  # mask updates at steps 1, 2 and 3


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def measure_sharded(arch: str, method: str, strategy: str, world_size: int, out: Path) -> None:
    """Trains ``arch`` on ``world_size`` processes (Lightning starts the others by running this script again)
    and writes this process's figures to ``out/rank<N>.json``."""
    import time

    import pytorch_lightning as pl
    import torch
    import torch.distributed as dist
    from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_rigl
    from lightning_rigl import ImageClassifier
    from lightning_rigl.sparsity.sharding import local

    def nbytes(tensors) -> int:
        return sum(local(t).numel() * local(t).element_size() for t in tensors)

    class Measured(getattr(lightning_rigl, method)):
        """The method, with each mask update timed and its transient memory taken."""

        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.updates: list[dict[str, float]] = []

        def update_masks(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
            before = self.num_updates
            dist.barrier()
            resident = _status_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            start = time.perf_counter()
            super().update_masks(trainer, optimizer)
            seconds = time.perf_counter() - start
            if self.num_updates != before:
                self.updates.append({"seconds": seconds, "transient_mb": (_status_kib("VmHWM") - resident) / 1024})

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            super().on_train_end(trainer, pl_module)
            params = dict(pl_module.named_parameters())
            sparse = [params[name] for name in self.masks]
            gathered = self.per_weight_state()[1:]  # whole inside whole_layer, with the weight, gradient and mask
            states = gathered + ([self.rewind] if self.rewind is not None else [])
            largest = max(p.numel() for p in sparse)
            record = {
                "masks_mb": nbytes(self.masks.values()) / 2**20,
                "state_mb": sum(nbytes(state[name] for name in self.masks if name in state) for state in states) / 2**20,
                "param_shard_mb": nbytes(sparse) / 2**20,
                "largest_layer_whole_mb": largest * (4 + 4 + 1 + 4 * len(gathered)) / 2**20,
                "updates": self.updates,
            }
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    shape, classes = SHARDED_INPUTS[arch]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    batch = 1
    data = TensorDataset(torch.randn(batch * world_size * SHARDED_STEPS, *shape),
                         torch.randint(0, classes, (batch * world_size * SHARDED_STEPS,)))
    # rewind_step 0 keeps a copy of the initial weights, as a run for a lottery ticket does.
    sparse = Measured(sparsity=0.9, update_interval=1, stop_at=SHARDED_STEPS, rewind_step=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=world_size, max_steps=SHARDED_STEPS, callbacks=[sparse], logger=False,
        strategy=ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1)
        if strategy == "fsdp2" else DDPStrategy(),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(ImageClassifier(arch=arch, num_classes=classes, lr=0.01), DataLoader(data, batch_size=batch))


def sharded(arch: str, world_sizes: list[int], methods: list[str], output: Path | None) -> None:
    """Runs ``measure_sharded`` for every world size, strategy and method; prints a Markdown table."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    rows = []
    header = ("| method | processes | strategy | masks / process (MB) | method state / process (MB) | sparsified "
              "parameters / process (MB) | transient peak of an update (MB) | largest layer, whole (MB) | "
              "update (s) |\n|---|---|---|---|---|---|---|---|---|")
    print(header, flush=True)
    for method in methods:
        for world_size in world_sizes:
            for strategy in STRATEGIES:
                with tempfile.TemporaryDirectory() as folder:
                    subprocess.run([sys.executable, __file__, "--measure-sharded", arch, method, strategy,
                                    str(world_size), folder], check=True, env=env, capture_output=True)
                    ranks = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("rank*.json"))]
                row = {"method": method, "processes": world_size, "strategy": strategy,
                       **{key: max(r[key] for r in ranks) for key in ("masks_mb", "state_mb", "param_shard_mb",
                                                                       "largest_layer_whole_mb")},
                       # Per update, the slowest process and the largest transient; then the median over updates.
                       "transient_mb": statistics.median(max(r["updates"][i]["transient_mb"] for r in ranks)
                                                         for i in range(len(ranks[0]["updates"]))),
                       "update_s": statistics.median(max(r["updates"][i]["seconds"] for r in ranks)
                                                     for i in range(len(ranks[0]["updates"])))}
                rows.append(row)
                print(f"| {method} | {world_size} | {strategy} | {row['masks_mb']:.1f} | {row['state_mb']:.1f} | "
                      f"{row['param_shard_mb']:.1f} | {row['transient_mb']:.0f} | {row['largest_layer_whole_mb']:.1f} "
                      f"| {row['update_s']:.2f} |", flush=True)
    if output is not None:
        output.write_text(json.dumps({"model": arch, "rows": rows}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sharded", action="store_true", help="per-process memory under FSDP2 against DDP")
    parser.add_argument("--model", default="vit_b_16", choices=list(SHARDED_INPUTS), help="with --sharded")
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2, 4], help="with --sharded")
    parser.add_argument("--methods", nargs="+", default=["RigL", "SNFS"], help="with --sharded")
    parser.add_argument("--output", type=Path, help="with --sharded: also write the rows as JSON here")
    parser.add_argument("--measure", nargs=2, metavar=("ARCH", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--measure-sharded", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure, args.steps)
        return
    if args.measure_sharded:
        arch, method, strategy, world_size, out = args.measure_sharded
        measure_sharded(arch, method, strategy, int(world_size), Path(out))
        return
    if args.sharded:
        sharded(args.model, args.world_sizes, args.methods, args.output)
        return
    print("| model | method | peak RSS (MB) | against dense |\n|---|---|---|---|")
    for arch in args.models:
        peaks = {}
        for method in METHODS:
            result = subprocess.run([sys.executable, __file__, "--measure", arch, method, "--steps", str(args.steps)],
                                    capture_output=True, text=True, check=True)
            peaks[method] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]
            print(f"| {arch} | {method} | {peaks[method]:.0f} | {peaks[method] / peaks['dense']:.2f}x |", flush=True)
        print(f"| {arch} | SNFS - RigL | {peaks['SNFS'] - peaks['RigL']:+.0f} | |", flush=True)


if __name__ == "__main__":
    main()
