"""Training with sparse kernels: a masked layer's output, its input's gradient and its weight's gradient computed
from the live weights only, between mask updates.

A layer keeps its dense ``weight`` Parameter (the optimizer, checkpoints, DDP and export see nothing new); its
``forward`` is replaced on the instance by one that gathers the live values out of the weight (each call, so they
follow the optimizer) and computes, each part with the kernel its ``KernelPlan`` names:

- output: the live weights times the input, with the input laid out (features, rows);
- input gradient: the transpose's live weights (its CSR indices built once per mask) times the output gradient;
- weight gradient: the output gradient times the input at the live positions only. On a step that neither reads
  the dense gradient nor may change the masks, and where the optimizer allows it (``live_step``), it is kept as
  those values alone (``LayerKernels.live_grad``; the weight's ``.grad`` stays None) and the optimizer's rule is
  applied to the live weights only, right after the optimizer's own step: no dense gradient, no pass over the dead
  weights. Otherwise it is written into a dense gradient that is 0 at every dead position, so that the optimizer,
  DDP and the mask decisions see an ordinary gradient.

The kernels: "dense" (torch's dense products, the masked weight), "csr" (torch's CSR operations) and "native"
(``kernels.native``). "sparse" runs every part with the best sparse kernel available; "auto" records one step's
real inputs and output gradients, times the parts and then whole forward-and-backward passes of the candidate
plans on them, and keeps the fastest by ``timing.choose``. A step whose mask decision reads the dense gradient
computes the weight's gradient dense, its other parts as planned.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_rigl.kernels import native
from lightning_rigl.kernels.forms import LivePattern
from lightning_rigl.kernels.live_step import LiveGradient, group_index, optimizer_like, step_live
from lightning_rigl.kernels.timing import choose, fastest, medians_ms

KERNEL_MODES = ("dense", "sparse", "auto")
Kernel = Literal["dense", "csr", "native"]
PARTS = ("forward", "input_grad", "weight_grad")

# Under "auto", a layer's kernels are timed again when its live count moves by more than this fraction since the
# last timing (pruning); a RigL or SET update moves positions, not counts, and keeps the plan.
RETIME_CHANGE = 0.1


@dataclass(frozen=True)
class KernelPlan:
    """How one layer computes each part of a training step: "dense" (torch's dense product), "csr" (torch's CSR
    operations: MKL on the CPU, cuSPARSE on CUDA) or "native" (``kernels.native``, CPU)."""

    forward: Kernel = "dense"
    input_grad: Kernel = "dense"
    weight_grad: Kernel = "dense"

    @property
    def sparse(self) -> bool:
        """Whether any part runs a sparse kernel."""
        return any(getattr(self, part) != "dense" for part in PARTS)

    @classmethod
    def parse(cls, text: str) -> KernelPlan:
        """The plan ``describe`` gave ``text``."""
        if "=" not in text:
            return cls(text, text, text)
        given = dict(item.split("=") for item in text.split())
        return cls(*(given[part] for part in PARTS))

    def kernels(self) -> set[str]:
        """The kernels the parts use."""
        return {getattr(self, part) for part in PARTS}

    def describe(self) -> str:
        """One kernel's name, or the parts spelled out when they differ ("forward=native input_grad=dense ...")."""
        kernels = self.kernels()
        if len(kernels) == 1:
            return kernels.pop()
        return " ".join(f"{part}={getattr(self, part)}" for part in PARTS)


def kernel_kind(module: nn.Module) -> tuple[str | None, str]:
    """The kind of layer the training kernels take ("linear", "conv1x1") and, for None, why not."""
    if isinstance(module, nn.Linear):
        return "linear", ""
    if isinstance(module, nn.Conv2d):
        if module.kernel_size == (1, 1) and module.padding in ((0, 0), "valid") and module.groups == 1 \
                and module.dilation == (1, 1):
            return "conv1x1", ""
        return None, "only 1×1 convolutions (ungrouped, unpadded) have sparse training kernels; this one runs dense"
    return None, f"{type(module).__name__} has no sparse training kernel; it runs dense"


