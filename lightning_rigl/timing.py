"""The wall time of a run's training batches: the batch time in the command's summary, ``step_ms`` and
``tokens_per_second`` in ``results.json``, for dense and sparse runs alike."""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from typing_extensions import override


class BatchTimer(Callback):
    """Times each training batch of a fit, from ``on_train_batch_start`` to ``on_train_batch_end``: the forward,
    the backward, the masks' work and the optimizer step; not the data loading, validation or checkpoints. The
    command adds one to every run."""

    def __init__(self) -> None:
        self.batch_ms: list[float] = []  # wall time of each training batch of this fit (ms)
        self._started: float | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.batch_ms = []

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._started = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._started is not None:
            self.batch_ms.append(1e3 * (time.perf_counter() - self._started))
            self._started = None

    def median_ms(self) -> float | None:
        """Median wall time of this fit's training batches (ms; None before any): a mask update, a validation
        or a slow first batch does not move it."""
        return statistics.median(self.batch_ms) if self.batch_ms else None


def batch_timer(trainer: pl.Trainer) -> BatchTimer | None:
    """The trainer's batch timer; None when it has none (a Trainer built outside the command)."""
    return next((callback for callback in trainer.callbacks if isinstance(callback, BatchTimer)), None)
