"""The one timing rule by which "auto" picks a kernel, in training and in inference: the median of a few runs
after two warm-up runs, on real inputs, with CUDA work waited for."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

WARM_UP = 2  # runs before timing: the first ones pay for allocations and (MKL, cuSPARSE) set-up


def median_ms(run: Callable[[], object], repeats: int) -> float:
    """Median wall-clock time of ``run()`` in milliseconds over ``repeats`` runs, after ``WARM_UP`` untimed ones."""
    times = []
    for index in range(repeats + WARM_UP):
        _synchronize()
        start = time.perf_counter()
        run()
        _synchronize()  # CUDA kernels run asynchronously: time their completion, not their launch
        if index >= WARM_UP:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def fastest(candidates: Mapping[str, Callable[[], object]], repeats: int) -> tuple[str, dict[str, float]]:
    """The key of the fastest candidate and every candidate's median time (ms); the first listed wins a tie."""
    times = {key: median_ms(run, repeats) for key, run in candidates.items()}
    return min(times, key=times.__getitem__), times


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