class LayerKernels:
    """One layer's sparse-kernel state during training: its live pattern, its plan, and on a timing step the real
    tensors it saw.

    Attributes:
        plan: the kernels the layer uses between mask updates.
        planned_live: the live count the plan was timed at (None: not timed).
    """

    def __init__(self, module: nn.Module, kind: str, mask: Tensor) -> None:
        self.module = module
        self.kind = kind
        self.pattern = LivePattern.of(mask)
        self.plan = KernelPlan()
        self.planned_live: int | None = None
        self.dense_weight_grad = False  # this step's decision reads the dense gradient
        self.keeps_live_grad = False  # this step keeps a sparse weight gradient as its live values (``live_grad``)
        self.live_grad: Tensor | None = None  # the weight's gradient at the live positions, in CSR order
        self.capturing = False  # this step records its inputs and output gradients for timing
        self.captured: dict[str, Tensor] = {}
        # Whether every gradient the weight received this step came from a sparse kernel alone (0 at each dead
        # position by construction; None: none yet): the hook on the weight compares what reaches it with what
        # the kernel returned, which another use of the weight (tied weights) would have added to.
        self.clean: bool | None = None
        self.pending_grad: Tensor | None = None
        self.hook = module.weight.register_hook(functools.partial(_note_gradient, self))

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    def step_plan(self) -> KernelPlan:
        """The plan for this step: the dense weight gradient where a decision needs it, all dense on a timing step."""
        if self.capturing:
            return KernelPlan()
        if self.dense_weight_grad and self.plan.weight_grad != "dense":
            return KernelPlan(self.plan.forward, self.plan.input_grad, "dense")
        return self.plan

    def runs(self, x: Tensor) -> bool:
        """Whether this call goes through the sparse product (else the module's own forward): CPU sparse kernels take
        float32 and float64, and autocast's lower precision stays with the dense layer."""
        if not (self.capturing or self.plan.sparse):
            return False
        weight = self.module.weight
        return (x.dtype == weight.dtype and weight.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled(x.device.type))


class _LiveProduct(torch.autograd.Function):
    """y = x Wᵀ + b for rows x (N, fan-in), W (rows, fan-in) read through the layer's pattern; each part dense, CSR
    or native as the step's plan says."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, layer: LayerKernels) -> Tensor:
        plan = layer.step_plan()
        pattern = layer.pattern
        weight_2d = weight.reshape(pattern.shape).contiguous()
        values = pattern.values(weight_2d) if plan.sparse else None
        columns = None
        if plan.forward == "dense":
            out = F.linear(x, weight_2d, bias)
        else:
            columns = _transpose(x)  # (fan-in, N): the dense operand of a sparse product
            out = _sparse_product(plan.forward, pattern, values, columns, transposed=False)
            if bias is not None:
                out.add_(bias)
        if layer.capturing and "x" not in layer.captured:
            layer.captured["x"] = x.detach()
        ctx.save_for_backward(x, columns, weight_2d, values)
        ctx.layer, ctx.plan, ctx.has_bias = layer, plan, bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, columns, weight_2d, values = ctx.saved_tensors
        layer, plan = ctx.layer, ctx.plan
        pattern = layer.pattern
        if layer.capturing and "grad" not in layer.captured:
            layer.captured["grad"] = grad.detach()
        grad_x = grad_weight = grad_bias = None
        grad_t = _transpose(grad) if plan.input_grad != "dense" or plan.weight_grad != "dense" else None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.mm(weight_2d) if plan.input_grad == "dense"
                      else _sparse_product(plan.input_grad, pattern, values, grad_t, transposed=True))
        if ctx.needs_input_grad[1]:
            shape = layer.weight.shape
            if plan.weight_grad == "dense":
                grad_weight = grad.t().mm(x)
                grad_weight = grad_weight if grad_weight.shape == shape else grad_weight.reshape(shape)
            else:
                columns = _transpose(x) if columns is None else columns
                live = _live_weight_grad(plan.weight_grad, pattern, values, grad_t, columns)
                if layer.keeps_live_grad:  # micro-batches of a step add up, as in a dense .grad
                    layer.live_grad = live if layer.live_grad is None else layer.live_grad.add_(live)
                else:
                    grad_weight = pattern.dense(live, shape)
                    layer.pending_grad = grad_weight
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias, None


def _note_gradient(layer: LayerKernels, grad: Tensor | None) -> None:
    """The weight's gradient of one backward pass, summed over its uses: clean if it is the sparse kernel's own.
    Autograd calls this with None when no use gave a gradient (the kernel kept it as live values)."""
    if grad is None:
        return
    layer.clean = layer.clean is not False and grad is layer.pending_grad
    layer.pending_grad = None  # autograd then takes the tensor as the gradient without copying it


def _sparse_product(kernel: Kernel, pattern: LivePattern, values: Tensor, columns: Tensor, transposed: bool) -> Tensor:
    """``columns`` (fan-in, N) times the live weight's transpose (or ``columns`` (rows, N) times the live weight, when
    ``transposed``), as a contiguous (N, rows) (or (N, fan-in)) matrix: the layout of the layer's rows."""
    if kernel == "native":
        if transposed:
            return native.load().product(columns, pattern.crow_t, pattern.col_t, values, pattern.order_t, True)
        return native.load().product(columns, pattern.crow, pattern.col, values, None, True)
    matrix = pattern.csr_t(values) if transposed else pattern.csr(values)
    return _transpose(torch.sparse.mm(matrix, columns))


