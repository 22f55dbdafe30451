"""Time one RigL mask update of lightning-rigl beside rigl-torch 0.5.2 (``rigl_torch.RigL.RigLScheduler``).

Both update the same model from the same state: the same masks (uniform sparsity, first layer dense, which is
the only distribution rigl-torch accepts and how it treats the first layer), the same weights after one SGD
step with Nesterov momentum (so momentum buffers exist), and the dense gradient of one real forward and backward
pass (batch 2, random images and labels, train mode). Each swaps drop fraction x live connections per layer
(rigl-torch's cosine schedule at step 0 gives exactly its alpha). Timed: lightning-rigl's ``gradients_ready``
then ``drop_and_grow`` + ``apply_change`` over the layers with ``for_each_layer``; rigl-torch's ``_rigl_step()``
(it reads the dense gradient its backward hooks store, set here directly). The floor, timed in the same run, is
one elementwise pass ``torch.where(mask, weight, grad)`` over every sparsified layer. Take timings on an idle
machine: with another process on the cores, every multithreaded op stalls (about 16 ms each on 2 busy cores).
Install rigl-torch first (outside the project's dependencies):

    pip install --no-deps --target .bench-deps rigl-torch==0.5.2
    python benchmarks/vs_rigl_torch.py [--models lenet300_100 wrn22_2 resnet50] [--sparsity 0.9] [--repeats 5]
        [--threads 2] [--rigl-torch-path .bench-deps]
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import sys
from pathlib import Path

import torch
import torchvision
from timing import median_seconds
from torch import nn

from lightning_rigl.callbacks.sparse_training import gradients_ready
from lightning_rigl.models import create_model
from lightning_rigl.sparsity import drop_and_grow, layer_densities, live_count, random_masks
from lightning_rigl.sparsity.masks import apply_change
from lightning_rigl.sparsity.parallel import for_each_layer

# name -> (builder, input shape of one example, classes)
MODELS = {
    "lenet300_100": (lambda: create_model("lenet300_100", 10), (1, 28, 28), 10),
    "wrn22_2": (lambda: create_model("wrn22_2", 10), (3, 32, 32), 10),
    "resnet50": (torchvision.models.resnet50, (3, 32, 32), 1000),
}
INSTALL = "pip install --no-deps --target .bench-deps rigl-torch==0.5.2"


def import_rigl_torch(path: str) -> type:
    """rigl-torch's ``RigLScheduler``, from ``path`` (relative to the repo root) if it exists; exits if missing."""
    folder = Path(__file__).resolve().parents[1] / path
    if folder.is_dir():
        sys.path.insert(0, str(folder))
    try:
        from rigl_torch.RigL import RigLScheduler
    except ImportError:
        sys.exit(f"rigl-torch is not installed; from the repo root run: {INSTALL}")
    return RigLScheduler


def sgd(model: nn.Module) -> torch.optim.SGD:
    """The optimizer both libraries update: SGD with Nesterov momentum, whose buffers an update must mask."""
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)


