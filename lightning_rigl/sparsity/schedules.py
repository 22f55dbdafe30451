"""When masks change and by how much. Steps are optimizer steps (0-based ``trainer.global_step``)."""

from __future__ import annotations

import math

from lightning_rigl.errors import ConfigError

DROP_SCHEDULES = ("cosine", "constant", "linear")


def drop_fraction(step: int, initial: float, stop_step: int, schedule: str, start_step: int = 0) -> float:
    """Fraction of live connections exchanged at update ``step``, as the official code anneals it.

    With t_0 the first update step when it was set (0 otherwise) and T_end = ``stop_step``:
    cosine: α/2 · (1 + cos(π · min(t, T_end - t_0) / (T_end - t_0))) (the paper's default; the official cosine
    decays from the raw step t over T_end - t_0 steps, so it reaches 0 at T_end - t_0);
    linear: α · (1 - (t - t_0) / (T_end - t_0)) (the official ``exponential`` anneal with power 1: α at the first
    update, decaying to 0 at T_end); constant: α. Zero from ``stop_step`` (T_end) on.
    """
    if step >= stop_step:
        return 0.0
    span = stop_step - start_step
    if schedule == "cosine":
        return initial / 2 * (1 + math.cos(math.pi * (min(step, span) / span)))
    if schedule == "linear":
        return initial * (1 - max(0, step - start_step) / span)
    if schedule == "constant":
        return initial
    raise ConfigError(f"Unknown drop_schedule {schedule!r}: use one of {DROP_SCHEDULES}.")


def is_update_step(step: int, interval: int, start_step: int, stop_step: int) -> bool:
    """True at start_step, start_step + interval, ... before stop_step: the mask-update steps of the dynamic
    methods (the official ``maskupdate_begin_step`` semantics)."""
    return start_step <= step < stop_step and (step - start_step) % interval == 0


def is_pruning_step(step: int, interval: int, start_step: int, stop_step: int) -> bool:
    """True at start_step, start_step + interval, ... up to stop_step, and at stop_step itself so that the
    final sparsity is always reached: the pruning steps of gradual magnitude pruning."""
    return start_step <= step <= stop_step and ((step - start_step) % interval == 0 or step == stop_step)


def cubic_sparsity(step: int, final: float, start_step: int, stop_step: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's schedule: s_t = s_f + (s_0 - s_f)·(1 - (t - t_0)/(t_1 - t_0))³, held at s_0 before t_0 and
    at s_f after t_1 (fractions of zeros)."""
    if stop_step <= start_step:
        return final if step >= stop_step else initial
    progress = min(1.0, max(0.0, (step - start_step) / (stop_step - start_step)))
    return final + (initial - final) * (1.0 - progress) ** 3


def check_step_or_fraction(option: str, value: int | float, allow_zero: bool) -> None:
    """An optimizer step (an int, >= 0 or >= 1) or a fraction of the run (a float, in [0, 1) or (0, 1]).

    Raises:
        ValueError: anything else.
    """
    if allow_zero:
        ok = (isinstance(value, int) and value >= 0) or (isinstance(value, float) and 0 <= value < 1)
        ranges = "a fraction of the run in [0, 1) (a float) or an optimizer step >= 0 (an int)"
    else:
        ok = (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value <= 1)
        ranges = "a fraction of the run in (0, 1] (a float) or an optimizer step >= 1 (an int)"
    if isinstance(value, bool) or not ok:
        raise ConfigError(f"{option} must be {ranges}, got {value!r}.")


def resolve_step(option: str, value: int | float, total_steps: float) -> int:
    """An optimizer step from ``value``: an int is the step, a float a fraction of ``total_steps``.

    Raises:
        ValueError: a fraction is given but the run's length is unknown (no max_steps / max_epochs).
    """
    if isinstance(value, int):
        return value
    if not math.isfinite(total_steps):
        raise ConfigError(
            f"{option}={value} is a fraction of the run, but the run has no known length. Set "
            f"Trainer(max_steps=...) or max_epochs, or give {option} as an absolute step (an int)."
        )
    step = int(value * total_steps)
    return step if value == 0 else max(1, step)
