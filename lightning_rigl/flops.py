"""FLOPs and model size as the RigL paper counts them; pure torch.

Counting: ``torch.utils.flop_counter``'s formulas on a real forward pass of one example, each matrix product
and convolution given to the weight it reads, whoever calls it (a module, ``F.linear``, the attention
functions). It counts matrix products, convolutions and attention's products of two activations (a multiply
and an add are one FLOP each, so a multiply-add is 2); elementwise operations (BatchNorm, ReLU, residual
additions, pooling, bias additions, softmax) are not counted. A sparse weight costs the dense FLOPs of its
products times its density, as in the paper; products of two activations stay dense.

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from lightning_rigl.sparsity.distributions import live_count
from lightning_rigl.sparsity.sharding import is_sharded

aten = torch.ops.aten


Example = Sequence[int] | Tensor  # the shape of one example, or an example batch of one (any dtype)

# The attention kernel PyTorch runs on the CPU, which torch.utils.flop_counter has no formula for: its FLOPs
# are those of the same product on the GPU's flash kernel (q·kᵀ and attention·v).
_FORMULAS = {**flop_registry, aten._scaled_dot_product_flash_attention_for_cpu:
             flop_registry[aten._scaled_dot_product_flash_attention]}
# Which arguments of an operation are its matrix operands (a weight among them owns the operation's FLOPs).
_OPERANDS = {aten.mm: (0, 1), aten.addmm: (1, 2), aten.bmm: (0, 1), aten.baddbmm: (1, 2),
             aten.convolution: (1,), aten._convolution: (1,), aten.convolution_overrideable: (1,),
             aten.cudnn_convolution: (1,), aten._slow_conv2d_forward: (1,)}


@dataclass
class WeightFlops:
    """FLOPs of one forward pass of one example.

    Attributes:
        total: every matrix product, convolution and attention product.
        per_weight: parameter name -> the FLOPs of the products and convolutions that read it (through a
            module, ``F.linear``, or inside ``F.multi_head_attention_forward``); products of two activations
            (q·kᵀ, attention·v) belong to no weight.
    """

    total: float
    per_weight: dict[str, float]


class _CountByWeight(TorchDispatchMode):
    """Counts FLOPs per operation as ``torch.utils.flop_counter`` does, and gives each to the parameter among its
    operands (found by storage, so that a view such as ``W.t()`` or a chunk of ``in_proj_weight`` counts).

    Parameters sharded by FSDP2 are whole only while their module runs, gathered into one buffer per group: those
    are found by address range (``gathered``: [start, end) of a module's whole parameters, set while it runs)."""

    def __init__(self, owners: Mapping[int, str]) -> None:
        super().__init__()
        self.owners = owners
        self.gathered: dict[tuple[int, int], str] = {}
        self.flops = WeightFlops(0.0, {})

    def owner(self, tensor: Tensor) -> str | None:
        """The parameter ``tensor`` reads, if any."""
        owner = self.owners.get(tensor.untyped_storage().data_ptr())
        if owner is None and self.gathered:
            address = tensor.data_ptr()
            owner = next((name for (start, end), name in self.gathered.items() if start <= address < end), None)
        return owner

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in _FORMULAS:
            flops = float(_FORMULAS[packet](*args, **kwargs, out_val=out))
            self.flops.total += flops
            operands = [args[i] for i in _OPERANDS.get(packet, range(len(args))) if i < len(args)]
            owner = next((name for name in (self.owner(t) for t in operands if isinstance(t, Tensor)) if name), None)
            if owner is not None:
                self.flops.per_weight[owner] = self.flops.per_weight.get(owner, 0.0) + flops
        return out


def weight_flops(model: nn.Module, example: Example) -> WeightFlops:
    """FLOPs of one forward pass of ``model`` on one example, in total and per weight (``WeightFlops``).

    Args:
        example: the shape of one example (``(3, 224, 224)``: a zero input of the model's dtype), or an example
            batch of one, of any dtype (token ids, say).

    The model runs in eval mode with gradients enabled: without them, ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` take a fused path whose products no counter sees.
    """
    parameter = next(model.parameters(), None)
    if not isinstance(example, Tensor):
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        example = torch.zeros(1, *example, device=device, dtype=dtype)
    owners = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters() if not is_sharded(p)}
    counter = _CountByWeight(owners)
    hooks = [hook for prefix, module in model.named_modules() if isinstance(module, FSDPModule)
             for hook in _track_gathered(counter, prefix, module)]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), counter:
            model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return counter.flops