def compare(name: str, args: argparse.Namespace, scheduler_class: type) -> str:
    """One output line for model ``name``: both updates timed from the same starting state, and the floor."""
    build, shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = build().train()
    densities = layer_densities(model, args.sparsity, "uniform")
    all_masks = random_masks({n: model.get_parameter(n) for n in densities}, densities)
    sparse = {n: model.get_parameter(n) for n, d in densities.items() if d < 1.0}
    masks = {n: all_masks[n] for n in sparse}
    with torch.no_grad():
        for n, p in sparse.items():
            p.mul_(masks[n])
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(2, *shape, generator=gen), torch.randint(0, classes, (2,), generator=gen)
    nn.functional.cross_entropy(model(images), labels).backward()  # of the sparse net, at dead positions too
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    optimizer = sgd(model)
    for n, p in sparse.items():
        p.grad.mul_(masks[n])  # as in training: dead weights get no update and keep a zero momentum
    optimizer.step()

    # A copy taken before rigl-torch's constructor, which draws its own random masks and zeroes weights with them.
    theirs_model = copy.deepcopy(model)
    theirs_optimizer = sgd(theirs_model)
    theirs_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    scheduler = scheduler_class(theirs_model, theirs_optimizer, dense_allocation=1 - args.sparsity, T_end=1000,
                                delta=100, alpha=args.drop_fraction, sparsity_distribution="uniform",
                                ignore_linear_layers=False)  # its default keeps every linear layer dense
    their_names = {id(p): n for n, p in theirs_model.named_parameters()}
    their_layers = {their_names[id(w)]: (index, w) for index, w in enumerate(scheduler.W) if scheduler.S[index] > 0}
    if list(their_layers) != list(sparse):
        return (f"{name}: not timed, different layers sparsified: lightning-rigl "
                f"{sum(p.numel() for p in sparse.values())} weights in {list(sparse)}, rigl-torch "
                f"{sum(w.numel() for _, w in their_layers.values())} in {list(their_layers)}")
    start = {n: (p.detach().clone(), optimizer.state[p]["momentum_buffer"].clone(), masks[n].clone())
             for n, p in sparse.items()}
    for n, (index, _) in their_layers.items():
        scheduler.backward_hook_objects[index].dense_grad = grads[n]  # only read by _rigl_step

    def restore_ours() -> None:
        with torch.no_grad():
            for n, p in sparse.items():
                weight, momentum, mask = start[n]
                p.copy_(weight)
                p.grad.copy_(grads[n])  # the callback updates before it masks this step's gradient
                optimizer.state[p]["momentum_buffer"].copy_(momentum)
                masks[n].copy_(mask)

    def restore_theirs() -> None:
        scheduler.step = 0  # cosine_annealing() is then exactly alpha
        with torch.no_grad():
            for n, (index, w) in their_layers.items():
                weight, momentum, mask = start[n]
                w.copy_(weight)
                w.grad = grads[n] * mask  # its backward hook returns the masked gradient
                theirs_optimizer.state[w]["momentum_buffer"].copy_(momentum)
                scheduler.backward_masks[index].copy_(mask)

    def update_layer(index: int, n: str, p: nn.Parameter) -> None:
        n_swap = int(args.drop_fraction * live_count(p.numel(), densities[n]))
        apply_change(p, drop_and_grow(masks[n], p.detach(), p.grad.abs(), n_swap, n_swap), optimizer)

    def ours() -> None:
        assert gradients_ready(optimizer)  # the callback's finiteness check, part of its update
        for_each_layer(update_layer, sparse)

    def mask_pass() -> None:
        scheduler.reset_momentum()
        scheduler.apply_mask_to_weights()
        scheduler.apply_mask_to_gradients()

    def floor() -> None:
        for n, p in sparse.items():
            torch.where(masks[n], p.detach(), p.grad)

    restore_ours()
    ours()
    restore_theirs()
    scheduler._rigl_step()
    differ = sum(int((masks[n] != scheduler.backward_masks[i]).sum()) for n, (i, _) in their_layers.items())
    time_ours = median_seconds(ours, args.repeats, before=restore_ours)
    time_theirs = median_seconds(scheduler._rigl_step, args.repeats, before=restore_theirs)
    # _rigl_step re-masks every layer's momentum, weight and gradient after each layer: L passes where 1 would do.
    time_pass = median_seconds(mask_pass, args.repeats, before=restore_theirs)
    time_floor = median_seconds(floor, args.repeats, before=restore_ours)
    n_params = sum(p.numel() for p in model.parameters())
    n_sparse = sum(p.numel() for p in sparse.values())
    return (f"{name:<13} {n_params / 1e6:7.2f}M {n_sparse / 1e6:7.2f}M {len(sparse):4d} {time_ours:12.4f} s "
            f"{time_theirs:12.4f} s {time_theirs / time_ours:6.1f}x {time_floor:12.4f} s "
            f"{(len(sparse) - 1) * time_pass:12.4f} s {differ:7d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--drop-fraction", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rigl-torch-path", default=".bench-deps", help="folder holding rigl_torch (repo-relative)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scheduler_class = import_rigl_torch(args.rigl_torch_path)
    print(f"rigl-torch {importlib.metadata.version('rigl-torch')}, sparsity {args.sparsity} uniform (both keep the "
          f"first layer dense, sparsify every other conv and linear weight), drop fraction {args.drop_fraction}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("lightning-rigl: 2 worker threads over layers, finiteness check included; rigl-torch: one layer at a time")
    print(f"{'model':<13} {'params':>8} {'sparse':>8} {'L':>4} {'lightning-rigl':>14} {'rigl-torch':>14} "
          f"{'ratio':>7} {'elementwise':>14} {'(L-1) passes':>14} {'differ':>7}")
    for name in args.models:
        print(compare(name, args, scheduler_class), flush=True)
    print("sparse: weights sparsified (in L layers), the same for both (else a model says so). ratio: rigl-torch / "
          "lightning-rigl.\n(L-1) passes: the part of rigl-torch's time spent re-masking momentum, weights and "
          "gradients of all\nL layers after each layer, estimated from one pass. differ: mask positions where the two "
          "results disagree\n(ties among equal |grad| or |w|, broken differently).")


if __name__ == "__main__":
    main()
