"""Structured masks: where a layer's live weights may sit.

A weight of shape (out, ...) is read as a matrix of ``out`` rows (neurons: output features, output channels,
rows of an attention projection) by ``fan_in`` columns (everything a neuron reads, flattened row-major); a weight
stored (in, out), Hugging Face's ``Conv1D``, is read transposed (``Transposed``). A structure limits the live
weights of every *group*, a run of consecutive columns of one row:

- ``NM(n, m)``, "N:M": at most N live weights in every group of M consecutive columns (a row's last group may
  be shorter and holds at most min(N, its length)). The structure sparse tensor cores run (2:4).
- ``ConstantFanIn``: every neuron holds the same number k of live weights (SRigL, Lasby et al., ICLR 2024);
  the group is the whole row. A layer's count is rounded down to a whole fan-in: k = ⌊L / out⌋ for a budget
  of L live weights, as the official code rounds (``get_fan_in_after_ablation``). A neuron with no live weight
  is ablated: SRigL removes neurons and gives their fan-in to the others.

Selections are exact (see ``updates``): within a group the largest scores win, ties to the lower column, and
across groups the ``top_k_indices`` rule applies, so every DDP rank and every resumed run chooses the same.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_rigl.errors import ConfigError
from lightning_rigl.sparsity.selection import top_k_indices

CONSTANT_FAN_IN = "constant_fan_in"
_NM_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def rows_and_fan_in(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """The matrix a weight is read as: (neurons, weights per neuron)."""
    rows = shape[0]
    return rows, math.prod(shape) // rows


class Structure(ABC):
    """Where live weights may sit; see the module docstring."""

    @abstractmethod
    def layer_count(self, name: str, shape: tuple[int, ...], budget: int) -> int:
        """The live weights a sparse layer of ``shape`` holds for a budget of ``budget`` from the distribution.

        Raises:
            ConfigError: the structure cannot hold the budget (a message saying what to change).
        """

    @abstractmethod
    def group_limit(self, shape: tuple[int, ...], n_live: int) -> tuple[int, int]:
        """(columns per group, most live weights per group) for a layer of ``shape`` holding ``n_live``."""

    @abstractmethod
    def violation(self, mask: Tensor) -> str | None:
        """What in ``mask`` breaks the structure (for an error message), or None if it holds."""

    def grow(self, mask: Tensor, scores: Tensor, n_grow: int) -> Tensor:
        """Flat indices of ``n_grow`` positions to grow in ``mask`` (which is only read) within the structure,
        the largest ``scores`` first (``grow_in_groups``)."""
        columns, limit = self.group_limit(tuple(mask.shape), int(mask.sum()) + n_grow)
        return grow_in_groups(mask, scores, n_grow, columns, limit)

    def random_mask(self, shape: torch.Size, n_live: int, gen: torch.Generator, device: torch.device) -> Tensor:
        """A bool mask of ``shape`` with exactly ``n_live`` live positions drawn at random within the structure."""
        mask = torch.zeros(shape, dtype=torch.bool)
        grown = self.grow(mask, torch.rand(shape, generator=gen), n_live)
        mask.view(-1).index_fill_(0, grown, True)
        return mask.to(device)


@dataclass(frozen=True)
class NM(Structure):
    """At most ``n`` live weights in every group of ``m`` consecutive weights of a row."""

    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def capacity(self, shape: tuple[int, ...]) -> int:
        """The most live weights a layer of ``shape`` can hold."""
        rows, fan_in = rows_and_fan_in(shape)
        return rows * (self.n * (fan_in // self.m) + min(self.n, fan_in % self.m))

    def layer_count(self, name: str, shape: tuple[int, ...], budget: int) -> int:
        capacity = self.capacity(shape)
        if budget > capacity:
            raise ConfigError(
                f"Layer {name!r} would hold {budget} live weights of {math.prod(shape)}, more than {self} allows "
                f"({capacity}, density {capacity / math.prod(shape):.3f}). Raise the sparsity, use "
                f"distribution='uniform', or keep the layer dense with dense=[{name!r}].")
        return budget

    def group_limit(self, shape: tuple[int, ...], n_live: int) -> tuple[int, int]:
        return self.m, self.n

    def violation(self, mask: Tensor) -> str | None:
        per_group = _group_counts(mask.reshape(rows_and_fan_in(mask.shape)), self.m)
        if int(per_group.max()) <= self.n:
            return None
        return f"{int((per_group > self.n).sum())} groups of {self.m} hold more than {self.n} live weights"


@dataclass(frozen=True)
class ConstantFanIn(Structure):
    """Every neuron holds the same number of live weights, or none (an ablated neuron)."""

    def __str__(self) -> str:
        return CONSTANT_FAN_IN

    def layer_count(self, name: str, shape: tuple[int, ...], budget: int) -> int:
        rows, _ = rows_and_fan_in(shape)
        if budget < rows:
            raise ConfigError(
                f"Layer {name!r} would hold {budget} live weights for its {rows} neurons: a constant fan-in needs "
                f"at least one per neuron. Lower the sparsity, or keep the layer dense with dense=[{name!r}].")
        return rows * (budget // rows)

    def group_limit(self, shape: tuple[int, ...], n_live: int) -> tuple[int, int]:
        rows, fan_in = rows_and_fan_in(shape)
        return fan_in, n_live // rows

    def violation(self, mask: Tensor) -> str | None:
        fan_ins = mask.reshape(rows_and_fan_in(mask.shape)).sum(1)
        values = fan_ins[fan_ins > 0].unique()
        if values.numel() <= 1:
            return None
        return f"its live neurons hold different fan-ins ({values.tolist()[:5]}...)"


@dataclass(frozen=True)
class Transposed(Structure):
    """``inner`` on a weight stored (in, out), whose neurons are its columns (Hugging Face's ``Conv1D``): the
    layer is read as its (out, in) transpose, so that a neuron's fan-in is a column and N:M groups run along its
    inputs. Masks and scores stay in the stored layout; indices come back in it."""

    inner: Structure

    def __str__(self) -> str:
        return str(self.inner)

    def layer_count(self, name: str, shape: tuple[int, ...], budget: int) -> int:
        return self.inner.layer_count(name, tuple(reversed(shape)), budget)

    def group_limit(self, shape: tuple[int, ...], n_live: int) -> tuple[int, int]:
        return self.inner.group_limit(tuple(reversed(shape)), n_live)

    def violation(self, mask: Tensor) -> str | None:
        return self.inner.violation(mask.t())

    def grow(self, mask: Tensor, scores: Tensor, n_grow: int) -> Tensor:
        grown = self.inner.grow(mask.t().contiguous(), scores.t().contiguous(), n_grow)
        return stored_index(grown, tuple(mask.shape))


def stored_index(flat: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Flat indices into a matrix of ``shape`` (in, out) of the positions ``flat`` indexes in its (out, in)
    transpose."""
    fan_in, neurons = shape
    return (flat % fan_in) * neurons + torch.div(flat, fan_in, rounding_mode="floor")


def oriented(structure: Structure | None, neurons_in_columns: bool) -> Structure | None:
    """The structure of one layer: ``structure`` itself, or read transposed for a weight stored (in, out)."""
    return Transposed(structure) if structure is not None and neurons_in_columns else structure


def parse_structure(value: str | None) -> Structure | None:
    """``None`` (unstructured), "N:M" with 0 < N < M, or "constant_fan_in".

    Raises:
        ConfigError: any other value.
    """
    if value is None:
        return None
    if value == CONSTANT_FAN_IN:
        return ConstantFanIn()
    match = _NM_PATTERN.match(value) if isinstance(value, str) else None
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise ConfigError(f"Unknown structure {value!r}: use None (unstructured), 'N:M' with 0 < N < M (such as "
                          f"'2:4'), or {CONSTANT_FAN_IN!r}.")
    return NM(int(match[1]), int(match[2]))


def _group_counts(matrix: Tensor, columns: int) -> Tensor:
    """Live weights per group of ``columns`` consecutive columns of each row of a bool matrix: (rows, groups)."""
    rows, fan_in = matrix.shape
    padded = torch.nn.functional.pad(matrix.to(torch.int32), (0, -fan_in % columns))
    return padded.view(rows, -1, columns).sum(2)


def grow_in_groups(mask: Tensor, scores: Tensor, n_grow: int, columns: int, limit: int | Tensor) -> Tensor:
    """Flat indices of the ``n_grow`` positions with the largest ``scores`` among those not live in ``mask``,
    taking no more from any group of ``columns`` consecutive columns of a row than fills it to ``limit``.

    Exact: within a group the best free positions are the only ones that can be chosen (ties to the lower
    column), and the best ``n_grow`` of those across groups win (ties as ``top_k_indices`` breaks them).
    Choosing greedily this way is optimal under per-group limits.

    Args:
        mask: bool, True for live; only read.
        scores: same shape, larger is better; only read.
        n_grow: how many to grow, at most the room the limits leave.
        columns: columns per group (the row's length for a per-neuron limit).
        limit: most live weights per group: an int, or one per row (a (rows,) tensor: 0 for an ablated neuron).
    """
    rows, fan_in = rows_and_fan_in(mask.shape)
    live = mask.reshape(rows, fan_in)
    pad = -fan_in % columns
    ranked = torch.nn.functional.pad(scores.reshape(rows, fan_in).float(), (0, pad), value=-math.inf)
    ranked = ranked.view(rows, -1, columns)
    taken = torch.nn.functional.pad(live, (0, pad), value=True).view(rows, -1, columns)
    ranked = ranked.masked_fill(taken, -math.inf)
    order = torch.sort(ranked, dim=2, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(2, order, torch.arange(columns, device=order.device).expand_as(order))
    limits = limit.view(rows, 1) if isinstance(limit, Tensor) else limit
    room = (limits - _group_counts(live, columns)).clamp_(min=0).unsqueeze(2)
    eligible = ((rank < room) & ~taken).view(rows, -1)[:, :fan_in]
    n_eligible = int(eligible.sum())
    if n_grow > n_eligible:
        raise ValueError(f"n_grow={n_grow} exceeds the room the structure leaves ({n_eligible}).")
    return top_k_indices(scores.reshape(-1), n_grow, exclude=~eligible.reshape(-1))