def _track_gathered(counter: _CountByWeight, prefix: str, module: nn.Module) -> list[Any]:
    """Hooks on a module ``fully_shard`` manages: while it runs, the address ranges of the parameters FSDP2 has
    gathered whole for it (those of nested managed modules are gathered by those), forgotten when it returns."""
    names = [f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters()]
    entered: list[dict[tuple[int, int], str]] = []

    def enter(*_: Any) -> None:
        params = (p for _, p in module.named_parameters())
        ranges = {(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()): name
                  for name, p in zip(names, params) if not is_sharded(p)}
        counter.gathered.update(ranges)
        entered.append(ranges)

    def leave(*_: Any) -> None:
        for key in entered.pop():
            counter.gathered.pop(key, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


def forward_flops(model: nn.Module, example: Example, densities: Mapping[str, float] | None = None) -> float:
    """FLOPs of one forward pass of one example (``example``: its shape, e.g. ``(3, 224, 224)``, or an example
    batch of one, of any dtype): matrix products, convolutions and attention products, a multiply and an add
    one FLOP each. Every weight named in ``densities`` (parameter name -> density, e.g. ``callback.densities``
    or ``layer_densities(...)``) costs the dense FLOPs of the products that read it times its density; the rest
    is dense, products of two activations (q·kᵀ) included.

    Raises:
        ValueError: a name in ``densities`` is not a parameter that a product or convolution of the forward pass
            reads.
    """
    return sparse_forward(weight_flops(model, example), densities or {})


def sparse_forward(flops: WeightFlops, densities: Mapping[str, float]) -> float:
    """f_S: ``flops.total`` with each weight named in ``densities`` costing its FLOPs times its density.

    Raises:
        ValueError: a name in ``densities`` owns no FLOPs.
    """
    unknown = sorted(set(densities) - set(flops.per_weight))
    if unknown:
        raise ValueError(f"{unknown[:3]} are not weights that a matrix product or convolution of the forward pass "
                         "reads; densities must name such weights (as callback.densities does).")
    return flops.total - sum(flops.per_weight[name] * (1.0 - density) for name, density in densities.items())


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
    def of(cls, model: nn.Module, example: Example, sparse_names: Sequence[str]) -> TrainingFlops:
        """The account of ``model`` on examples like ``example`` (a shape, or a batch of one) with the given
        sparse weights."""
        flops = weight_flops(model, example)
        return cls({name: flops.per_weight.get(name, 0.0) for name in sparse_names}, flops.total)

    def forward(self, densities: Mapping[str, float]) -> float:
        """f_S: forward FLOPs of one example with the sparse layers at ``densities``."""
        return sparse_forward(WeightFlops(self.dense_flops, self.layer_flops), densities)

    def add_step(self, sparse_forward: float, dense_gradient: bool) -> None:
        """Count one optimizer step whose forward pass cost ``sparse_forward`` (f_S, from ``forward``);
        ``dense_gradient``: the step computed the dense gradient."""
        self.spent += 2 * sparse_forward + (self.dense_flops if dense_gradient else sparse_forward)
        self.dense_spent += 3 * self.dense_flops

    @property
    def train_ratio(self) -> float:
        """Training FLOPs spent over what dense training spends in the same steps (0 before the first step)."""
        return self.spent / self.dense_spent if self.dense_spent else 0.0
