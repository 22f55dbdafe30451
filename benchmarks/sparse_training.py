"""Training with sparse kernels: one layer's forward + backward, dense against ours and against SparseProp.

The layers are ViT-B/16's MLP shapes (768→3072 and 3072→768). Their inputs and output gradients are real: a
small transformer-style network (Fashion-MNIST images cut into 16 patches of 7×7 pixels, a linear embedding to
768, LayerNorm, the MLP block 768→3072→GELU→768 with a residual, mean over tokens, a linear classifier) runs a
real forward and backward on real images and labels, with the MLP's weights masked at the sparsity measured,
and hooks keep each MLP layer's input rows and output gradient. "Rows" is tokens in the batch (16 per image).

Each configuration times, alternately in rounds so that all see the same machine state, a forward and backward
(with the input's gradient, as for any layer but the first) of:

- dense: ``nn.Linear`` with the masked weight (what every peer trains with);
- torch CSR: our training path with every part through torch's CSR operations (MKL), the fallback where the
  native kernels cannot be built;
- sparse: our kernels, every part native (``kernels="sparse"``), the weight's gradient written into a dense
  gradient (0 at dead positions), as on the steps that need one (``live_step=False``, DDP, mask updates);
- sparse, live: the same, the weight's gradient kept as its live values only, as between mask updates with the
  live step (the default on one process): what SparseProp returns too;
- auto: our kernels with the plan "auto" picks by timing each part on these tensors (``kernels="auto"``);
- SparseProp: ``sparseprop.modules.SparseLinear`` (IST-DASLab, float32, AVX2, built at install), which keeps its
  live values as its parameter and returns their gradient only.

The optimizer's step is not in these times (the whole-step benchmark, ``sparse_training_step.py``, has it).

The FLOP ratio (dense over sparse FLOPs of forward + backward, 1/density) is the ideal; "of ideal" is the
measured speed-up over it. Medians of ``--repeats`` runs per round, median over rounds.

    python benchmarks/sparse_training.py [--sparsities 0.9 0.98] [--rows 64 256] [--rounds 5] [--threads 2]
        [--output benchmarks/results/sparse_training.json]

SparseProp is optional, and never a dependency: ``make bench-alternatives`` installs it into .bench-deps
(``pip install --target .bench-deps scipy pybind11``, then ``pip install --no-build-isolation --no-deps --target
.bench-deps sparseprop==0.1.14`` with .bench-deps on PYTHONPATH: it builds with a C++ compiler); without it the
column is left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from timing import median_seconds
from lightning_rigl.data.idx import read_idx
from lightning_rigl.kernels import KernelPlan, TrainingKernels
from lightning_rigl.sparsity.masks import random_masks
from lightning_rigl.sparsity.structure import parse_structure

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SHAPES = ((768, 3072), (3072, 768))  # (in, out) of ViT-B/16's MLP layers
TOKENS = 16  # 7×7 patches per 28×28 image


class PatchMLP(nn.Module):
    """Images → 16 patch tokens → 768 → LayerNorm → MLP block (768→3072→GELU→768, residual) → mean → 10."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(49, 768)
        self.norm = nn.LayerNorm(768)
        self.fc1 = nn.Linear(768, 3072)
        self.fc2 = nn.Linear(3072, 768)
        self.head = nn.Linear(768, 10)

    def forward(self, images: Tensor) -> Tensor:
        patches = images.unfold(2, 7, 7).unfold(3, 7, 7).reshape(images.shape[0], TOKENS, 49)
        tokens = self.embed(patches)  # (B, 16, 768)
        tokens = tokens + self.fc2(nn.functional.gelu(self.fc1(self.norm(tokens))))
        return self.head(tokens.mean(1))


