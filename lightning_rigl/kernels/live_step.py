"""The optimizer's step on a sparse layer's live weights only, from a gradient kept as their values.

Between mask updates a dead weight is 0, its gradient is 0 and its optimizer state is 0, so a dense step leaves it
0 (weight decay, momentum and Adam's moments all multiply a zero): every pass the optimizer makes over the dead
entries is wasted, and at 98% sparsity it costs more than the layer's sparse products. ``step_live`` applies the
run's own optimizer's rule (its class, its param groups' current hyperparameters, its state) to the live entries
alone: it gathers each layer's live weights and per-weight state into compact tensors, runs the optimizer's own
``step`` on them, and writes them back. The dense weight and the optimizer's dense state end as the dense step
would leave them (to float rounding), so checkpoints, ``state_dict`` and a later dense step see nothing new.

This holds for optimizers whose update of a weight reads only that weight's gradient and state (and scalars):
``LIVE_STEP_OPTIMIZERS``. Others keep the dense gradient: LBFGS, Adafactor's factored moments, Shampoo, a user's
class, and Adamax, whose dense step moves the state of a dead weight (its infinity norm becomes eps there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim import SGD, Adagrad, Adam, AdamW, NAdam, Optimizer, RAdam, RMSprop

LIVE_STEP_OPTIMIZERS: tuple[type[Optimizer], ...] = (SGD, Adam, AdamW, RMSprop, Adagrad, NAdam, RAdam)


class LiveGradient(NamedTuple):
    """A weight's gradient kept at its live positions only."""

    param: Tensor  # the dense weight (contiguous)
    positions: Tensor  # the live entries' positions in the flattened weight (int64)
    values: Tensor  # the gradient there, in the order of ``positions``


def why_no_live_step(optimizer: Optimizer) -> str | None:
    """Why ``optimizer`` cannot step live weights alone (None: it can)."""
    if type(optimizer) not in LIVE_STEP_OPTIMIZERS:
        names = ", ".join(cls.__name__ for cls in LIVE_STEP_OPTIMIZERS)
        return (f"{type(optimizer).__name__} is not one whose update of a weight reads only that weight's gradient "
                f"and state ({names})")
    if any(group.get("differentiable") for group in optimizer.param_groups):
        return "the optimizer is differentiable=True"
    return None


def step_live(optimizer: Optimizer, gradients: Sequence[LiveGradient]) -> None:
    """One step of ``optimizer``'s rule on the live entries of each weight, from their gradient values: the
    weights and every per-weight state entry (a tensor of the weight's shape) change there as the optimizer's dense
    step would change them; scalar state (Adam's step count) is shared with the dense state. Entries elsewhere are
    not touched. The weights must not hold a ``.grad`` of their own (the optimizer's own step then skips them)."""
    if not gradients:
        return
    leaves: list[Tensor] = []
    by_group: dict[int, list[Tensor]] = {}
    state: dict[Tensor, dict] = {}
    for gradient in gradients:
        param, positions = gradient.param, gradient.positions
        leaf = param.detach().view(-1).take(positions)
        leaf.grad = gradient.values
        state[leaf] = {key: value.view(-1).take(positions) if _per_weight(value, param) else value
                       for key, value in optimizer.state.get(param, {}).items()}
        leaves.append(leaf)
        by_group.setdefault(group_index(optimizer, param), []).append(leaf)
    live = optimizer_like(optimizer, by_group)
    live.state.update(state)
    live.step()
    with torch.no_grad():
        for gradient, leaf in zip(gradients, leaves):
            param, positions = gradient.param, gradient.positions
            param.view(-1).index_copy_(0, positions, leaf)
            dense_state = optimizer.state[param]
            for key, value in live.state[leaf].items():
                if _per_weight(value, leaf):
                    dense = dense_state.get(key)
                    if not _per_weight(dense, param):
                        dense = torch.zeros(param.shape, dtype=value.dtype, device=value.device)
                    dense.view(-1).index_copy_(0, positions, value)
                    value = dense
                dense_state[key] = value


def optimizer_like(optimizer: Optimizer, groups: Mapping[int, list[Tensor]]) -> Optimizer:
    """An optimizer of ``optimizer``'s class, without state, over other tensors: each list of ``groups`` in a group
    with the hyperparameters that group (by index) of ``optimizer`` has now (a scheduler may have moved them)."""
    like = type(optimizer).__new__(type(optimizer))
    # The class's __init__ would check its arguments again; the base class sets it up from the defaults it kept.
    Optimizer.__init__(like, [{**{key: value for key, value in optimizer.param_groups[index].items() if key != "params"},
                                "params": tensors} for index, tensors in groups.items()], dict(optimizer.defaults))
    return like


def group_index(optimizer: Optimizer, param: Tensor) -> int:
    """The index of the param group that holds ``param``."""
    return next(index for index, group in enumerate(optimizer.param_groups)
                if any(p is param for p in group["params"]))


def _per_weight(value: object, like: Tensor) -> bool:
    return isinstance(value, Tensor) and value.shape == like.shape
