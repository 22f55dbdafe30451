"""Boolean masks (True = live connection) and applying mask changes to weights and optimizer state."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from lightning_rigl.sparsity.distributions import live_count
from lightning_rigl.sparsity.selection import top_k_lowest_ties
from lightning_rigl.sparsity.sharding import is_sharded, live_totals, local, local_positions
from lightning_rigl.sparsity.structure import Structure, oriented

_SEED_MASK = (1 << 63) - 1


def mask_densities(masks: Mapping[str, Tensor]) -> dict[str, float]:
    """Each mask's fraction of live (True) positions (of the whole mask, when sharded)."""
    return {name: count / mask.numel() for (name, mask), count in zip(masks.items(), live_totals(masks.values()))}


def global_density(masks: Mapping[str, Tensor]) -> float:
    """The fraction of live positions over all the masks together."""
    return sum(live_totals(masks.values())) / sum(mask.numel() for mask in masks.values())


_UINT32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # the multiplier of a 32-bit integer hash (two xor-shift-multiply rounds)


def _hash32(index: Tensor) -> Tensor:
    """A 32-bit integer hash of each int64 index, in int64: no product exceeds 2⁶⁰, so nothing overflows."""
    x = index & _UINT32
    for _ in range(2):
        x = (((x >> 16) ^ x) * _MIX) & _UINT32
    return (x >> 16) ^ x


def mask_digest(masks: Mapping[str, Tensor]) -> Tensor:
    """A fingerprint of each mask's live positions, cheap to compare between processes: one row per mask of
    int64 [live count, Σ i, Σ h(i)] over its live flat (row-major) indices i, with h a 32-bit integer hash.

    Two masks with the same live positions always agree. Masks that differ agree only by chance, about one in
    2³² for differences without structure (the power sums Σ i and Σ i² alone coincide for structured sets:
    {1, 5, 6} and {2, 3, 7}). Sums over fewer than 2³¹ positions cannot overflow. Shape (len(masks), 3), on
    the first mask's device.
    """
    rows = []
    for mask in masks.values():
        index = mask.reshape(-1).nonzero().squeeze(1)
        rows.append(torch.stack([index.new_tensor(index.numel()), index.sum(), _hash32(index).sum()]))
    if not rows:
        return torch.zeros(0, 3, dtype=torch.int64)
    return torch.stack([row.to(rows[0].device) for row in rows])


class Stream(IntEnum):
    """What a random draw is for: one stream per use, so that no two uses of a step and layer share numbers."""

    INITIAL_MASK = 0
    GROW_POSITIONS = 1  # SET's random growth
    GROW_VALUES = 2  # grow_init "normal" / "uniform"


def generator(seed: int, stream: Stream, step: int, layer_index: int) -> torch.Generator:
    """A CPU generator determined by ``seed``, the use, the optimizer step and the layer's index alone.

    Randomness derived this way is identical on every DDP rank and needs no state in checkpoints: a resumed
    run draws the same numbers as an uninterrupted one.
    """
    return torch.Generator().manual_seed(hash((seed, int(stream), step, layer_index)) & _SEED_MASK)


def random_mask(shape: torch.Size, n_live: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """A bool mask of ``shape`` with exactly ``n_live`` True entries at uniformly random positions."""
    numel = shape.numel()
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=gen)[:n_live]] = True
    return mask.view(shape).to(device)


def random_masks(params: Mapping[str, Tensor], densities: Mapping[str, float], seed: int = 0,
                 structure: Structure | None = None, neurons_in_columns: Collection[str] = ()) -> dict[str, Tensor]:
    """For each named tensor, a mask with exactly ``live_count(numel, density)`` live positions drawn at random
    (within ``structure`` for the sparse layers, if given; read transposed for the names in
    ``neurons_in_columns``, weights stored (in, out)): the initial masks of a sparse callback with this ``seed``
    (same layer order, same numbers). The tensors are only read (shape, device)."""
    masks = {}
    for index, (name, param) in enumerate(params.items()):
        n_live, gen = live_count(param.numel(), densities[name]), generator(seed, Stream.INITIAL_MASK, 0, index)
        layer_structure = oriented(structure, name in neurons_in_columns)
        draw = random_mask if layer_structure is None or n_live == param.numel() else layer_structure.random_mask
        masks[name] = draw(param.shape, n_live, gen, param.device)
    return masks


