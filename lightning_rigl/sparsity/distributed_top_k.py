"""An exact top-k over scores spread across processes, each holding its rows of every layer (FSDP2's shards),
without gathering them: the k-th largest score is found by bisection on order-preserving integer keys, one
all-reduce of a count per step (at most 64 steps), then ties at it are taken by position.

The ranking is the one a single process makes over the concatenated scores (layer after layer, each in
row-major order), ties lowest position first: within a layer the processes hold consecutive blocks of rows in
rank order, so position order is (layer, process, position within the process's rows). Transient memory: one
int64 key per score of this process's rows, and one bool per score for the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_rigl.sparsity.sharding import is_sharded, reduce_over_processes

_MAGNITUDE_BITS = 0x7FFFFFFFFFFFFFFF


def order_keys(values: Tensor) -> Tensor:
    """int64 keys that order as the floating-point ``values`` do (exactly, through float64); -0.0 as 0.0."""
    bits = (values.to(torch.float64) + 0.0).view(torch.int64)  # + 0.0 turns -0.0 into 0.0
    return torch.where(bits < 0, bits ^ _MAGNITUDE_BITS, bits)


def top_k_over_processes(keys: Tensor, k: int, segments: Sequence[int], like: Tensor) -> Tensor:
    """Which of this process's ``keys`` are among the ``k`` largest over all processes (a collective: every
    process calls it with the same ``k`` and number of segments).

    Args:
        keys: 1-D int64 keys (``order_keys``) of this process: its share of each segment, concatenated.
        k: how many to choose over all processes, at most their number of keys.
        segments: how many of ``keys`` belong to each segment (layer), in order.
        like: a tensor sharded over the processes that share the ranking (plain: this process alone).

    Returns:
        A bool tensor like ``keys``, True for the chosen.
    """
    processes, rank = (like.device_mesh.size(), like.device_mesh.get_local_rank()) if is_sharded(like) else (1, 0)

    def total(local: Tensor) -> Tensor:
        return reduce_over_processes(local, [like])

    bounds = torch.stack([keys.max(), -keys.min()]) if keys.numel() else torch.full((2,), -_MAGNITUDE_BITS)
    bounds = reduce_over_processes(bounds.to(keys.device), [like], op=dist.ReduceOp.MAX)
    low, high = -int(bounds[1]), int(bounds[0])
    while low < high:  # the largest t with at least k keys >= t
        middle = low + (high - low + 1) // 2
        if int(total((keys >= middle).sum().reshape(1))) >= k:
            low = middle
        else:
            high = middle - 1
    chosen = keys > low
    wanted = k - int(total(chosen.sum().reshape(1)))  # ties at the threshold (low) still to take
    ties = torch.zeros(processes, len(segments), dtype=torch.int64, device=keys.device)
    ties[rank] = torch.stack([(part == low).sum() for part in keys.split(list(segments))])
    ties = total(ties).tolist()
    start = 0
    for segment, size in enumerate(segments):
        lower = sum(ties[other][segment] for other in range(rank))  # ties of this layer in lower rows
        take = max(0, min(ties[rank][segment], wanted - lower))
        if take:
            chosen[(keys[start:start + size] == low).nonzero().squeeze(1)[:take] + start] = True
        wanted -= sum(ties[other][segment] for other in range(processes))
        start += size
    return chosen
