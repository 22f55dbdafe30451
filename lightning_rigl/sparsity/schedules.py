"""When masks change and by how much. Steps are optimizer steps (0-based ``trainer.global_step``)."""

from __future__ import annotations

import math

from lightning_rigl.errors import ConfigError

DROP_SCHEDULES = ("cosine", "constant", "linear")


def drop_fraction(step: int, initial: float, stop_step: int, schedule: str) -> float:
    """Fraction of live connections exchanged at update ``step``.

    cosine: α/2 · (1 + cos(π·t / T_end)) (the paper's default); constant: α; linear: α · (1 - t / T_end).
    Zero from ``stop_step`` (T_end) on.
    """
    if step >= stop_step:
        return 0.0
    progress = step / stop_step
    if schedule == "cosine":
        return initial / 2 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return initial * (1 - progress)
    if schedule == "constant":
        return initial
    raise ConfigError(f"Unknown drop_schedule {schedule!r}: use one of {DROP_SCHEDULES}.")


def is_update_step(step: int, interval: int, stop_step: int) -> bool:
    """True at steps ΔT, 2ΔT, ... strictly before T_end. Step 0 is not an update: the random initial mask
    has not seen a gradient step yet."""
    return 0 < step < stop_step and step % interval == 0


def resolve_stop_step(stop_at: int | float, total_steps: float) -> int:
    """T_end in optimizer steps: ``stop_at`` is a fraction of the run (a float in (0, 1]) or a step (int).

    Raises:
        ValueError: a fraction is given but the run's length is unknown (no max_steps / max_epochs).
    """
    if isinstance(stop_at, int):
        return stop_at
    if not math.isfinite(total_steps):
        raise ConfigError(
            f"stop_at={stop_at} is a fraction of the run, but the run has no known length. Set "
            "Trainer(max_steps=...) or max_epochs, or give stop_at as an absolute step (an int)."
        )
    return max(1, int(stop_at * total_steps))