def _transpose(matrix: Tensor) -> Tensor:
    """A contiguous copy of the matrix's transpose: the native tiled kernel where it runs (2-3× faster than
    torch's copy on this machine's shapes), else torch's."""
    kernels = native.load() if matrix.device.type == "cpu" and matrix.dtype in (torch.float32, torch.float64) else None
    return matrix.t().contiguous() if kernels is None else kernels.transpose(matrix.contiguous())


def _live_weight_grad(kernel: Kernel, pattern: LivePattern, values: Tensor, grad_t: Tensor, columns: Tensor) -> Tensor:
    """The weight's gradient at its live positions, in CSR order: ``grad_t`` (rows, N) times ``columns``ᵀ
    (N, fan-in) there."""
    if kernel == "native":
        return native.load().live_values(grad_t, columns, pattern.crow, pattern.col)
    # torch's sampled product reads each column of its second operand contiguously when it is column-major.
    return torch.sparse.sampled_addmm(pattern.csr(values), grad_t, columns.t(), beta=0.0).values()


def _linear_forward(layer: LayerKernels, x: Tensor) -> Tensor:
    module = layer.module
    if not layer.runs(x):
        return nn.Linear.forward(module, x)
    rows = x.reshape(-1, x.shape[-1])
    return _LiveProduct.apply(rows, module.weight, module.bias, layer).view(*x.shape[:-1], module.out_features)


