"""Drop and grow: the mask update of RigL and SET on plain tensors.

The selection is exact (exactly k dropped, exactly k grown) yet avoids a top-k over every weight: a
strided sample of the scores gives a threshold that keeps a few more than k candidates, and the exact
top-k runs on those candidates only. When the sample misjudges the threshold, the full top-k runs instead,
so the answer never depends on the sample, only the speed does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_rigl.sparsity.masks import MaskChange

# Number of scores sampled to estimate the selection threshold, and the smallest tensor worth sampling.
_SAMPLE_SIZE = 1 << 14
_MIN_SAMPLED_NUMEL = 4 * _SAMPLE_SIZE


def top_k_indices(scores: Tensor, k: int, largest: bool = True) -> Tensor:
    """Indices (unordered) of the ``k`` largest (or smallest) entries of the 1-D tensor ``scores``."""
    numel = scores.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if numel < _MIN_SAMPLED_NUMEL or 2 * k > numel:
        return torch.topk(scores, k, largest=largest, sorted=False).indices
    sample = scores[:: numel // _SAMPLE_SIZE]
    expected = k * sample.numel() / numel
    # A margin of four standard deviations of the sampled count makes the fallback rare.
    rank = min(sample.numel(), math.ceil(expected + 4 * math.sqrt(expected) + 8))
    sampled = torch.topk(sample, rank, largest=largest, sorted=False).values
    beyond = scores >= sampled.min() if largest else scores <= sampled.max()
    candidates = beyond.nonzero().squeeze(1)
    if candidates.numel() < k:
        return torch.topk(scores, k, largest=largest, sorted=False).indices
    return candidates[torch.topk(scores[candidates], k, largest=largest, sorted=False).indices]


@torch.no_grad()
def drop_and_grow(mask: Tensor, weights: Tensor, grow_scores: Tensor, n_swap: int) -> MaskChange:
    """Drop the ``n_swap`` live connections of smallest |weight|, then grow the ``n_swap``
    positions with the largest ``grow_scores`` among those not kept. Updates ``mask`` in place.

    A connection dropped and grown again in the same update counts as neither removed nor added: it keeps
    its weight, as in the official implementation. The number of live connections never changes.

    Args:
        mask: bool tensor, True for live connections; contiguous.
        weights: the parameter, same shape (only its live entries are read).
        grow_scores: same shape, non-negative; RigL uses |dense gradient|, SET random numbers. Consumed:
            the tensor is overwritten, so pass a fresh one.
        n_swap: connections to exchange, at most the number of live connections.
    """
    flat = mask.view(-1)
    live = flat.nonzero().squeeze(1)
    if not 0 <= n_swap <= live.numel():
        raise ValueError(f"n_swap={n_swap} must be within [0, {live.numel()}] (the live connections).")
    dropped = live[top_k_indices(weights.reshape(-1)[live].abs(), n_swap, largest=False)]
    flat[dropped] = False
    candidates = grow_scores.reshape(-1)
    candidates.masked_fill_(flat, -1.0)  # kept connections are never grown again
    grown = top_k_indices(candidates, n_swap)
    flat[grown] = True
    just_dropped = torch.zeros_like(flat)  # a bool marker is much cheaper than torch.isin's sort
    just_dropped[dropped] = True
    return MaskChange(removed=dropped[~flat[dropped]], added=grown[~just_dropped[grown]])
