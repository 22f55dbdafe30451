"""Peak memory of sparse training against dense training, on the CPU: the process's peak resident set size.

Each (model, method) trains in a fresh process (so that one peak does not hide another) for a few optimizer
steps of SGD with Nesterov momentum on random inputs of the model's shape (memory does not depend on the
values), and reports ru_maxrss. The dense run of the same model, in the same invocation, is the baseline;
SNFS's moving average of the dense gradient (4 bytes per sparsified weight) shows as its difference to RigL.

    python benchmarks/memory.py [--models lenet300_100 wrn22_2 resnet50] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--measure", nargs=2, metavar=("ARCH", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure, args.steps)
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