def top_masks(scores: Mapping[str, Tensor], densities: Mapping[str, float], structure: Structure | None = None,
              neurons_in_columns: Collection[str] = ()) -> dict[str, Tensor]:
    """For each named score tensor, a mask with exactly ``live_count(numel, density)`` live positions where the
    scores are largest: ties to the lower position; within ``structure`` (read transposed for the names in
    ``neurons_in_columns``), as ``Structure.grow`` chooses, ties to the lower column within a group and as
    ``top_k_indices`` breaks them across groups. The scores are only read."""
    masks = {}
    for name, score in scores.items():
        n_live = live_count(score.numel(), densities[name])
        layer_structure = oriented(structure, name in neurons_in_columns)
        mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
        if layer_structure is None or n_live == score.numel():
            chosen = top_k_lowest_ties(score.reshape(-1), n_live)
        else:
            chosen = layer_structure.grow(mask, score, n_live)
        masks[name] = mask.view(-1).index_fill_(0, chosen, True).view(score.shape)
    return masks


@dataclass
class MaskChange:
    """Positions (flat, row-major indices into the parameter) whose connection died or was born."""

    removed: Tensor
    added: Tensor


def _fill(tensor: Tensor, flat_index: Tensor, values: Tensor | None = None) -> None:
    """``tensor.view(-1)[flat_index] = values`` (0 when None) for any memory layout (channels_last included)."""
    if tensor.is_contiguous():
        if values is None:
            tensor.view(-1).index_fill_(0, flat_index, 0)  # twice as fast as index_put_ with a scalar
        else:
            tensor.view(-1).index_copy_(0, flat_index, values)
    else:
        fill = tensor.new_zeros(()) if values is None else values
        tensor.index_put_(torch.unravel_index(flat_index, tensor.shape), fill)


def param_state_tensors(optimizer: torch.optim.Optimizer, param: Tensor) -> list[Tensor]:
    """The optimizer-state tensors of ``param`` that have its shape (momentum, Adam's m and v, ...)."""
    state = optimizer.state.get(param, {})
    return [value for value in state.values() if isinstance(value, Tensor) and value.shape == param.shape]


@torch.no_grad()
def apply_change(
    param: Tensor,
    change: MaskChange,
    optimizer: torch.optim.Optimizer | None,
    grow_values: Tensor | None = None,
) -> None:
    """Write a mask change into the weights and the optimizer state, in place.

    Removed connections become 0. Added connections take ``grow_values`` (one per added index; None means
    0). Every optimizer-state tensor of the parameter's shape is zeroed at both removed and added positions,
    so a dead weight receives no update from stale momentum and a new one starts from a clean state. For a
    sharded parameter, ``change`` holds positions of the whole weight; each process writes the ones in its rows.
    """
    states = [] if optimizer is None else param_state_tensors(optimizer, param)
    removed, added = change.removed, change.added
    if is_sharded(param):
        first, end = local_positions(param)  # metadata only: indexing the DTensor would gather it
        here = (added >= first) & (added < end)
        removed = removed[(removed >= first) & (removed < end)] - first
        added = added[here] - first
        grow_values = None if grow_values is None else grow_values.to(here.device)[here]
        param, states = local(param), [local(state) for state in states]
    _fill(param, removed)
    _fill(param, added, None if grow_values is None else grow_values.to(param.device, param.dtype))
    touched = torch.cat([removed, added])
    for state in states:
        _fill(state, touched)


@torch.no_grad()
def apply_mask(param: Tensor, mask: Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Zero ``param`` and its param-shaped optimizer state wherever ``mask`` is False, in place (each process its
    own rows, when sharded like the mask)."""
    local(param).mul_(local(mask))
    if optimizer is not None:
        for state in param_state_tensors(optimizer, param):
            local(state).mul_(local(mask))
