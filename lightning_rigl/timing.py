"""The wall time of a run's optimizer steps: the step time in the command's summary, ``step_ms`` and
``tokens_per_second`` in ``results.json``, for dense and sparse runs alike."""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from typing_extensions import override


class BatchTimer(Callback):
    """Times each optimizer step of a fit, from the start of its first training batch (``on_train_batch_start``)
    to the end of its last (``on_train_batch_end``): under gradient accumulation every batch of the step, and the
    loading of all but the first; the forwards, the backwards, the masks' work and the optimizer step; not
    validation or checkpoints. CUDA work is waited for at both ends. The command adds one to every run."""

    def __init__(self) -> None:
        self.step_ms: list[float] = []  # wall time of each optimizer step of this fit (ms)
        self._started: float | None = None
        self._step: int | None = None  # the optimizer step the timed batches belong to

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step_ms, self._started = [], None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._started is None:
            _wait_for(pl_module)
            self._started, self._step = time.perf_counter(), trainer.global_step

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._started is not None and trainer.global_step != self._step:  # this batch ended with a step
            _wait_for(pl_module)
            self.step_ms.append(1e3 * (time.perf_counter() - self._started))
            self._started = None

    def median_ms(self) -> float | None:
        """Median wall time of this fit's optimizer steps (ms; None before any): a mask update, a validation
        or a slow first step does not move it."""
        return statistics.median(self.step_ms) if self.step_ms else None


def batch_timer(trainer: pl.Trainer) -> BatchTimer | None:
    """The trainer's timer; None when it has none (a Trainer built outside the command)."""
    return next((callback for callback in trainer.callbacks if isinstance(callback, BatchTimer)), None)


def _wait_for(pl_module: pl.LightningModule) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)
