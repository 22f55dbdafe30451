"""Time one full RigL mask update of torchvision's ResNet-50 (25.5M sparsified weights) on the CPU.

Compares, in the same run, lightning-rigl's update with the plain approach it replaces (a full top-k per
layer for drop and for grow). Prints the median of several runs and the ratio.

    python benchmarks/mask_update.py [--sparsity 0.9] [--distribution erk] [--repeats 7]
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from timing import median_seconds

from lightning_rigl.callbacks.sparse_training import gradients_finite
from lightning_rigl.sparsity import drop_and_grow, layer_densities, live_count, random_mask
from lightning_rigl.sparsity.masks import Stream, apply_change, generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--distribution", default="erk")
    parser.add_argument("--drop-fraction", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    densities = layer_densities(model, args.sparsity, args.distribution)
    params = {name: model.get_parameter(name) for name in densities}
    optimizer = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9, nesterov=True)
    masks = {}
    for index, (name, param) in enumerate(params.items()):
        masks[name] = random_mask(param.shape, live_count(param.numel(), densities[name]), generator(0, Stream.INITIAL_MASK, 0, index), param.device)
        param.grad = torch.randn_like(param)
        with torch.no_grad():
            param.mul_(masks[name])
    optimizer.step()  # creates the momentum buffers the update must reset
    n_weights = sum(p.numel() for p in params.values())

    def lightning_rigl_update() -> None:
        # What the callback does at an update step: the finiteness check of every gradient, then the update.
        assert gradients_finite(optimizer)
        for name, param in params.items():
            n_swap = int(args.drop_fraction * live_count(param.numel(), densities[name]))
            change = drop_and_grow(masks[name], param.detach(), param.grad.abs(), n_swap)
            apply_change(param, change, optimizer)

    def full_topk_update() -> None:
        for name, param in params.items():
            mask = masks[name].view(-1)
            n_swap = int(args.drop_fraction * live_count(param.numel(), densities[name]))
            drop_scores = torch.where(mask, param.detach().abs().view(-1), torch.inf)
            dropped = torch.topk(drop_scores, n_swap, largest=False).indices
            kept = mask.clone()
            kept[dropped] = False
            grow_scores = torch.where(kept, -1.0, param.grad.abs().view(-1))
            torch.topk(grow_scores, n_swap).indices

    ours = median_seconds(lightning_rigl_update, args.repeats)
    baseline = median_seconds(full_topk_update, args.repeats)
    print(f"ResNet-50, {n_weights / 1e6:.1f}M sparsified weights, sparsity {args.sparsity} {args.distribution}, "
          f"drop fraction {args.drop_fraction}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  lightning-rigl update (with finiteness check):  {ours:.3f} s")
    print(f"  full top-k per layer (selection only):           {baseline:.3f} s   ({baseline / ours:.1f}x slower)")


if __name__ == "__main__":
    main()
