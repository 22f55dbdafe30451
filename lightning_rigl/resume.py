"""Resuming a run whose length is counted in steps from a checkpoint saved at the end of an epoch."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


class ResumeBetweenEpochs(Callback):
    """Makes a step-counted run (``trainer.max_steps`` set, as in every recipe) resume from an end-of-epoch
    checkpoint at the start of the next epoch, as the uninterrupted run went on.

    Lightning (2.6) restores a checkpoint saved in ``on_train_epoch_end`` (where ``ModelCheckpoint`` saves) as
    an epoch still running when the run is counted in steps: the resumed run closes an epoch early (calling
    ``on_train_epoch_end`` again), so every later epoch boundary and every sampler epoch is shifted from the
    uninterrupted run, which sees other batches. Runs counted in epochs resume correctly and are left alone.
    This callback marks the checkpoint's last epoch as finished before Lightning reads its loop state, and
    lets the next epoch start as a new one (so validation is logged at the same steps as without the
    interruption). Other checkpoints are left as they are. Of those, a mid-epoch checkpoint resumes with the
    epoch's remaining number of batches, which Lightning draws from the start of the epoch's order (with a
    warning).

    ``lightning-rigl`` adds it to every run; add it to your own ``Trainer`` if you resume step-counted runs.
    """

    def __init__(self) -> None:
        self._starts_an_epoch = False

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        epochs, batches = fit_loop.get("epoch_progress"), fit_loop.get("epoch_loop.batch_progress")
        if trainer.max_steps == -1 or epochs is None or batches is None:
            return
        saved_at_epoch_end = all(
            counts["ready"] == counts["started"] == counts["processed"] == counts["completed"] + 1
            for counts in (epochs["total"], epochs["current"])
        )
        if not (saved_at_epoch_end and batches["is_last_batch"]):
            return
        for counts in (epochs["total"], epochs["current"]):
            counts["started"] = counts["processed"] = counts["completed"] = counts["ready"]
        batches["current"] = dict.fromkeys(batches["current"], 0)
        batches["is_last_batch"] = False
        self._starts_an_epoch = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._starts_an_epoch:
            # Restarting, the epoch loop would take one turn without a batch (its "restarted on last" stage),
            # which shifts the steps validation is logged at by one.
            trainer.fit_loop.epoch_loop.restarting = False
            self._starts_an_epoch = False
