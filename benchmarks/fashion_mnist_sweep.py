"""Test accuracy against sparsity on Fashion-MNIST: dense, Static, SET and RigL (ERK), through the command.

Each run is the default recipe (`lightning-rigl fit`: LeNet-300-100, 10 epochs, cosine learning rate) with
another method, sparsity and seed. Writes a markdown table and a plot:

    python benchmarks/fashion_mnist_sweep.py [--sparsities 0.9 0.95 0.98] [--seeds 0 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from lightning_rigl.cli import DEFAULT_CONFIG, make_cli

METHODS = {"Static": "lightning_rigl.Static", "SET": "lightning_rigl.SET", "RigL": "lightning_rigl.RigL"}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]


def callbacks_config(folder: Path, method: str | None, sparsity: float, seed: int) -> Path:
    """A config to stack on the default that sets the sparse callback (none for dense)."""
    path = folder / f"{method}_{sparsity}_{seed}.yaml"
    if method is None:
        path.write_text("trainer:\n  callbacks: []\n")
    else:
        path.write_text(
            f"trainer:\n  callbacks:\n    - class_path: {METHODS[method]}\n      init_args:\n"
            f"        sparsity: {sparsity}\n        distribution: erk\n        seed: {seed}\n"
        )
    return path


def run(folder: Path, method: str | None, sparsity: float, seed: int) -> float:
    """Test top-1 accuracy of one run."""
    cli = make_cli(["fit", "--config", str(DEFAULT_CONFIG), "--config", str(callbacks_config(folder, method, sparsity, seed)),
                    "--seed_everything", str(seed), *QUIET], save_config_callback=None)
    return float(cli.trainer.callback_metrics["test/acc_top1"])


def plot(results: dict[tuple[str, float], list[float]], dense: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), layout="constrained")
    for method in METHODS:
        points = sorted((s, statistics.mean(a)) for (m, s), a in results.items() if m == method)
        axes.plot([s for s, _ in points], [100 * a for _, a in points], marker="o", label=f"{method} (ERK)")
    axes.axhline(100 * statistics.mean(dense), color="black", linestyle="--", label="dense")
    axes.set_xlabel("sparsity (fraction of zero weights)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("LeNet-300-100 on Fashion-MNIST, 10 epochs")
    axes.legend()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    results: dict[tuple[str, float], list[float]] = {}
    dense: list[float] = []
    runs = [(None, 0.0)] + [(m, s) for s in args.sparsities for m in METHODS]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for index, (method, sparsity) in enumerate(runs, 1):
            for seed in args.seeds:
                accuracy = run(Path(folder), method, sparsity, seed)
                (dense if method is None else results.setdefault((method, sparsity), [])).append(accuracy)
                print(f"[{index}/{len(runs)}] {method or 'dense'} sparsity {sparsity} seed {seed}: "
                      f"test accuracy {accuracy:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)

    def cell(values: list[float]) -> str:
        spread = f" ± {statistics.stdev(values) * 100:.2f}" if len(values) > 1 else ""
        return f"{statistics.mean(values) * 100:.2f}{spread}"

    lines = ["| method | " + " | ".join(f"{s:g}" for s in args.sparsities) + " |",
             "| --- |" + " --- |" * len(args.sparsities),
             "| dense | " + " | ".join(cell(dense) for _ in args.sparsities) + " |"]
    lines += [f"| {m} (ERK) | " + " | ".join(cell(results[m, s]) for s in args.sparsities) + " |" for m in METHODS]
    table = "\n".join(lines)
    (args.out / "fashion_mnist_sweep.md").write_text(table + "\n")
    plot(results, dense, args.out / "fashion_mnist_sweep.png")
    print(f"\nTest accuracy (%), mean ± std over seeds {args.seeds}:\n{table}")


if __name__ == "__main__":
    main()
