"""Learning-rate multipliers per optimizer step: linear warm-up, then step decay, cosine decay or constant."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

from lightning_rigl.errors import ConfigError

LRSchedule = Literal["step", "cosine", "constant"]
LR_SCHEDULES = get_args(LRSchedule)


def lr_factor(
    step: int,
    schedule: LRSchedule,
    *,
    warmup_steps: int = 0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    total_steps: int | None = None,
) -> float:
    """The factor that multiplies the base learning rate at optimizer ``step`` (0-based).

    Warm-up rises linearly from 1/warmup_steps to 1 over the first ``warmup_steps`` steps (Goyal et al., 2017).
    "step" multiplies by ``gamma`` at each of ``milestones`` (steps); "cosine" decays from 1 at the end of the
    warm-up to 0 at ``total_steps``; "constant" keeps 1.
    """
    warmup = (step + 1) / warmup_steps if step < warmup_steps else 1.0
    if schedule == "step":
        return warmup * gamma ** sum(step >= milestone for milestone in milestones)
    if schedule == "cosine":
        if total_steps is None:
            raise ConfigError(
                "The cosine learning-rate schedule needs the run's length: set trainer.max_steps or max_epochs."
            )
        progress = min(1.0, max(0, step - warmup_steps) / max(1, total_steps - warmup_steps))
        return warmup * 0.5 * (1 + math.cos(math.pi * progress))
    return warmup


def check_lr_schedule(schedule: str, warmup_steps: int, milestones: Sequence[int], gamma: float) -> None:
    """Raises ConfigError for a schedule that would silently do something other than what was asked."""
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"Unknown lr_schedule {schedule!r}: use one of {LR_SCHEDULES}.")
    if warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0 (optimizer steps), got {warmup_steps}.")
    if list(milestones) != sorted(milestones) or any(m < 1 for m in milestones):
        raise ConfigError(f"lr_milestones must be increasing optimizer steps >= 1, got {list(milestones)}.")
    if milestones and schedule != "step":
        raise ConfigError(f"lr_milestones {list(milestones)} only apply to lr_schedule='step', not {schedule!r}.")
    if not 0 < gamma <= 1:
        raise ConfigError(f"lr_gamma must be in (0, 1], got {gamma}.")
