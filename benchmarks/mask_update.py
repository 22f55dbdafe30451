"""Time one full RigL mask update of torchvision's ResNet-50 (25.5M sparsified weights) on the CPU.

The update reads the gradients of a real forward and backward pass (batch 2 at 32×32 and at 224×224) and,
for comparison, random gradients. Real gradients are full of exact zeros (ReLU, padding; at 32×32 the
3×3 convs of layer4 see a 1×1 map, so 8 of 9 kernel taps get no gradient) and ties. Each figure is the
median over several updates, each from the same starting state, beside two baselines timed in the same run:
one elementwise pass over every weight, gradient and mask (``torch.where(mask, weight, grad)``: the floor
for any update, which must read each of them once) and a plain full top-k per layer (selection only). Under DDP
the callback also digests the new masks to compare them across processes (``mask_digest``, timed apart).

    python benchmarks/mask_update.py [--sparsity 0.9] [--distribution erk] [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from timing import median_seconds

from lightning_rigl.callbacks.sparse_training import gradients_ready
from lightning_rigl.sparsity import drop_and_grow, layer_densities, live_count, mask_digest, random_mask
from lightning_rigl.sparsity.masks import Stream, apply_change, generator
from lightning_rigl.sparsity.parallel import for_each_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--distribution", default="erk")
    parser.add_argument("--drop-fraction", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    densities = layer_densities(model, args.sparsity, args.distribution)
    params = {name: model.get_parameter(name) for name in densities}
    start_masks = {}
    with torch.no_grad():
        for index, (name, param) in enumerate(params.items()):
            n_live = live_count(param.numel(), densities[name])
            gen = generator(0, Stream.INITIAL_MASK, 0, index)
            start_masks[name] = random_mask(param.shape, n_live, gen, param.device)
            param.mul_(start_masks[name])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    for name, param in params.items():
        param.grad.mul_(start_masks[name])
    optimizer.step()  # creates the momentum buffers the update must reset; dead weights stay 0
    start_weights = {name: param.detach().clone() for name, param in params.items()}
    n_weights = sum(p.numel() for p in params.values())
    print(f"ResNet-50, {n_weights / 1e6:.1f}M sparsified weights, sparsity {args.sparsity} {args.distribution}, "
          f"drop fraction {args.drop_fraction}, {torch.get_num_threads()} threads, median of {args.repeats}")

    for source in ("real 32x32", "real 224x224", "random"):
        grads = gradients(model, source)
        zeros = sum(int((g == 0).sum()) for g in grads.values()) / n_weights
        for name, param in model.named_parameters():
            param.grad = grads[name].clone()
        masks = {name: mask.clone() for name, mask in start_masks.items()}

        def restore() -> None:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(start_weights[name])
                    param.grad.copy_(grads[name])
                    masks[name].copy_(start_masks[name])

        def update_layer(index: int, name: str, param: torch.Tensor) -> None:
            n_swap = int(args.drop_fraction * live_count(param.numel(), densities[name]))
            change = drop_and_grow(masks[name], param.detach(), param.grad.abs(), n_swap, n_swap)
            apply_change(param, change, optimizer)

        def update() -> None:
            # What the callback does at an update step: the finiteness check of every gradient, then the update.
            assert gradients_ready(optimizer)
            for_each_layer(update_layer, params)

        def elementwise_pass() -> None:
            for name, param in params.items():
                torch.where(masks[name], param.detach(), param.grad)

        def full_topk() -> None:
            for name, param in params.items():
                mask = masks[name].view(-1)
                n_swap = int(args.drop_fraction * live_count(param.numel(), densities[name]))
                drop_scores = torch.where(mask, param.detach().abs().view(-1), torch.inf)
                dropped = torch.topk(drop_scores, n_swap, largest=False).indices
                kept = mask.clone()
                kept[dropped] = False
                grow_scores = torch.where(kept, -1.0, param.grad.abs().view(-1))
                torch.topk(grow_scores, n_swap).indices

        def digest() -> None:
            mask_digest(masks)

        ours = median_seconds(update, args.repeats, before=restore)
        digest_time = median_seconds(digest, args.repeats, before=restore)
        floor = median_seconds(elementwise_pass, args.repeats, before=restore)
        baseline = median_seconds(full_topk, args.repeats, before=restore)
        print(f"gradients: {source} ({zeros:.0%} exact zeros)")
        print(f"  lightning-rigl update (with finiteness check):  {ours:.3f} s   ({ours / floor:.1f}x the pass)")
        print(f"  mask digest (DDP agreement check, no gather):    {digest_time:.3f} s   "
              f"({digest_time / ours:.0%} of the update)")
        print(f"  one elementwise pass (torch.where):              {floor:.3f} s")
        print(f"  full top-k per layer (selection only):           {baseline:.3f} s   ({baseline / ours:.1f}x ours)")


def gradients(model: torch.nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Every parameter's gradient: of a real forward and backward (batch 2, random images and labels, the
    model in training mode) at the given size, or standard normal numbers."""
    names = [name for name, _ in model.named_parameters()]
    if source == "random":
        gen = torch.Generator().manual_seed(0)
        return {name: torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}
    size = int(source.split("x")[-1])
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=gen)
    labels = torch.randint(0, 1000, (2,), generator=gen)
    model.zero_grad(set_to_none=True)
    model.train()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert list(grads) == names
    return grads


if __name__ == "__main__":
    main()