def real_tensors(rows: int, masks: dict[str, Tensor], seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Each MLP layer's input rows (rows, in) and output gradient (rows, out) from a real forward and backward
    on Fashion-MNIST training images, with the given masks applied."""
    torch.manual_seed(seed)
    model = PatchMLP()
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_submodule(name).weight.mul_(mask)
    images = read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz")[: rows // TOKENS].float().div(255).unsqueeze(1)
    labels = read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")[: rows // TOKENS].long()
    seen: dict[str, list[Tensor]] = {name: [] for name in masks}
    hooks = []
    for name in masks:
        module = model.get_submodule(name)
        hooks.append(module.register_forward_pre_hook(lambda m, args, n=name: seen[n].append(args[0].detach())))
        hooks.append(module.register_full_backward_hook(lambda m, gi, go, n=name: seen[n].append(go[0].detach())))
    nn.functional.cross_entropy(model(images), labels).backward()
    for hook in hooks:
        hook.remove()
    return {name: (x.reshape(rows, -1).contiguous(), g.reshape(rows, -1).contiguous())
            for name, (x, g) in seen.items()}


def layer(shape: tuple[int, int], mask: Tensor) -> nn.Linear:
    linear = nn.Linear(*shape)
    with torch.no_grad():
        linear.weight.mul_(mask)
    return linear


def fwd_bwd(module: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    def run() -> None:
        module(x).backward(grad)
    return run


def clear(module: nn.Module, x: Tensor, kernels: TrainingKernels | None) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        for param in module.parameters():
            param.grad = None
        for layer in kernels.layers.values() if kernels is not None else ():
            layer.live_grad = None
    return run


def candidates(shape: tuple[int, int], mask: Tensor, x: Tensor,
               grad: Tensor) -> dict[str, tuple[nn.Module, str, TrainingKernels | None]]:
    """Kernel name -> (module, what it ran, its kernels)."""
    built = {"dense": (layer(shape, mask), "", None)}
    for mode in ("torch csr", "sparse", "sparse, live", "auto"):
        module = layer(shape, mask)
        kernels = TrainingKernels("sparse" if mode in ("torch csr", "sparse, live") else mode)
        kernels.install({"weight": module}, {"weight": mask})
        if mode == "torch csr":
            kernels.layers["weight"].plan = KernelPlan("csr", "csr", "csr")
        live = mode == "sparse, live"
        if live:
            kernels.live_step(torch.optim.SGD(module.parameters(), lr=0.0))  # never stepped here
        kernels.begin_step(dense_weight_grad=False, keep_live_grad=live)
        module(x).backward(grad)  # under "auto": the timing step
        kernels.decide()
        plan = kernels.plans()["weight"][0]
        built[mode] = (module, plan.describe(), kernels)
    try:
        from sparseprop.modules import SparseLinear
    except ImportError:
        return built
    built["sparseprop"] = (SparseLinear.from_dense(layer(shape, mask)), "", None)
    return built


def measure(shape: tuple[int, int], sparsity: float, rows: int, structure: str | None, rounds: int,
            repeats: int) -> dict:
    name = "fc1" if shape == SHAPES[0] else "fc2"
    weights = {"fc1": torch.empty(3072, 768), "fc2": torch.empty(768, 3072)}
    # Under a constant fan-in each neuron holds a whole number of weights: the density rounds down to k / fan-in.
    densities = {key: 1 - sparsity if structure is None else math.floor(w.shape[1] * (1 - sparsity)) / w.shape[1]
                 for key, w in weights.items()}
    masks = random_masks(weights, densities, seed=0, structure=parse_structure(structure))
    x, grad = real_tensors(rows, masks)[name]
    x = x.clone().requires_grad_(True)
    built = candidates(shape, masks[name], x, grad)
    times: dict[str, list[float]] = {key: [] for key in built}
    for round_index in range(rounds):
        order = list(built)[round_index % len(built):] + list(built)[:round_index % len(built)]
        for key in order:
            module, _, kernels = built[key]
            fwd_bwd(module, x, grad)()  # warm
            times[key].append(1e3 * median_seconds(fwd_bwd(module, x, grad), repeats,
                                                   before=clear(module, x, kernels)))
    medians = {key: statistics.median(values) for key, values in times.items()}
    density = float(masks[name].float().mean())
    return {
        "shape": f"{shape[0]}→{shape[1]}", "rows": rows, "sparsity": sparsity, "structure": structure or "unstructured",
        "density": density, "ms": medians, "auto_plan": built["auto"][1],
        "speedup": {key: medians["dense"] / value for key, value in medians.items()},
        "flop_ratio": 1 / density,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.98])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--structures", nargs="+", default=["unstructured", "constant_fan_in"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/sparse_training.json"))
    parser.add_argument("--peer-path", default=".bench-deps", help="folder holding sparseprop (repo-relative)")
    args = parser.parse_args()
    if Path(args.peer_path).is_dir():
        sys.path.insert(0, str(Path(args.peer_path).resolve()))
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    results = []
    header = ("| layer | rows | sparsity | mask | dense (ms) | torch CSR | ours sparse | ours sparse, live | "
              "ours auto (plan) | SparseProp | FLOP ratio | live of ideal |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for structure in args.structures:
        for sparsity in args.sparsities:
            for rows in args.rows:
                for shape in SHAPES:
                    result = measure(shape, sparsity, rows, None if structure == "unstructured" else structure,
                                     args.rounds, args.repeats)
                    results.append(result)
                    ms, speed = result["ms"], result["speedup"]
                    peer = (f"{ms['sparseprop']:.2f} ({speed['sparseprop']:.2f}×)" if "sparseprop" in ms else "–")
                    print(f"| {result['shape']} | {rows} | {sparsity} | {result['structure']} | {ms['dense']:.2f} | "
                          f"{ms['torch csr']:.2f} ({speed['torch csr']:.2f}×) | {ms['sparse']:.2f} "
                          f"({speed['sparse']:.2f}×) | {ms['sparse, live']:.2f} ({speed['sparse, live']:.2f}×) | "
                          f"{ms['auto']:.2f} ({speed['auto']:.2f}×; {result['auto_plan']}) | {peer} | "
                          f"{result['flop_ratio']:.1f} | {speed['sparse, live'] / result['flop_ratio']:.0%} |",
                          flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                       "threads": args.threads, "torch": torch.__version__, "results": results},
                                      indent=1))


if __name__ == "__main__":
    main()
