"""Per-layer work on two threads: a mask update is many small tensor operations per layer, most too small for
PyTorch's own intra-op threads, so two layers at a time keep both cores of a small machine busy (about a
quarter off a ResNet-50 update on 2 CPU cores). Layers are independent, so the result does not depend on
the schedule. Work that every process must do in the same order (the gathers of sharded layers, which are
collectives) runs on the calling thread, layer after layer, a little ahead of the workers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from torch import Tensor

Result = TypeVar("Result")

_WORKERS = 2


def for_each_layer(fn: Callable[[int, str, Tensor], Result], params: Mapping[str, Tensor],
                   prepare: Callable[[str], None] | None = None) -> dict[str, Result]:
    """``fn(index, name, param)`` for every layer (index: its position in ``params``), the largest layers first;
    results keyed by name in ``params``' order. With ``prepare``, the layers go in ``params``' order, and
    ``prepare(name)`` runs first on this thread, layer after layer, at most ``_WORKERS + 1`` layers ahead of those ``fn`` has finished
    (so at most that many prepared at once). The first exception raised by ``fn`` propagates, once every layer
    is prepared: the other processes' collectives are not left waiting."""
    if prepare is None:
        jobs = sorted(enumerate(params.items()), key=lambda job: -job[1][1].numel())
        with ThreadPoolExecutor(_WORKERS) as pool:
            results = dict(pool.map(lambda job: (job[1][0], fn(job[0], *job[1])), jobs))
        return {name: results[name] for name in params}
    futures: dict[str, Future[Result]] = {}
    with ThreadPoolExecutor(_WORKERS) as pool:
        for index, (name, param) in enumerate(params.items()):
            running = [future for future in futures.values() if not future.done()]
            if len(running) > _WORKERS:
                wait(running, return_when=FIRST_COMPLETED)
            prepare(name)
            futures[name] = pool.submit(fn, index, name, param)
    return {name: future.result() for name, future in futures.items()}
