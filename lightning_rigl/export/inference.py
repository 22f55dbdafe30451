"""Inference with sparse kernels: linear layers and convolutions computed from their live weights only.

A dense layer multiplies every weight; a sparse one only the live ones, in one of two forms:

- CSR: ``torch.sparse.mm`` on a CSR weight (MKL's sparse BLAS on the CPU, cuSPARSE on CUDA), for any mask;
- condensed, for a constant fan-in (SRigL): each neuron's k input positions and k values, two dense
  (out, k) tensors, computed as a gather of the inputs and a weighted sum (``F.embedding_bag``, or a gather and
  a row-wise dot product for a single example), with no per-row bookkeeping at all.

Which is faster depends on the layer, the sparsity, the batch and the machine, so ``mode="auto"`` measures
each layer every way on a real input and keeps the fastest.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_rigl.export.file import nonzero_masks
from lightning_rigl.kernels.forms import condense, to_csr
from lightning_rigl.kernels.timing import fastest
from lightning_rigl.sparsity.structure import NM, ConstantFanIn
from lightning_rigl.sparsity.targets import huggingface_conv1d

log = logging.getLogger(__name__)

Mode = Literal["auto", "sparse"]


KERNELS = ("dense", "csr", "condensed", "2:4")  # "2:4": a semi-structured weight (CUDA, compute capability >= 8.0)


@dataclass(frozen=True)
class LayerChoice:
    """What ``sparse_inference`` did with one sparse layer.

    Args:
        name: the module's name in the model (the parameter's, for a weight that is not a module's ``weight``).
        kind: "linear", "linear (Conv1D)" (Hugging Face's, weight stored (in, out); converted as its
            transpose), "conv1x1", "conv" (a k×k convolution through im2col), "grouped conv", "attention
            projection" (a weight an attention module reads itself) or the module's class name (the last three
            never converted).
        density: fraction of live weights.
        kernel: how the inference copy computes the layer: "dense", "csr", "condensed" or "2:4".
        times_ms: median time of each kernel tried on the example input (milliseconds); empty when not timed.
        why_not: when the layer stays dense, the reason.
    """

    name: str
    kind: str
    density: float
    kernel: str
    times_ms: Mapping[str, float]
    why_not: str = ""

    @property
    def converted(self) -> bool:
        """Whether the copy computes this layer with a sparse kernel."""
        return self.kernel != "dense"

    @property
    def gain(self) -> float | None:
        """Dense time over the chosen kernel's time: above 1, the conversion made the layer faster."""
        chosen = self.times_ms.get(self.kernel)
        return None if "dense" not in self.times_ms or not chosen else self.times_ms["dense"] / chosen


class SparseLinear(nn.Module):
    """A linear layer whose weight is a CSR matrix: y = (W xᵀ)ᵀ + b."""

    def __init__(self, linear: nn.Linear, mask: Tensor) -> None:
        super().__init__()
        # Buffers, so that .to(device) moves them; not persistent: the compact file is the saved form.
        self.register_buffer("weight", to_csr(linear.weight, mask), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)
        self.out_features = linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.sparse.mm(self.weight, flat.t()).t().contiguous()  # row-major, as nn.Linear returns it
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


class _ConvByExample(nn.Module):
    """A 2-d convolution as one matrix product per example: a 1×1 convolution directly on the example's channels
    (strided by slicing), a k×k one on the example's im2col unfolding. A subclass states the product.

    One product per example rather than one over the whole batch: an example's columns stay in cache while
    the sparse rows read them, no transposes are needed, and the unfolding of a k×k convolution never holds
    the whole batch (at batch 64 on ResNet-50, 2-4× faster than one product over the batch's columns).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        bias = None if conv.bias is None else conv.bias.detach().clone().view(-1, 1, 1)
        self.register_buffer("bias", bias, persistent=False)
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.pointwise = _pointwise(conv)

    def product(self, columns: Tensor) -> Tensor:
        """The weight (out, C·kh·kw) times one example's columns (C·kh·kw, positions): (out, positions)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        height, width = (
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, pad, dilation, kernel, stride in zip(x.shape[2:], self.padding, self.dilation, self.kernel_size,
                                                            self.stride)
        )
        if self.pointwise:
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
        out = x.new_empty(x.shape[0], self.out_channels, height, width)
        for index in range(x.shape[0]):
            if self.pointwise:
                columns = x[index].reshape(x.shape[1], -1)  # (C, H·W)
            else:
                columns = F.unfold(x[index:index + 1], self.kernel_size, self.dilation, self.padding, self.stride)[0]
            product = self.product(columns).view(self.out_channels, height, width)
            out[index] = product if self.bias is None else product + self.bias
        return out