def _conv1x1_forward(layer: LayerKernels, x: Tensor) -> Tensor:
    module = layer.module
    if not layer.runs(x) or x.dim() != 4:
        return nn.Conv2d.forward(module, x)
    stride_h, stride_w = module.stride
    x = x[:, :, ::stride_h, ::stride_w]
    batch, channels, height, width = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, channels)  # (N·H·W, C): a linear layer over pixels
    out = _LiveProduct.apply(rows, module.weight, module.bias, layer)
    return out.view(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()


_FORWARDS: dict[str, Callable[[LayerKernels, Tensor], Tensor]] = {"linear": _linear_forward, "conv1x1": _conv1x1_forward}


class TrainingKernels:
    """The sparse kernels of a model's masked layers during training: installs them, keeps their patterns in step
    with the masks, times them under "auto", and removes them, leaving the plain modules.

    Args:
        mode: "sparse" (every part of every layer that has a kernel runs it) or "auto" (each part runs the faster
            way on the run's own tensors, timed at the first step and when a layer's live count moves).
        repeats: timed runs per part and kernel under "auto" (the median counts).

    Raises:
        ValueError: an unknown mode, or ``repeats`` < 1.
    """

    def __init__(self, mode: str, repeats: int = 5) -> None:
        if mode not in ("sparse", "auto"):
            raise ValueError(f"TrainingKernels takes mode 'sparse' or 'auto', got {mode!r}.")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}.")
        self.mode = mode
        self.repeats = repeats
        self.layers: dict[str, LayerKernels] = {}
        self.why_dense: dict[str, str] = {}  # layers that keep dense kernels throughout, and why
        self.live_optimizer: torch.optim.Optimizer | None = None  # the optimizer ``live_step`` steps the layers with
        self._step_hook: Any = None

    def install(self, modules: Mapping[str, nn.Module], masks: Mapping[str, Tensor],
                plans: Mapping[str, tuple[KernelPlan, int]] | None = None) -> None:
        """Give each module (by the name of its weight's mask) its sparse kernels. ``plans``: under "auto", plans
        timed before (a checkpoint's) with the live count they were timed at, kept instead of timing again."""
        for name, module in modules.items():
            kind, why_not = kernel_kind(module)
            if kind is None:
                self.why_dense[name] = why_not
                continue
            kernels = sparse_kernels(module.weight)
            if not kernels:
                self.why_dense[name] = f"no sparse kernel trains {module.weight.dtype} weights"
                continue
            layer = LayerKernels(module, kind, masks[name])
            if self.mode == "sparse":
                layer.plan = KernelPlan(kernels[0], kernels[0], kernels[0])
            elif plans and name in plans:
                layer.plan, layer.planned_live = plans[name]
            self.layers[name] = layer
            _hook(layer)

    def live_step(self, optimizer: torch.optim.Optimizer) -> None:
        """From now on, steps that ``begin_step`` allows keep sparse weight gradients as their live values, and
        ``optimizer``'s rule is applied to the live weights right after its own step (which skips the weights: their
        ``.grad`` is None). The optimizer must be one ``live_step.why_no_live_step`` accepts."""
        self.live_optimizer = optimizer
        self._step_hook = optimizer.register_step_post_hook(lambda *_: self._step_live())

    def remove(self) -> None:
        """Give every module its own forward back, its weight no hook, and the optimizer no step hook."""
        self._unhook()
        for layer in self.layers.values():
            layer.hook.remove()
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook, self.live_optimizer = None, None
        self.layers = {}

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The modules run their own forward inside (to count FLOPs as the paper does, say)."""
        self._unhook()
        try:
            yield
        finally:
            for layer in self.layers.values():
                _hook(layer)

    def _unhook(self) -> None:
        for layer in self.layers.values():
            layer.module.__dict__.pop("forward", None)

    def masks_changed(self, masks: Mapping[str, Tensor]) -> None:
        """Rebuild the patterns of the layers whose masks are given (after a mask change); this step's gradients,
        computed under the old patterns, are no longer clean under the new masks, and a gradient kept as live
        values becomes a dense ``.grad`` first (its positions are the old pattern's), for the masking to follow."""
        for name, mask in masks.items():
            if name in self.layers:
                self._to_dense_grad(self.layers[name])
                self.layers[name].pattern = LivePattern.of(mask)
                self.layers[name].clean = False

    def begin_step(self, dense_weight_grad: bool, keep_live_grad: bool = False) -> None:
        """Before each forward of a step (each micro-batch): whether its decision reads the dense gradient, and
        whether its sparse weight gradients may be kept as live values (a step that neither reads the dense
        gradient nor may change the masks, with ``live_step`` on); under "auto", which layers record their tensors
        for timing (those never timed, or whose live count moved)."""
        keep = keep_live_grad and not dense_weight_grad and self.live_optimizer is not None
        for layer in self.layers.values():
            layer.dense_weight_grad = dense_weight_grad
            layer.keeps_live_grad = keep and layer.weight.is_contiguous()  # the live step writes through a flat view
            layer.capturing = self.mode == "auto" and _needs_timing(layer)

    def merge_shared_gradients(self) -> None:
        """Once a step's backward is done, before its gradients are read: a weight that also received a dense
        gradient from another use (tied weights) takes its live values into that ``.grad``, and the dense path
        steps it."""
        for layer in self.layers.values():
            if layer.live_grad is not None and layer.weight.grad is not None:
                self._to_dense_grad(layer)

    def _to_dense_grad(self, layer: LayerKernels) -> None:
        if layer.live_grad is None:
            return
        weight = layer.weight
        if weight.grad is None:
            weight.grad = layer.pattern.dense(layer.live_grad, weight.shape)
        else:
            weight.grad.view(-1).index_add_(0, layer.pattern.positions, layer.live_grad)
        layer.live_grad = None

    def _step_live(self) -> None:
        layers = [layer for layer in self.layers.values() if layer.live_grad is not None]
        step_live(self.live_optimizer, [LiveGradient(layer.weight, layer.pattern.positions, layer.live_grad)
                                        for layer in layers])
        for layer in layers:
            layer.live_grad = None

    def end_step(self) -> None:
        """After a step's gradients were used: the next step's start over (every micro-batch of a step adds to
        the same gradients, so cleanness is a step's, not a backward's)."""
        for layer in self.layers.values():
            layer.clean = None

    def clean_gradients(self) -> set[str]:
        """The layers whose weight gradient this step came from sparse kernels alone: 0 at every dead position
        already, so masking it again would only cost a pass over it."""
        return {name for name, layer in self.layers.items() if layer.clean}

    def timing_pending(self) -> bool:
        """Whether some layer recorded this step's tensors and waits for ``decide``."""
        return any(layer.capturing for layer in self.layers.values())

    def decide(self, combine: Callable[[Tensor], Tensor] | None = None) -> None:
        """Choose the plan of each layer that recorded its tensors this step, on those tensors: each part timed
        with every kernel gives the best mix; then a whole forward and backward is timed under the dense plan,
        that mix and each kernel alone, and the fastest whole wins by the rule of ``timing.choose`` (dense unless
        beaten by more than ``timing.TIE``). ``combine`` sums timings over processes
        (every process calls this together, with the same layers), so that all choose alike."""
        timed = {name: layer for name, layer in self.layers.items() if {"x", "grad"} <= layer.captured.keys()}
        parts = _combined({name: _time_parts(layer, self.repeats) for name, layer in timed.items()}, combine)
        wholes = {}
        for name, layer in timed.items():
            mixed = KernelPlan(*(choose(parts[name][part]) for part in PARTS))
            uniform = [KernelPlan(kernel, kernel, kernel) for kernel in sparse_kernels(layer.weight)]
            optimizer = self.live_optimizer if layer.weight.is_contiguous() else None
            wholes[name] = _time_plans(layer, list(dict.fromkeys([KernelPlan(), mixed, *uniform])), self.repeats,
                                       optimizer)
        wholes = _combined(wholes, combine)
        for name, layer in timed.items():
            times = wholes[name]
            layer.plan = KernelPlan.parse(choose(times))
            layer.planned_live = layer.pattern.nnz
            layer.capturing, layer.captured = False, {}

    def plans(self) -> dict[str, tuple[KernelPlan, int | None]]:
        """Each layer's plan and the live count it was timed at."""
        return {name: (layer.plan, layer.planned_live) for name, layer in self.layers.items()}


def _hook(layer: LayerKernels) -> None:
    # On the instance: the class, the state dict and every other instance stay as they were.
    layer.module.forward = functools.partial(_FORWARDS[layer.kind], layer)


def _needs_timing(layer: LayerKernels) -> bool:
    if layer.planned_live is None:
        return True
    return abs(layer.pattern.nnz - layer.planned_live) > RETIME_CHANGE * max(layer.planned_live, 1)


def _time_parts(layer: LayerKernels, repeats: int) -> dict[str, dict[str, float]]:
    """Each part's median time (ms) with every kernel the layer can run, on the input rows and output gradient it
    saw; each sparse candidate pays for the transposes and gathers it needs."""
    x, grad = layer.captured["x"], layer.captured["grad"]
    pattern = layer.pattern
    weight_2d = layer.weight.detach().reshape(pattern.shape).contiguous()

    candidates: dict[str, dict[str, Callable[[], object]]] = {
        "forward": {"dense": lambda: F.linear(x, weight_2d)},
        "input_grad": {"dense": lambda: grad.mm(weight_2d)},
        "weight_grad": {"dense": lambda: grad.t().mm(x)},
    }
    for kernel in sparse_kernels(weight_2d):
        candidates["forward"][kernel] = lambda k=kernel: _sparse_product(
            k, pattern, pattern.values(weight_2d), _transpose(x), transposed=False)
        candidates["input_grad"][kernel] = lambda k=kernel: _sparse_product(
            k, pattern, pattern.values(weight_2d), _transpose(grad), transposed=True)
        candidates["weight_grad"][kernel] = lambda k=kernel: pattern.dense(_live_weight_grad(
            k, pattern, pattern.values(weight_2d), _transpose(grad), _transpose(x)), layer.weight.shape)
    with torch.no_grad():
        return {part: fastest(candidates[part], repeats)[1] for part in PARTS}


def _time_plans(layer: LayerKernels, plans: list[KernelPlan], repeats: int,
                optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """Median time (ms) of the layer's forward and backward under each plan, by its description, on the tensors it
    recorded, its weight and input detached so that no gradient reaches the model; the dense plan through
    ``F.linear``, as the plain layer computes. Given the ``optimizer`` of a live step, each plan's time includes
    its optimizer step on a copy of the weight: the live step where the plan computes the weight's gradient
    sparse, the optimizer's dense step where it computes it dense."""
    x = layer.captured["x"].detach().requires_grad_()
    grad = layer.captured["grad"]
    weight = layer.weight.detach().requires_grad_()
    bias = None if layer.module.bias is None else layer.module.bias.detach().requires_grad_()
    timed = copy.copy(layer)  # the layer's pattern under another plan, outside the model
    timed.capturing, timed.dense_weight_grad, timed.keeps_live_grad = False, False, optimizer is not None
    stepped = None if optimizer is None else layer.weight.detach().clone()
    stepper = None if optimizer is None else optimizer_like(optimizer, {group_index(optimizer, layer.weight): [stepped]})

    def optimizer_step() -> None:
        if timed.live_grad is not None:
            step_live(stepper, [LiveGradient(stepped, layer.pattern.positions, timed.live_grad)])
            timed.live_grad = None
        else:
            stepped.grad = weight.grad
            stepper.step()
            stepped.grad = None

    def step(plan: KernelPlan) -> Callable[[], None]:
        def run() -> None:
            timed.plan = plan
            if plan.sparse:
                _LiveProduct.apply(x, weight, bias, timed).backward(grad)
            else:
                F.linear(x, weight.reshape(layer.pattern.shape), bias).backward(grad)
            if stepper is not None:
                optimizer_step()
            x.grad = weight.grad = None
            if bias is not None:
                bias.grad = None
        return run

    return medians_ms({plan.describe(): step(plan) for plan in plans}, repeats)


def _combined(times: dict[str, dict[str, Any]], combine: Callable[[Tensor], Tensor] | None) -> dict[str, dict[str, Any]]:
    """Nested timings (ms) summed over processes by ``combine`` (None: this process's own)."""
    if combine is None or not times:
        return times
    flat: list[float] = []
    _flatten(times, flat)
    summed = iter(combine(torch.tensor(flat, dtype=torch.float64)).tolist())
    return _refill(times, summed)


def _flatten(tree: Mapping[str, Any], into: list[float]) -> None:
    for value in tree.values():
        _flatten(value, into) if isinstance(value, Mapping) else into.append(float(value))


def _refill(tree: Mapping[str, Any], values: Iterator[float]) -> dict[str, Any]:
    return {key: _refill(value, values) if isinstance(value, Mapping) else next(values) for key, value in tree.items()}


def sparse_kernels(weight: Tensor) -> tuple[Kernel, ...]:
    """The sparse kernels that can train a weight like this one, best first: native (CPU, when it builds here)
    and torch's CSR operations."""
    if weight.dtype not in (torch.float32, torch.float64):
        return ()
    if weight.device.type == "cpu" and native.load() is not None:
        return ("native", "csr")
    return ("csr",)


def plan_from_state(state: Mapping[str, Any]) -> tuple[KernelPlan, int]:
    """A plan saved by ``plan_state``."""
    return KernelPlan(*(state[part] for part in PARTS)), int(state["live"])


def plan_state(plan: KernelPlan, live: int) -> dict[str, Any]:
    """A plan as plain values, for a checkpoint."""
    return {**{field.name: getattr(plan, field.name) for field in fields(plan)}, "live": live}
