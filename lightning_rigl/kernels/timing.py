"""The one timing rule by which "auto" picks a kernel, in training and in inference: every candidate runs once a
round, in turn, for a few rounds after two warm-up rounds (so that a slow moment of a busy machine hits every
candidate alike), on real inputs, with CUDA work waited for; each candidate's median counts, and the fastest wins
unless it beats dense by no more than ``TIE``, where dense is kept."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

WARM_UP = 2  # runs before timing: the first ones pay for allocations and (MKL, cuSPARSE) set-up
# A sparse kernel replaces dense only when faster by more than this fraction: closer timings are within the noise of
# a few runs on a busy machine, and dense is the safe side of a tie.
TIE = 0.05
BASELINE = "dense"


def medians_ms(candidates: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Each candidate's median wall-clock time in milliseconds over ``repeats`` rounds, after ``WARM_UP`` untimed
    ones; within a round the candidates run in turn."""
    times: dict[str, list[float]] = {key: [] for key in candidates}
    for index in range(repeats + WARM_UP):
        for key, run in candidates.items():
            _synchronize()
            start = time.perf_counter()
            run()
            _synchronize()  # CUDA kernels run asynchronously: time their completion, not their launch
            if index >= WARM_UP:
                times[key].append(time.perf_counter() - start)
    return {key: 1e3 * statistics.median(values) for key, values in times.items()}


def fastest(candidates: Mapping[str, Callable[[], object]], repeats: int) -> tuple[str, dict[str, float]]:
    """The candidate ``choose`` keeps, and every candidate's median time (ms)."""
    times = medians_ms(candidates, repeats)
    return choose(times), times


def choose(times: Mapping[str, float]) -> str:
    """The fastest of ``times`` (ms by candidate), or "dense" (when timed) if the fastest beats it by ``TIE`` or
    less."""
    best = min(times, key=times.__getitem__)
    if BASELINE in times and times[best] * (1 + TIE) >= times[BASELINE]:
        return BASELINE
    return best


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
