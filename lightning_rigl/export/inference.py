"""Inference with sparse kernels: linear layers and convolutions computed as CSR matrix products.

A dense layer multiplies every weight; a sparse one only the live ones, through ``torch.sparse.mm`` on a CSR
weight (MKL's sparse BLAS on the CPU, cuSPARSE on CUDA). Whether that is faster depends on the layer, the
sparsity, the batch and the machine, so ``mode="auto"`` measures each layer both ways on a real input and
keeps the faster.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_rigl.export.file import nonzero_masks

log = logging.getLogger(__name__)

Mode = Literal["auto", "sparse"]


@dataclass(frozen=True)
class LayerChoice:
    """What ``sparse_inference`` did with one sparse layer.

    Args:
        name: the module's name in the model.
        kind: "linear", "conv1x1", "conv" (a k×k convolution through im2col), "grouped conv" (never converted)
            or the module's class name (never converted).
        density: fraction of live weights.
        dense_ms: median time of the dense layer on the example input (milliseconds); None when not timed.
        sparse_ms: the same for the sparse layer.
        converted: whether the inference copy computes this layer with the sparse kernel.
    """

    name: str
    kind: str
    density: float
    dense_ms: float | None
    sparse_ms: float | None
    converted: bool

    @property
    def gain(self) -> float | None:
        """Dense time over sparse time: above 1, the sparse kernel is faster."""
        return None if self.dense_ms is None or not self.sparse_ms else self.dense_ms / self.sparse_ms


class SparseLinear(nn.Module):
    """A linear layer whose weight is a CSR matrix: y = (W xᵀ)ᵀ + b."""

    def __init__(self, linear: nn.Linear, mask: Tensor) -> None:
        super().__init__()
        self.weight = _csr(linear.weight, mask)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.out_features = linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class SparseConv2d(nn.Module):
    """A 2-d convolution as one CSR matrix product over the input's columns: a 1×1 convolution directly on the
    channels (strided by slicing), a k×k one on the im2col unfolding."""

    def __init__(self, conv: nn.Conv2d, mask: Tensor) -> None:
        super().__init__()
        self.weight = _csr(conv.weight.reshape(conv.out_channels, -1), mask.reshape(conv.out_channels, -1))
        self.bias = None if conv.bias is None else conv.bias.detach().clone().view(1, -1, 1, 1)
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.pointwise = conv.kernel_size == (1, 1) and conv.padding == (0, 0)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        if self.pointwise:
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
            height, width = x.shape[2:]
            columns = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N·H·W)
        else:
            columns = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C·k·k, L)
            height = (x.shape[2] + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) \
                // self.stride[0] + 1
            width = columns.shape[2] // height
            columns = columns.transpose(0, 1).reshape(columns.shape[1], -1)  # (C·k·k, N·L)
        out = torch.sparse.mm(self.weight, columns).reshape(self.out_channels, n, height, width).transpose(0, 1)
        return out if self.bias is None else out + self.bias


def sparse_inference(model: nn.Module, masks: Mapping[str, Tensor] | None = None, example_input: Tensor | None = None,
                     mode: Mode = "auto", repeats: int = 7) -> nn.Module:
    """An inference copy of ``model`` (eval mode, no gradients needed) whose sparse layers compute with CSR kernels.

    Linear layers and ungrouped 2-d convolutions with zero padding are converted; others (depthwise
    convolutions, for instance) stay dense. The copy gives the model's outputs to float tolerance, with every
    weight outside its mask taken as 0. ``model`` itself is not changed. The copy's ``sparse_layers`` lists a
    ``LayerChoice`` per candidate layer (also logged at INFO level).

    Args:
        model: the trained model.
        masks: parameter name -> bool tensor (True: live), e.g. ``callback.masks``; the layers to consider.
            Default: every convolution and linear weight that holds a zero, masked by its non-zero positions.
        example_input: a batch like those the copy will see (same batch size, same device); needed by
            ``mode="auto"``, which times each layer on the inputs this batch gives it.
        mode: "auto" keeps, per layer, the faster of the dense and the sparse version (so conversion never
            makes a layer slower on this input); "sparse" converts every layer it can.
        repeats: timed runs per layer and version under "auto" (the median is kept), after two warm-up runs.

    Raises:
        ValueError: an unknown mode, "auto" without ``example_input``, or a mask naming no weight of the model.
    """
    if mode not in ("auto", "sparse"):
        raise ValueError(f"mode must be 'auto' or 'sparse', got {mode!r}.")
    if mode == "auto" and example_input is None:
        raise ValueError("mode='auto' times each layer on example_input: pass a batch like those the copy will see, "
                         "or use mode='sparse'.")
    inference = copy.deepcopy(model).eval()
    masks = nonzero_masks(inference) if masks is None else masks
    modules = dict(inference.named_modules())
    candidates = {}
    for name, mask in masks.items():
        module_name = name.removesuffix(".weight")
        module = modules.get(module_name)
        if not name.endswith(".weight") or module is None:
            raise ValueError(f"masks name {name!r}, which is not the weight of a module of the model.")
        candidates[module_name] = (module, mask.to(module.weight.device).bool())
    inputs = _layer_inputs(inference, list(candidates), example_input) if mode == "auto" else {}
    choices = []
    for module_name, (module, mask) in candidates.items():
        kind, sparse = _sparse_version(module, mask)
        density = float(mask.float().mean())
        if sparse is None:
            choices.append(LayerChoice(module_name, kind, density, None, None, False))
            continue
        dense_ms = sparse_ms = None
        if mode == "auto":
            if module_name not in inputs:  # the example never reaches this layer: nothing to measure, keep it
                choices.append(LayerChoice(module_name, kind, density, None, None, False))
                continue
            dense_ms = _median_ms(lambda: module(inputs[module_name]), repeats)
            sparse_ms = _median_ms(lambda: sparse(inputs[module_name]), repeats)
        converted = mode == "sparse" or sparse_ms < dense_ms
        if converted:
            _replace(inference, module_name, sparse)
        choices.append(LayerChoice(module_name, kind, density, dense_ms, sparse_ms, converted))
    inference.sparse_layers = choices
    log.info("sparse_inference: %d of %d layers converted", sum(c.converted for c in choices), len(choices))
    return inference


def _sparse_version(module: nn.Module, mask: Tensor) -> tuple[str, nn.Module | None]:
    """The layer's kind and its sparse version, or None where no sparse kernel applies."""
    if isinstance(module, nn.Linear):
        return "linear", SparseLinear(module, mask)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped conv", None
        kind = "conv1x1" if module.kernel_size == (1, 1) and module.padding == (0, 0) else "conv"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return kind, None
        return kind, SparseConv2d(module, mask)
    return type(module).__name__, None


def _csr(weight: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, weight.detach(), torch.zeros((), dtype=weight.dtype, device=weight.device)).to_sparse_csr()


def _layer_inputs(model: nn.Module, names: list[str], example: Tensor) -> dict[str, Tensor]:
    """The input each named module receives when the model runs on ``example``."""
    inputs: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_pre_hook(_keeper(inputs, name)) for name in names]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def _keeper(inputs: dict[str, Tensor], name: str) -> Callable[..., None]:
    def keep(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        inputs.setdefault(name, args[0])
    return keep


def _median_ms(run: Callable[[], Tensor], repeats: int) -> float:
    times = []
    with torch.inference_mode():
        for index in range(repeats + 2):
            start = time.perf_counter()
            run()
            if index >= 2:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _replace(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
