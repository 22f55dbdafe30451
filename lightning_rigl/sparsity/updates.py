"""Exact selections on plain tensors: drop and grow (RigL, SET, SNFS) and keep-the-best pruning (SNIP, GMP).

Every selection is exact (exactly k chosen, and no unchosen score beats a chosen one) yet avoids a top-k over
every weight: a sample of the scores at fixed pseudo-random positions gives a threshold that a few more than
k scores pass, and the exact top-k runs on those candidates only. Ties at the threshold (real gradients are
full of exact zeros) are broken by position, lowest index first, so every DDP rank and every resumed run
makes the same choice. When the sample misjudges the threshold, a full top-k runs instead: the answer never
depends on the sample, only the speed does.
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

if TYPE_CHECKING:
    from lightning_rigl.sparsity.structure import Structure

# Below this many scores a plain torch.topk is fastest; above, its cost per score grows several-fold.
_DIRECT_TOP_K = 1 << 14
# Scores read to estimate a threshold (every p-th, p prime).
_SAMPLE_SIZE = 1 << 13


def top_k_indices(scores: Tensor, k: int, largest: bool = True, exclude: Tensor | None = None) -> Tensor:
    """Indices (unordered) of the ``k`` largest (or smallest) entries of the 1-D tensor ``scores``; exact.

    A sample gives two thresholds: an outer one that a few more than k scores pass (the candidates) and an
    inner one that a few fewer pass (chosen for sure). Only the band between them needs a top-k, and it is
    small. Ties at the outer threshold are taken lowest position first.

    Args:
        scores: 1-D scores; only read.
        k: how many to choose, at most the number of positions not excluded.
        largest: choose the largest (True) or the smallest.
        exclude: optional 1-D bool tensor, True at positions that must not be chosen.
    """
    numel = scores.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if numel <= _DIRECT_TOP_K:
        return _full_top_k(scores, k, largest, exclude)
    stride = _prime_stride(numel)
    sample = scores[::stride].clone()
    if exclude is not None:
        sample.masked_fill_(exclude[::stride], -math.inf if largest else math.inf)
    expected = k * sample.numel() / numel
    margin = 4 * math.sqrt(expected) + 8  # four standard deviations of the sampled count, and a little more
    outer_rank = min(sample.numel(), math.ceil(expected + margin))
    top = torch.topk(sample, outer_rank, largest=largest, sorted=False).values
    outer = top.min() if largest else top.max()
    if not bool(outer.isfinite()):
        return _full_top_k(scores, k, largest, exclude)
    worst = -math.inf if largest else math.inf
    candidates = _beyond(scores, outer, largest).nonzero().squeeze(1)
    values = scores.take(candidates)
    n_allowed = candidates.numel()
    if exclude is not None:  # excluded candidates get the worst score: ranked last, never chosen
        excluded = exclude.take(candidates)
        values.masked_fill_(excluded, worst)
        n_allowed -= int(excluded.sum())
    if n_allowed < k:  # every allowed candidate is chosen; ties at the threshold fill up the rest
        tied = _first_tied(scores, outer, k - n_allowed, exclude)
        if tied is None:  # the sample put the threshold too far out: the slow, sure way
            return _full_top_k(scores, k, largest, exclude)
        return torch.cat([candidates if exclude is None else _where(candidates, ~excluded), tied])
    if 2 * candidates.numel() > numel:  # the sample did not narrow the search
        return _full_top_k(scores, k, largest, exclude)
    if candidates.numel() <= _DIRECT_TOP_K:  # few candidates: one top-k beats splitting off a band
        return candidates.take(torch.topk(values, k, largest=largest, sorted=False).indices)
    inner_rank = math.floor(expected - margin)
    if inner_rank >= 1:
        # The inner_rank-th best sampled score: fewer than k scores beat it, and each of them is chosen.
        inner = torch.kthvalue(top, outer_rank - inner_rank + 1 if largest else inner_rank).values
        sure = _beyond(values, inner, largest)
        n_sure = int(sure.sum())
        if n_sure <= k:
            band = (~sure).nonzero().squeeze(1)
            picked = band.take(top_k_indices(values.take(band), k - n_sure, largest))
            return candidates.take(torch.cat([sure.nonzero().squeeze(1), picked]))
    return candidates.take(top_k_indices(values, k, largest))


def _prime_stride(numel: int) -> int:
    """The smallest prime >= numel / _SAMPLE_SIZE. A prime stride cannot alias with a layer's layout: a stride
    of 144 over a 3×3 conv reads a single kernel tap, which at a 1×1 feature map never gets a gradient."""
    stride = max(2, numel // _SAMPLE_SIZE)
    while any(stride % d == 0 for d in range(2, math.isqrt(stride) + 1)):
        stride += 1
    return stride


def _beyond(scores: Tensor, threshold: Tensor, largest: bool) -> Tensor:
    return scores > threshold if largest else scores < threshold


def _allowed(indices: Tensor, exclude: Tensor | None) -> Tensor:
    return indices if exclude is None else _where(indices, ~exclude.take(indices))


def _first_tied(scores: Tensor, value: Tensor, count: int, exclude: Tensor | None) -> Tensor | None:
    """The ``count`` lowest positions (not excluded) whose score equals ``value``; None if there are fewer.
    Reads the scores in growing chunks, since ties at a threshold (exact zeros) are usually plentiful."""
    found, start, chunk = [], 0, max(4 * count, 1 << 16)
    while count > 0 and start < scores.numel():
        tied = _allowed((scores[start:start + chunk] == value).nonzero().squeeze(1) + start, exclude)[:count]
        found.append(tied)
        count -= tied.numel()
        start, chunk = start + chunk, 2 * chunk
    return torch.cat(found) if count == 0 else None


def check_rankable(values: Tensor, name: str) -> None:
    """Refuse NaN scores for a ranking (a NaN is neither above nor below any threshold).

    Raises:
        RuntimeError: ``values`` (layer ``name``'s scores) hold a NaN.
    """
    if bool(values.isnan().any()):
        raise RuntimeError(f"The pruning scores of {name!r} hold NaN: its weights or gradients are NaN (the run has "
                           "diverged). Lower the learning rate, or clip the gradients.")


def _top_k_lowest_ties(scores: Tensor, k: int) -> Tensor:
    """``top_k_indices`` (largest), with ties at the k-th score taken lowest position first whatever path it took:
    the rule ``distributed_top_k`` keeps across processes, so that sharded and replicated runs choose alike."""
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    threshold = scores.take(top_k_indices(scores, k)).min()
    above = (scores > threshold).nonzero().squeeze(1)
    return torch.cat([above, (scores == threshold).nonzero().squeeze(1)[:k - above.numel()]])


def _full_top_k(scores: Tensor, k: int, largest: bool, exclude: Tensor | None) -> Tensor:
    if exclude is not None:
        scores = scores.masked_fill(exclude, -math.inf if largest else math.inf)
    return torch.topk(scores, k, largest=largest, sorted=False).indices


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
    return MaskChange(removed=_where(dropped, ~flat.take(dropped)), added=_where(grown, ~regrown))


def _where(values: Tensor, keep: Tensor) -> Tensor:
    """``values[keep]`` for 1-D tensors; index_select is faster than boolean indexing."""
    return values.index_select(0, keep.nonzero().squeeze(1))


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
    kept = _top_k_lowest_ties(torch.cat(values), n_keep).sort().values
    offsets = torch.tensor([0, *itertools.accumulate(sizes)], device=device)
    bounds = torch.searchsorted(kept, offsets).tolist()
    changes = {}
    for i, name in enumerate(names):
        survivors = (kept[bounds[i]:bounds[i + 1]] - offsets[i]).to(live[i].device)
        still_live = torch.zeros(sizes[i], dtype=torch.bool, device=live[i].device).index_fill_(0, survivors, True)
        removed = _where(live[i], ~still_live)
        masks[name].view(-1).index_fill_(0, removed, False)
        changes[name] = MaskChange(removed=removed, added=removed.new_empty(0))
    return changes
