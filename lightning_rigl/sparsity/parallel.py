"""Per-layer work on two threads: a mask update is many small tensor operations per layer, most too small for
PyTorch's own intra-op threads, so two layers at a time keep both cores of a small machine busy (about a
quarter off a ResNet-50 update on 2 CPU cores). Layers are independent, so the result does not depend on
the schedule. Sharded layers (FSDP2) run one after the other, in order: each gathers its layer, a collective
that every process must issue in the same order."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from torch import Tensor

from lightning_rigl.sparsity.sharding import is_sharded

Result = TypeVar("Result")

_WORKERS = 2


def for_each_layer(fn: Callable[[int, str, Tensor], Result], params: Mapping[str, Tensor]) -> dict[str, Result]:
    """``fn(index, name, param)`` for every layer (index: its position in ``params``), the largest layers
    first (in order, on this thread, when any is sharded); results keyed by name in ``params``' order. The first
    exception raised by ``fn`` propagates."""
    if any(is_sharded(param) for param in params.values()):
        return {name: fn(index, name, param) for index, (name, param) in enumerate(params.items())}
    jobs = sorted(enumerate(params.items()), key=lambda job: -job[1][1].numel())
    with ThreadPoolExecutor(_WORKERS) as pool:
        results = dict(pool.map(lambda job: (job[1][0], fn(job[0], *job[1])), jobs))
    return {name: results[name] for name in params}