class SparseConv2d(_ConvByExample):
    """A 2-d convolution whose weight, read as (out, C·kh·kw), is a CSR matrix."""

    def __init__(self, conv: nn.Conv2d, mask: Tensor) -> None:
        super().__init__(conv)
        weight = to_csr(conv.weight, mask)
        self.register_buffer("weight", weight, persistent=False)

    def product(self, columns: Tensor) -> Tensor:
        return torch.sparse.mm(self.weight, columns)


class CondensedConv2d(_ConvByExample):
    """A 2-d convolution of constant fan-in stored condensed (see ``CondensedLinear``): output channel o sums
    ``values[o]`` times the rows ``indices[o]`` of the example's columns."""

    def __init__(self, conv: nn.Conv2d, mask: Tensor) -> None:
        super().__init__(conv)
        indices, values = condense(conv.weight, mask)
        self.register_buffer("indices", indices, persistent=False)
        self.register_buffer("values", values, persistent=False)

    def product(self, columns: Tensor) -> Tensor:
        return F.embedding_bag(self.indices, columns.contiguous(), mode="sum", per_sample_weights=self.values)


class CondensedLinear(nn.Module):
    """A linear layer of constant fan-in stored condensed: neuron o reads inputs ``indices[o]`` with weights
    ``values[o]`` (k each); a neuron without live weights (ablated) gives its bias.

    y[:, o] = Σⱼ values[o, j] · x[:, indices[o, j]] + b[o]: k multiply-adds per neuron and example. Several
    examples go through ``F.embedding_bag`` over the input's columns (one weighted sum of k rows per neuron); a
    single example through one gather of its inputs and a row-wise dot product, because embedding_bag's cost per
    bag dominates when each row it sums is one number long (several times slower than the gather on ViT-B/16's
    MLP shapes at 90% sparsity, in our measurement on 2 threads).
    """

    def __init__(self, linear: nn.Linear, mask: Tensor) -> None:
        super().__init__()
        indices, values = condense(linear.weight, mask)
        self.register_buffer("indices", indices, persistent=False)
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)
        self.out_features = linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] == 1:
            gathered = rows.expand(self.indices.shape[0], -1).gather(1, self.indices)  # (out, k)
            out = gathered.mul_(self.values).sum(1).unsqueeze(0)
        else:
            columns = rows.t().contiguous()  # (in, batch): one row per input feature
            out = F.embedding_bag(self.indices, columns, mode="sum", per_sample_weights=self.values).t().contiguous()
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


