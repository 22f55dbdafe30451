"""Parameters sharded by FSDP2 (``fully_shard``): DTensors split by rows (``Shard(0)``) over a one-dimensional
data-parallel mesh, each process holding a contiguous block of rows (``torch.chunk``'s split, the last blocks
possibly shorter or empty).

Masks and every per-weight state of a method are sharded exactly like their parameter. Decisions are made on
whole tensors, one layer at a time: every process gathers the layer, decides as a single process would
(decisions are deterministic), and keeps its own rows. Plain tensors pass through every function unchanged,
so the same code serves a single process, DDP and FSDP2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


def is_sharded(tensor: Tensor | None) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter sharded by FSDP2, or a mask sharded like one)."""
    return isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This process's share of ``tensor`` (a view: writing to it writes the DTensor); the tensor itself if plain."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def gather(tensor: Tensor) -> Tensor:
    """The whole of ``tensor`` on every process (a collective under sharding: every process must call it in the
    same order); the tensor itself if plain."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` (identical on every process) on ``like``'s device, split like ``like`` without communication: each
    process keeps its own rows. Already sharded, it is returned as it is."""
    if is_sharded(whole):
        return whole
    if not is_sharded(like):
        return whole.to(like.device)
    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def local_rows(like: Tensor) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 this process holds of ``like`` (all of them when plain)."""
    rows = like.shape[0]
    if not is_sharded(like):
        return 0, rows
    block = -(-rows // like.device_mesh.size())  # torch.chunk's split: ceil(rows / processes) per block
    start = min(like.device_mesh.get_local_rank() * block, rows)
    return start, start + local(like).shape[0]


def local_positions(like: Tensor) -> tuple[int, int]:
    """The flat (row-major) positions [first, end) of the whole tensor that this process's rows of ``like`` hold."""
    start, stop = local_rows(like)
    row = math.prod(like.shape[1:])
    return start * row, stop * row


def write_local(sharded: Tensor, whole: Tensor) -> None:
    """Copy this process's rows of ``whole`` into the sharded tensor, in place."""
    start, stop = local_rows(sharded)
    local(sharded).copy_(whole[start:stop])


def unsupported_sharding(tensor: Tensor) -> str | None:
    """Why the callbacks cannot keep a mask for this parameter, or None if they can (plain, or ``Shard(0)`` on a
    one-dimensional mesh, as ``fully_shard`` lays parameters out)."""
    if not is_sharded(tensor):
        return None
    if tensor.device_mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
        return (f"it is laid out as {tuple(tensor.placements)} over a {tensor.device_mesh.ndim}-dimensional mesh; "
                "only fully_shard's Shard(0) over the data-parallel mesh is supported (no tensor parallelism)")
    return None


def reduce_over_processes(values: Tensor, like: Iterable[Tensor], op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    """``values`` (a tensor of per-process partial results) reduced by ``op`` (a sum by default) over the
    processes that share the first sharded tensor in ``like``; unchanged when none is sharded."""
    sharded = next((t for t in like if is_sharded(t)), None)
    if sharded is None:
        return values
    group = sharded.device_mesh.get_group()
    if dist.get_backend(group) == dist.Backend.GLOO:
        values = values.cpu()
    dist.all_reduce(values, op=op, group=group)
    return values


def live_totals(masks: Iterable[Tensor]) -> list[int]:
    """The live (True) count of each mask, whole: local counts summed over the processes in one collective
    when the masks are sharded."""
    masks = list(masks)
    if not masks:
        return []
    counts = torch.stack([local(mask).sum() for mask in masks])
    return [int(count) for count in reduce_over_processes(counts.to(torch.int64), masks).tolist()]
