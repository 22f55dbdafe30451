"""FLOPs and model size as the RigL paper counts them; pure torch.

Counting: ``torch.utils.flop_counter`` on a real forward pass of one example, per module. It counts matrix
products and convolutions (a multiply and an add are one FLOP each, so a multiply-add is 2), the operations
that sparsity removes; elementwise operations (BatchNorm, ReLU, residual additions, pooling, bias additions)
are not counted. A sparse layer costs its dense FLOPs times its density, as in the paper.

How this compares with the published figures (``tests/test_flops.py``):

- torchvision's ResNet-50 at 224×224 counts 8.18e9 FLOPs (the official README: 8.2e9). Its inference
  multiples are a little below the official ones at high sparsity (uniform 0.8: 0.223 against 0.23): the
  official count also charges the elementwise operations, a dense part of about 1% of the network that no
  sparsity removes, which lifts every multiple slightly. All multiples agree within 0.01.
- Model size: torchvision's ResNet-50 has 26,560 parameters (0.106 MB) more than the official dense size
  implies (102.228 against 102.122 MB). That is exactly one of the two vectors (scale γ and offset β) of every
  BatchNorm layer: the official count holds one vector per BatchNorm, torchvision's model has both. At 90% and
  above, our sparse sizes are that same 0.106 MB above the README's; at 80% they are 0.124 MB (ERK) and
  0.152 MB (uniform) above, a further 0.018 and 0.046 MB we have not explained. Each agrees within 1% or
  0.12 MB.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_rigl.sparsity.distributions import live_count


def module_flops(model: nn.Module, input_size: Sequence[int]) -> dict[str, float]:
    """FLOPs of one forward pass of one example of shape ``input_size``, per module: the module's name in
    ``model.named_modules()`` ("" for the whole model) -> the FLOPs of the matrix products and convolutions
    it runs, its submodules' included. The model runs in eval mode, on a zero input, without gradients."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    flops = {"": float(sum(counts.get("Global", {}).values()))}
    for key, ops in counts.items():
        if key.startswith(root + "."):
            flops[key[len(root) + 1:]] = float(sum(ops.values()))
    return flops


def forward_flops(model: nn.Module, input_size: Sequence[int], densities: Mapping[str, float] | None = None) -> float:
    """FLOPs of one forward pass of one example of shape ``input_size`` (e.g. ``(3, 224, 224)``): matrix
    products and convolutions, a multiply and an add one FLOP each. Every layer whose weight is named in
    ``densities`` (parameter name -> density, e.g. ``callback.densities`` or ``layer_densities(...)``) costs
    its dense FLOPs times its density; other layers are dense.

    Raises:
        ValueError: a name in ``densities`` is not the ``weight`` of a module that runs in the forward pass.
    """
    flops = module_flops(model, input_size)
    saved = 0.0
    for name, density in (densities or {}).items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module not in flops:
            raise ValueError(f"{name!r} is not the weight of a convolution or linear layer that runs in the forward "
                             "pass; densities must name such weights (as callback.densities does).")
        saved += flops[module] * (1.0 - density)
    return flops[""] - saved


def model_size_bytes(model: nn.Module, densities: Mapping[str, float] | None = None) -> float:
    """Size of the model as the official README counts it: 4 bytes per live weight of every sparse layer (the
    parameters named in ``densities``) and per value of every other parameter, plus one bit per position of
    every sparse layer (its bitmask). Buffers (BatchNorm statistics) are not counted.

    Raises:
        ValueError: a name in ``densities`` is not a parameter of ``model``.
    """
    densities = dict(densities or {})
    params = dict(model.named_parameters())
    unknown = sorted(set(densities) - set(params))
    if unknown:
        raise ValueError(f"densities name parameters the model lacks: {unknown[:5]}.")
    size = 0.0
    for name, param in params.items():
        if name in densities:
            size += 4 * live_count(param.numel(), densities[name]) + param.numel() / 8
        else:
            size += 4 * param.numel()
    return size


class TrainingFlops:
    """Training FLOPs spent so far, per example, as the paper counts them, against dense training over the
    same optimizer steps (3·f_D per step: a forward pass, and a backward pass costing two).

    A step's cost is that of its forward pass, f_S at the densities the step trained with, plus its backward
    pass: 2·f_S when only the sparse gradient is needed, or f_S + f_D when the step computed the dense gradient
    (RigL's and SNIP's update steps, every step of SNFS until T_end). Static, SET and a finished RigL pay
    3·f_S; pruning and redistribution pay at their current densities.

    Args:
        layer_flops: forward FLOPs of each sparse layer when dense (parameter name -> FLOPs).
        dense_flops: f_D, the forward FLOPs of the whole dense model.
    """

    def __init__(self, layer_flops: Mapping[str, float], dense_flops: float) -> None:
        self.layer_flops = dict(layer_flops)
        self.dense_flops = float(dense_flops)
        self.spent = 0.0
        self.dense_spent = 0.0

    @classmethod
    def of(cls, model: nn.Module, input_size: Sequence[int], sparse_names: Sequence[str]) -> TrainingFlops:
        """The account of ``model`` on examples of shape ``input_size`` with the given sparse weights."""
        flops = module_flops(model, input_size)
        return cls({name: flops.get(name.removesuffix(".weight"), 0.0) for name in sparse_names}, flops[""])

    def forward(self, densities: Mapping[str, float]) -> float:
        """f_S: forward FLOPs of one example with the sparse layers at ``densities``."""
        return self.dense_flops - sum(flops * (1.0 - densities[name]) for name, flops in self.layer_flops.items())

    def add_step(self, sparse_forward: float, dense_gradient: bool) -> None:
        """Count one optimizer step whose forward pass cost ``sparse_forward`` (f_S, from ``forward``);
        ``dense_gradient``: the step computed the dense gradient."""
        self.spent += 2 * sparse_forward + (self.dense_flops if dense_gradient else sparse_forward)
        self.dense_spent += 3 * self.dense_flops

    @property
    def train_ratio(self) -> float:
        """Training FLOPs spent over what dense training spends in the same steps (0 before the first step)."""
        return self.spent / self.dense_spent if self.dense_spent else 0.0
