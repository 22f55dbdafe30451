"""The optimizer and learning-rate schedule the LightningModules share: SGD or AdamW with weight decay on weight
matrices only, linear warm-up then step, cosine or constant decay, per optimizer step."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lightning_rigl.errors import ConfigError
from lightning_rigl.lr_schedule import LRSchedule, lr_factor

OPTIMIZERS = ("sgd", "adamw")


def configure_optimizer(module: pl.LightningModule, net: nn.Module, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``configure_optimizers``'s answer for ``net``, the network ``module`` trains, from ``settings`` (the
    module's hyperparameters: ``optimizer``, ``lr``, ``momentum``, ``nesterov``, ``betas``, ``weight_decay``,
    ``lr_schedule``, ``warmup_steps``, ``lr_milestones``, ``lr_gamma``, checked by ``check_optimizer`` and
    ``check_lr_schedule``): the optimizer over ``decay_groups`` and a per-step ``LambdaLR`` of ``lr_factor``
    (cosine decays to 0 at the run's last step, from the trainer's estimate)."""
    groups = decay_groups(net, settings["weight_decay"])
    if settings["optimizer"] == "adamw":
        built: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=settings["lr"], betas=tuple(settings["betas"]))
    else:
        built = torch.optim.SGD(groups, lr=settings["lr"], momentum=settings["momentum"],
                                nesterov=settings["nesterov"])
    schedule: LRSchedule = settings["lr_schedule"]
    total_steps = None
    if schedule == "cosine":
        estimate = module.trainer.estimated_stepping_batches
        total_steps = int(estimate) if math.isfinite(estimate) else None
    scheduler = LambdaLR(built, lambda step: lr_factor(step, schedule, warmup_steps=settings["warmup_steps"],
                                                       milestones=settings["lr_milestones"],
                                                       gamma=settings["lr_gamma"], total_steps=total_steps))
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def decay_groups(net: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: weight decay on parameters of rank >= 2, none on normalisation parameters and
    biases."""
    decay = [p for p in net.parameters() if p.ndim >= 2]
    no_decay = [p for p in net.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_optimizer(optimizer: str, lr: float, momentum: float, nesterov: bool, betas: Sequence[float],
                    weight_decay: float) -> None:
    """Raises ``ConfigError`` for an optimizer setting out of range, saying what to change."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"Unknown optimizer {optimizer!r}: use one of {OPTIMIZERS}.")
    if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
        raise ConfigError(f"betas must be two decays in [0, 1), got {tuple(betas)}.")
    if lr <= 0:
        raise ConfigError(f"lr must be > 0, got {lr}.")
    if not 0 <= momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum}.")
    if optimizer == "sgd" and nesterov and momentum == 0:
        raise ConfigError("nesterov=True needs momentum > 0: set model.momentum or model.nesterov false.")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}.")
