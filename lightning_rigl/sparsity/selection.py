"""Exact top-k selections on plain tensors, shared by the mask changes (updates) and the structures.

Every selection is exact (exactly k chosen, and no unchosen score beats a chosen one) yet avoids a top-k over
every weight: a sample of the scores at fixed pseudo-random positions gives a threshold that a few more than
k scores pass, and the exact top-k runs on those candidates only. Ties at the threshold (real gradients are
full of exact zeros) are broken by position, lowest index first, so every DDP rank and every resumed run
makes the same choice. When the sample misjudges the threshold, a full top-k runs instead: the answer never
depends on the sample, only the speed does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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
        return torch.cat([candidates if exclude is None else where_true(candidates, ~excluded), tied])
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
    return indices if exclude is None else where_true(indices, ~exclude.take(indices))


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


def top_k_lowest_ties(scores: Tensor, k: int) -> Tensor:
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


def where_true(values: Tensor, keep: Tensor) -> Tensor:
    """``values[keep]`` for 1-D tensors; index_select is faster than boolean indexing."""
    return values.index_select(0, keep.nonzero().squeeze(1))

