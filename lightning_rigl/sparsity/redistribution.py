"""How many live weights each layer gets when a method moves them between layers.

Pure arithmetic on counts: which layer's budget grows or shrinks is decided here, which connections by the
scores in ``updates``. Counts are whole numbers, computed exactly (rational arithmetic), so every DDP rank
and every resumed run agrees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction


def apportion(total: int, shares: Sequence[float], lower: Sequence[int], upper: Sequence[int]) -> list[int]:
    """Whole numbers ``x`` with ``lower[i] <= x[i] <= upper[i]`` and ``sum(x) == total``, in proportion to
    ``shares`` as far as the bounds allow.

    Above its lower bound each entry receives ``share / Σ shares`` of what is left; an entry that would pass
    its upper bound is held there and its excess goes to the others in proportion to their shares (the
    sparse_learning rule), until none overflows. Fractions are rounded by the largest remainder, ties to the
    lower index. Shares that are not positive (or not finite) count as 0; if every share of the entries with
    room is 0, what is left is shared in proportion to the room.

    Raises:
        ValueError: the bounds cannot hold ``total``, or a lower bound exceeds its upper bound.
    """
    if len(shares) != len(lower) or len(lower) != len(upper):
        raise ValueError("shares, lower and upper must have one entry per layer.")
    if any(lo > hi for lo, hi in zip(lower, upper)) or not sum(lower) <= total <= sum(upper):
        raise ValueError(f"Cannot apportion {total} within the bounds [{sum(lower)}, {sum(upper)}].")
    room = [hi - lo for lo, hi in zip(lower, upper)]
    weight = [Fraction(s) if math.isfinite(s) and s > 0 else Fraction(0) for s in shares]
    ideal = [Fraction(0)] * len(room)
    left = Fraction(total - sum(lower))
    open_ = {i for i, r in enumerate(room) if r > 0}
    while left > 0 and open_:
        if sum(weight[i] for i in open_) == 0:
            weight = [Fraction(room[i]) if i in open_ else w for i, w in enumerate(weight)]
        scale = left / sum(weight[i] for i in open_)
        full = {i for i in open_ if weight[i] * scale >= room[i]}
        if not full:
            for i in open_:
                ideal[i] = weight[i] * scale
            break
        for i in full:
            ideal[i] = Fraction(room[i])
            left -= room[i]
        open_ -= full
    counts = [math.floor(x) for x in ideal]
    remainder = total - sum(lower) - sum(counts)
    by_fraction = sorted(range(len(counts)), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in by_fraction[:remainder]:
        counts[i] += 1
    return [lo + c for lo, c in zip(lower, counts)]


def grow_counts(
    live: Sequence[int], dropped: Sequence[int], numel: Sequence[int], shares: Sequence[float]
) -> list[int]:
    """How many connections each layer grows after dropping ``dropped`` of its ``live`` ones, so that the
    layers together grow exactly what they dropped, in proportion to ``shares`` (RigL-SG / RigL-SM, SNFS),
    with every layer keeping between 1 and ``numel`` live weights. Without any positive share, each layer
    grows what it dropped."""
    total = sum(dropped)
    if not any(math.isfinite(s) and s > 0 for s in shares):
        return list(dropped)
    kept = [n - d for n, d in zip(live, dropped)]
    return apportion(total, shares, lower=[max(0, 1 - k) for k in kept], upper=[n - k for n, k in zip(numel, kept)])