class SemiStructuredLinear(nn.Module):
    """A linear layer whose weight holds at most 2 live weights in every 4 consecutive inputs, stored in the
    form sparse tensor cores run (``torch.sparse.to_sparse_semi_structured``; CUDA, compute capability >= 8.0)."""

    def __init__(self, linear: nn.Linear, mask: Tensor) -> None:
        super().__init__()
        masked = torch.where(mask, linear.weight.detach(), 0).contiguous()
        self.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(masked), requires_grad=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class SparseMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (inference) with its two projections as modules of their own, ``in_proj`` (E → 3E:
    queries, keys, values) and ``out_proj`` (E → E), so that either can be a sparse layer; the attention between
    them is ``F.scaled_dot_product_attention``. Takes the module's arguments and gives its outputs (the attention
    weights, averaged over heads or not, when asked for). For cross-attention (key or value not the query) the
    projection runs once per input and keeps its third.
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = attention.embed_dim, attention.num_heads, attention.batch_first
        self.in_proj = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=attention.in_proj_bias is not None,
                                 device=attention.in_proj_weight.device, dtype=attention.in_proj_weight.dtype)
        self.in_proj.weight = attention.in_proj_weight
        self.in_proj.bias = attention.in_proj_bias
        self.out_proj = attention.out_proj

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E): a batch of one
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e, heads = self.embed_dim, self.num_heads
        if key is query and value is query:
            q, k, v = self.in_proj(query).split(e, dim=-1)
        else:
            q, k, v = (self.in_proj(t)[..., i * e:(i + 1) * e] for i, t in enumerate((query, key, value)))
        batch, length, source = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(batch, -1, heads, e // heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
        mask = _additive(attn_mask, q.dtype, (1, 1, length, source) if attn_mask is not None and attn_mask.dim() == 2
                         else (batch, heads, length, source))
        padding = _additive(key_padding_mask, q.dtype, (batch, 1, 1, source))
        mask = padding if mask is None else mask if padding is None else mask + padding
        causal = is_causal and mask is None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(e // heads)
            if causal:
                scores = scores.masked_fill(torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1),
                                            -math.inf)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, e))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights


