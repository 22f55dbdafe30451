"""Mask changes on plain tensors: drop and grow (RigL, SET, SNFS) and keep-the-best pruning (SNIP, GMP), each an
exact selection (``selection.top_k_indices``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_rigl.sparsity.masks import MaskChange
from lightning_rigl.sparsity.selection import check_rankable, top_k_indices, top_k_lowest_ties, where_true

if TYPE_CHECKING:
    from lightning_rigl.sparsity.structure import Structure


@torch.no_grad()
def drop_and_grow(mask: Tensor, weights: Tensor, grow_scores: Tensor, n_drop: int, n_grow: int,
                  structure: Structure | None = None) -> MaskChange:
    """Drop the ``n_drop`` live connections of smallest |weight|, then grow the ``n_grow`` positions with the
    largest ``grow_scores`` among those not kept (within ``structure``, if given: dropping never breaks one).
    Updates ``mask`` in place.

    A connection dropped and grown again in the same update counts as neither removed nor added: it keeps
    its weight, as in the official implementation. The layer's live count changes by ``n_grow - n_drop``.

    Args:
        mask: bool tensor, True for live connections; contiguous.
        weights: the parameter, same shape (only its live entries are read).
        grow_scores: same shape, larger is better (RigL: |dense gradient|, SET: random numbers); only read.
        n_drop: connections to drop, at most the number of live connections.
        n_grow: connections to grow, at most the number of positions not kept.
    """
    flat = mask.view(-1)
    live = flat.nonzero().squeeze(1)
    if not 0 <= n_drop <= live.numel():
        raise ValueError(f"n_drop={n_drop} must be within [0, {live.numel()}] (the live connections).")
    free = flat.numel() - live.numel() + n_drop
    if not 0 <= n_grow <= free:
        raise ValueError(f"n_grow={n_grow} must be within [0, {free}] (the positions not kept).")
    dropped = live.take(top_k_indices(weights.reshape(-1).take(live).abs(), n_drop, largest=False))
    flat.index_fill_(0, dropped, False)
    if structure is None:
        grown = top_k_indices(grow_scores.reshape(-1), n_grow, exclude=flat)  # kept connections are not grown again
    else:
        grown = structure.grow(mask, grow_scores, n_grow)
    flat.index_fill_(0, grown, True)
    just_dropped = torch.zeros_like(flat).index_fill_(0, dropped, True)  # much cheaper than torch.isin's sort
    regrown = just_dropped.take(grown)
    if not bool(regrown.any()):
        return MaskChange(removed=dropped, added=grown)
    return MaskChange(removed=where_true(dropped, ~flat.take(dropped)), added=where_true(grown, ~regrown))


@torch.no_grad()
def prune(mask: Tensor, scores: Tensor, n_keep: int) -> MaskChange:
    """Keep the ``n_keep`` live connections with the largest ``scores``; the other live ones die. Updates
    ``mask`` in place (masks only shrink).

    Args:
        mask: bool tensor, True for live connections; contiguous.
        scores: same shape (only live entries are read): |w| for magnitude pruning, |g·w| for SNIP.
        n_keep: live connections to keep, at most the number live now.
    """
    flat = mask.view(-1)
    live = flat.nonzero().squeeze(1)
    if not 0 <= n_keep <= live.numel():
        raise ValueError(f"n_keep={n_keep} must be within [0, {live.numel()}] (the live connections).")
    removed = live.take(top_k_indices(scores.reshape(-1).take(live), live.numel() - n_keep, largest=False))
    flat.index_fill_(0, removed, False)
    return MaskChange(removed=removed, added=removed.new_empty(0))


@torch.no_grad()
def prune_globally(masks: Mapping[str, Tensor], scores: Mapping[str, Tensor], n_keep: int) -> dict[str, MaskChange]:
    """Keep the ``n_keep`` live connections with the largest ``scores`` ranked across all layers together;
    every layer keeps at least its best one. Updates the masks in place (masks only shrink).

    Args:
        masks: name -> bool mask (True for live), contiguous; all on one device.
        scores: name -> scores of the same shape (only live entries are read).
        n_keep: live connections to keep in all, between the number of layers and the number live now.
    """
    names = list(masks)
    live = [masks[name].view(-1).nonzero().squeeze(1) for name in names]
    # Ranked together in the widest score dtype, on the first layer's device.
    dtype = functools.reduce(torch.promote_types, [scores[name].dtype for name in names])
    device = masks[names[0]].device
    values = [scores[name].reshape(-1).take(positions).to(device, dtype) for name, positions in zip(names, live)]
    sizes = [positions.numel() for positions in live]
    if not len(names) <= n_keep <= sum(sizes):
        raise ValueError(f"n_keep={n_keep} must be within [{len(names)}, {sum(sizes)}] (one per layer, all live).")
    for name, layer_values in zip(names, values):
        check_rankable(layer_values, name)
        layer_values[layer_values.argmax()] = math.inf  # each layer's best connection survives (the first, if tied)
    kept = top_k_lowest_ties(torch.cat(values), n_keep).sort().values
    offsets = torch.tensor([0, *itertools.accumulate(sizes)], device=device)
    bounds = torch.searchsorted(kept, offsets).tolist()
    changes = {}
    for i, name in enumerate(names):
        survivors = (kept[bounds[i]:bounds[i + 1]] - offsets[i]).to(live[i].device)
        still_live = torch.zeros(sizes[i], dtype=torch.bool, device=live[i].device).index_fill_(0, survivors, True)
        removed = where_true(live[i], ~still_live)
        masks[name].view(-1).index_fill_(0, removed, False)
        changes[name] = MaskChange(removed=removed, added=removed.new_empty(0))
    return changes
