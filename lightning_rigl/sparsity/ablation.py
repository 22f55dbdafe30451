"""SRigL's update of a constant fan-in layer (Lasby et al., "Dynamic Sparse Training with Structured Sparsity",
ICLR 2024; official code: calgaryml/condensed-sparsity, ``RigLConstFanScheduler``): which neurons stay, and the
drop and grow that leave every one of them with the same fan-in."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rigl.sparsity.masks import MaskChange
from lightning_rigl.sparsity.structure import grow_in_groups, rows_and_fan_in
from lightning_rigl.sparsity.selection import top_k_indices
from lightning_rigl.sparsity.updates import drop_and_grow


def salient_per_neuron(mask: Tensor, weights: Tensor, grow_scores: Tensor, n_drop: int) -> Tensor:
    """Each neuron's salient weights: those unstructured RigL would keep (the largest |w| of the live ones, all
    but ``n_drop``) or grow (the ``n_drop`` largest ``grow_scores`` among the rest). ``mask`` is only read.
    An int64 tensor of one count per row."""
    salient = mask.clone()
    drop_and_grow(salient, weights, grow_scores, n_drop, n_drop)
    return salient.reshape(rows_and_fan_in(mask.shape)).sum(1)


def neurons_to_keep(salient: Tensor, budget: int, fan_in: int, min_salient: int) -> Tensor:
    """Which neurons stay active (True) and which are ablated: a neuron with fewer than ``min_salient`` salient
    weights is ablated, but never so many that the others would need more than ``fan_in`` weights each to hold
    ``budget``: the threshold drops to the count of the (⌊budget / fan_in⌋ + 1)-th most salient neuron if it
    must, as in the official ``_get_neurons_to_ablate``.

    Args:
        salient: salient weights per neuron (``salient_per_neuron``).
        budget: the layer's live weights (the distribution's count, before rounding to a whole fan-in).
        fan_in: weights per neuron of the dense layer.
        min_salient: the threshold, in weights; 0 ablates nothing.
    """
    fewest_active = budget // fan_in + 1  # with fewer, a neuron would need more than its dense fan-in
    if fewest_active <= salient.numel():
        ranked = salient.sort(descending=True).values
        min_salient = min(min_salient, int(ranked[fewest_active - 1]))
    return salient >= min_salient


@torch.no_grad()
def constant_fan_in_update(mask: Tensor, weights: Tensor, grow_scores: Tensor, n_drop: int, active: Tensor,
                           budget: int) -> MaskChange:
    """The SRigL drop and grow, in ``mask`` (in place): every active neuron ends with k = ⌊budget / n_active⌋
    live weights, every ablated neuron with none.

    The weights of ablated neurons go first and count towards ``n_drop``; then the smallest |w| of the active
    neurons' live weights, until ``n_drop`` are gone (or none are left); then a neuron still above k loses its
    smallest |w| (its fan-in shrank because neurons came back). Each active neuron then grows back to k where
    ``grow_scores`` is largest among its positions not kept. Ties go to the lower position. A connection
    dropped and grown again counts as neither (it keeps its weight), as in ``drop_and_grow``.

    Args:
        mask: bool, True for live; contiguous.
        weights: the parameter (only live entries are read).
        grow_scores: same shape, larger is better (|dense gradient|); only read.
        n_drop: connections to drop, at most the number live.
        active: bool, one per row: False for an ablated neuron.
        budget: the layer's live-weight budget; at least one weight per active neuron.
    """
    rows, fan_in = rows_and_fan_in(mask.shape)
    matrix = mask.view(rows, fan_in)
    old = matrix.clone()
    n_active = int(active.sum())
    fan_in_now = budget // n_active
    if not 1 <= fan_in_now <= fan_in:
        raise ValueError(f"{n_active} active neurons cannot hold {budget} weights within a fan-in of 1 to {fan_in}.")
    matrix &= active.view(rows, 1)
    still_to_drop = n_drop - (int(old.sum()) - int(matrix.sum()))
    magnitudes = weights.reshape(rows, fan_in).abs()
    live = matrix.view(-1).nonzero().squeeze(1)
    if still_to_drop > 0:
        smallest = top_k_indices(magnitudes.reshape(-1).take(live), min(still_to_drop, live.numel()), largest=False)
        matrix.view(-1).index_fill_(0, live.take(smallest), False)
    over = matrix.sum(1) > fan_in_now
    if bool(over.any()):  # such a neuron keeps its largest |w|, ties to the lower column
        ranked = magnitudes.masked_fill(~matrix, -1.0)[over]
        best = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :fan_in_now]
        matrix[over] = torch.zeros_like(matrix[over]).scatter_(1, best, True)
    limits = torch.where(active, fan_in_now, 0)
    grown = grow_in_groups(matrix, grow_scores, n_active * fan_in_now - int(matrix.sum()), fan_in, limits)
    matrix.view(-1).index_fill_(0, grown, True)
    removed = (old & ~matrix).view(-1).nonzero().squeeze(1)
    added = (matrix & ~old).view(-1).nonzero().squeeze(1)
    return MaskChange(removed=removed, added=added)