def _additive(mask: Tensor | None, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor | None:
    """An attention mask as numbers to add to the scores (a bool mask: -inf where True), viewed as ``shape``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype).reshape(shape)


def attention_unsupported(attention: nn.MultiheadAttention) -> str | None:
    """Why ``SparseMultiheadAttention`` cannot stand in for this module, or None if it can."""
    if not attention._qkv_same_embed_dim:
        return "its keys and values have other widths than its queries (kdim, vdim)"
    if attention.bias_k is not None or attention.add_zero_attn:
        return "it adds key and value biases or a zero attention (add_bias_kv, add_zero_attn)"
    return None


def semi_structured_unavailable(weight: Tensor) -> str | None:
    """Why a 2:4 weight cannot run on sparse tensor cores here, or None if it can."""
    if not weight.is_cuda:
        return "2:4 kernels run on CUDA only"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "2:4 kernels need compute capability 8.0 or more"
    return None


def sparse_inference(model: nn.Module, masks: Mapping[str, Tensor] | None = None, example_input: Tensor | None = None,
                     mode: Mode = "auto", repeats: int = 7) -> nn.Module:
    """An inference copy of ``model`` (eval mode, no gradients needed) whose sparse layers compute with sparse
    kernels: CSR, or condensed where the mask has a constant fan-in.

    Linear layers, Hugging Face ``Conv1D`` layers (GPT-2's) and 2-d convolutions (ungrouped, padding given as numbers and ``padding_mode="zeros"``, batched
    input) are converted; others (depthwise convolutions, the projections ``nn.MultiheadAttention`` reads
    itself, for instance) stay dense. Every weight outside its
    mask is 0 in the copy, converted or not, and the copy gives the model's outputs to float tolerance (the
    model's own, when its weights outside the masks are already 0, as after sparse training). ``model`` itself
    is not changed. The copy's ``sparse_layers`` lists a ``LayerChoice`` per candidate layer (also logged at
    INFO level). Its CSR weights cannot be deep-copied: convert the model again instead.

    Args:
        model: the trained model.
        masks: parameter name -> bool tensor of the weight's shape (True: live), e.g. ``callback.masks``; the
            layers to consider. Default: every convolution and linear weight that holds a zero, masked by its
            non-zero positions.
        example_input: a batch like those the copy will see (same batch size, same device); needed by
            ``mode="auto"``, which times each layer on the inputs this batch gives it.
        mode: "auto" keeps, per layer, the fastest of the dense layer and its sparse versions, dense unless a sparse
            one is faster by more than 5% (``kernels.timing.choose``: conversion never makes a layer slower on this
            input); "sparse" converts every layer it can, condensed where it can.
        repeats: timed runs per layer and kernel under "auto" (the median is kept), after two warm-up runs.

    Raises:
        ValueError: an unknown mode, "auto" without ``example_input``, ``repeats`` < 1, or a mask that names no
            weight of the model or has another shape than its weight.
    """
    if mode not in ("auto", "sparse"):
        raise ValueError(f"mode must be 'auto' or 'sparse', got {mode!r}.")
    if mode == "auto" and example_input is None:
        raise ValueError("mode='auto' times each layer on example_input: pass a batch like those the copy will see, "
                         "or use mode='sparse'.")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    inference = copy.deepcopy(model).eval()
    inference, masks, projections = _open_attention(inference, nonzero_masks(inference) if masks is None else masks)
    candidates = _candidates(inference, masks)
    versions = {name: _sparse_versions(candidate) for name, candidate in candidates.items()}
    convertible = [name for name, (_, kernels, _) in versions.items() if kernels]
    inputs = _layer_inputs(inference, convertible, example_input) if mode == "auto" else {}
    choices = []
    for name, candidate in candidates.items():
        density = float(candidate.mask.float().mean())
        kind, kernels, why_not = versions[name]
        kind = "attention projection" if name in projections else kind
        times: dict[str, float] = {}
        kernel = "dense"
        if kernels and mode == "sparse":
            kernel = next(k for k in ("2:4", "condensed", "csr") if k in kernels)
        elif kernels and name not in inputs:
            why_not = "the example input does not reach it"
        elif kernels:
            kernels = {"dense": candidate.module, **kernels}
            with torch.inference_mode():
                kernel, times = fastest({key: lambda module=module: module(inputs[name])
                                         for key, module in kernels.items()}, repeats)
            why_not = "the dense layer was faster" if kernel == "dense" else ""
        if kernel != "dense":
            inference = _replace(inference, name, kernels[kernel])
        choices.append(LayerChoice(name, kind, density, kernel, times, why_not))
    inference.sparse_layers = choices
    log.info("sparse_inference: %d of %d layers converted", sum(c.converted for c in choices), len(choices))
    return inference


def _open_attention(model: nn.Module, masks: Mapping[str, Tensor]) -> tuple[nn.Module, dict[str, Tensor], set[str]]:
    """``model`` with every ``nn.MultiheadAttention`` that has a masked projection replaced by a
    ``SparseMultiheadAttention`` (where it can stand in), whose projections are layers of their own; the masks renamed
    to follow them (``X.in_proj_weight`` becomes ``X.in_proj.weight``), and the names of those projections."""
    renamed, projections = dict(masks), set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.MultiheadAttention) or attention_unsupported(module) is not None:
            continue
        prefix = f"{name}." if name else ""
        masked = [key for key in (f"{prefix}in_proj_weight", f"{prefix}out_proj.weight") if key in masks]
        if not masked:
            continue
        model = _replace(model, name, SparseMultiheadAttention(module))
        if f"{prefix}in_proj_weight" in renamed:
            renamed[f"{prefix}in_proj.weight"] = renamed.pop(f"{prefix}in_proj_weight")
        projections |= {f"{prefix}in_proj", f"{prefix}out_proj"}
    return model, renamed, projections


@dataclass
class _Candidate:
    """A masked weight: the module holding it and its attribute name, its mask, and whether an attention module
    reads it directly (``in_proj_weight``, ``out_proj.weight``) instead of calling the module that holds it."""

    module: nn.Module
    attribute: str
    mask: Tensor
    read_by_attention: bool


def _candidates(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, _Candidate]:
    """Layer name (the module's, or the parameter's when it is not a module's ``weight``) -> candidate for every
    mask, with the weight zeroed outside its mask."""
    modules = dict(model.named_modules())
    attention_owned = {f"{name}.out_proj" if name else "out_proj" for name, module in modules.items()
                       if isinstance(module, nn.MultiheadAttention)}
    candidates = {}
    for name, mask in masks.items():
        module_name, _, attribute = name.rpartition(".")
        module = modules.get(module_name)
        weight = getattr(module, attribute, None) if module is not None else None
        if not isinstance(weight, Tensor):
            raise ValueError(f"masks name {name!r}, which is not a parameter of the model.")
        if mask.shape != weight.shape:
            raise ValueError(f"the mask of {name!r} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}.")
        mask = mask.to(weight.device).bool()
        with torch.no_grad():
            weight.mul_(mask)
        read_by_attention = isinstance(module, nn.MultiheadAttention) or module_name in attention_owned
        candidates[module_name if attribute == "weight" else name] = _Candidate(module, attribute, mask,
                                                                                read_by_attention)
    return candidates


def _sparse_versions(candidate: _Candidate) -> tuple[str, dict[str, nn.Module], str]:
    """The layer's kind, its sparse versions by kernel ("csr", "condensed"; none where no sparse kernel applies)
    and why none does."""
    module, mask = candidate.module, candidate.mask
    if candidate.read_by_attention:
        attention = candidate.module if isinstance(candidate.module, nn.MultiheadAttention) else None
        why = "its attention module reads the weight itself" if attention is None else attention_unsupported(attention)
        return "attention projection", {}, f"{why}: it stays dense"
    if candidate.attribute != "weight":
        return type(module).__name__, {}, "only the weight of Linear and Conv2d is converted"
    conv1d = huggingface_conv1d()
    if isinstance(module, nn.Linear):
        kind, csr, condensed = "linear", SparseLinear, CondensedLinear
    elif conv1d is not None and isinstance(module, conv1d):  # stored (in, out): converted as its nn.Linear
        module, mask = _linear_of(module), mask.t()
        kind, csr, condensed = "linear (Conv1D)", SparseLinear, CondensedLinear
    elif isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped conv", {}, "grouped convolutions have no sparse kernel here"
        kind, csr, condensed = "conv1x1" if _pointwise(module) else "conv", SparseConv2d, CondensedConv2d
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return kind, {}, "only numeric zero padding is converted"
    else:
        return type(module).__name__, {}, "only Linear, Hugging Face's Conv1D and Conv2d are converted"
    versions: dict[str, nn.Module] = {}
    if kind.startswith("linear") and semi_structured_unavailable(module.weight) is None and NM(2, 4).violation(mask) is None:
        try:
            versions["2:4"] = SemiStructuredLinear(module, mask)
        except RuntimeError as error:  # shapes or dtypes the kernels do not take
            log.info("sparse_inference: no 2:4 kernel for a %s layer: %s", tuple(module.weight.shape), error)
    if module.weight.device.type != "cpu" or module.weight.dtype in (torch.float32, torch.float64):
        versions["csr"] = csr(module, mask)
    if not bool(mask.all()) and ConstantFanIn().violation(mask) is None:
        versions["condensed"] = condensed(module, mask)
    why_not = "" if versions else f"CPU sparse kernels need float32 or float64, not {module.weight.dtype}"
    return kind, versions, why_not


def _linear_of(conv1d: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that computes what a Hugging Face ``Conv1D`` computes: its weight transposed to
    (out, in), its bias; copies, sharing nothing with it."""
    fan_in, neurons = conv1d.weight.shape
    linear = nn.Linear(fan_in, neurons, bias=conv1d.bias is not None, device=conv1d.weight.device,
                       dtype=conv1d.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.t())
        if conv1d.bias is not None:
            linear.bias.copy_(conv1d.bias)
    return linear


def _pointwise(conv: nn.Conv2d) -> bool:
    """A 1×1 convolution without padding: one matrix product per example, no im2col."""
    return conv.kernel_size == (1, 1) and conv.padding == (0, 0)


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


def _replace(model: nn.Module, name: str, replacement: nn.Module) -> nn.Module:
    """``model`` with its submodule ``name`` replaced (``replacement`` itself when ``name`` is the root)."""
    if not name:
        return replacement
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return model
