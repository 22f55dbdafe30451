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
    This callback marks the checkpoint's last epoch as finished before Lightning reads its loop state; other
    checkpoints are left as they are (Lightning restarts a mid-epoch one's epoch from its first batch, with a
    warning).

    ``lightning-rigl`` adds it to every run; add it to your own ``Trainer`` if you resume step-counted runs.
    """

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.max_steps == -1:
            return
        fit_loop = checkpoint.get("loops", {}).get("fit_loop")
        if fit_loop is None:
            return
        epochs, batches = fit_loop["epoch_progress"], fit_loop["epoch_loop.batch_progress"]
        current = epochs["current"]
        saved_at_epoch_end = current["ready"] == current["started"] == current["processed"] == current["completed"] + 1
        if not (saved_at_epoch_end and batches["is_last_batch"]):
            return
        for counts in (epochs["total"], epochs["current"]):
            counts["started"] = counts["processed"] = counts["completed"] = counts["ready"]
        batches["current"] = dict.fromkeys(batches["current"], 0)
        batches["is_last_batch"] = False
