"""Resuming runs: exactly, from any checkpoint (the batches, the random draws and the epoch boundaries of the
uninterrupted run); a SLURM job requeued from a checkpoint saved between two steps; checkpoints that a kill cannot
leave half-written; and logs that go on where a restarted job left them."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.utilities.cloud_io import get_filesystem
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_rigl.seeding import key_seed, seed_global_generators


class ExactResume(Callback):
    """Makes a run resumed from a checkpoint go on as the uninterrupted run went on: the same batches, the same
    random draws, the same epoch boundaries, from a checkpoint taken at the end of any step (one taken in the middle
    of an accumulated step holds no gradient: a warning says so), in the middle of an epoch or at its end, whether
    the run is counted in steps, in epochs or both. Lightning 2.6 alone misses three things:

    - **The training loader made too early.** ``trainer.estimated_stepping_batches`` (a learning-rate schedule in
      ``configure_optimizers``, a sparse callback's ``on_fit_start``) makes the training loader and its first
      iterator before the checkpoint's loop state is restored, whenever the run sets ``max_epochs``. Lightning then
      neither hands the loader its position (``TrainingLoader``) nor makes the iterator again: a run resumed in the
      middle of an epoch starts epoch 0's order from its beginning, and one resumed at an epoch's end does so too
      where loader workers draw the order when the iterator is made. A resumed run's iterator is made again at
      train start, with the position.
    - **Random draws.** Lightning checkpoints no random state. Every training batch starts with torch's CPU
      generator, the current CUDA device's, NumPy's and Python's ``random`` seeded from the run's seed, the epoch,
      the batch's index in it and the process's global rank alone (:func:`~lightning_rigl.seeding.key_seed`), so
      dropout, stochastic depth and any other draw of a training step are the uninterrupted run's after a resume,
      whatever drew between batches (validation, a new epoch's loader) and whatever a resumed process drew
      before. The seed is ``seed_everything``'s (else rank 0's ``torch.initial_seed()``) and goes into every
      checkpoint; a resumed run draws from the checkpoint's.
    - **Epoch ends.** Lightning restores a checkpoint saved in ``on_train_epoch_end`` (where ``ModelCheckpoint``
      saves) as an epoch still running when ``max_steps`` is set: the resumed run closes an epoch early, so every
      later epoch boundary and every sampler epoch is shifted. The checkpoint's last epoch is marked finished
      before Lightning reads it, and the next epoch starts as a new one (so validation is logged at the same steps
      as without the interruption). From a checkpoint saved after an epoch's last batch but before its end,
      Lightning skips that epoch's end (its validation and epoch hooks: not mended here) and would count the next
      epoch as not started, so that the checkpoints saved in it hold the wrong epoch: it is counted started.

    ``lightning-rigl`` adds it to every run; add it to your own ``Trainer`` (``callbacks=[ExactResume(), ...]``),
    with the data in training order (:class:`~lightning_rigl.data.order.TrainingLoader`, augmentation through
    :class:`~lightning_rigl.data.augment.Transformed`).
    """

    def __init__(self) -> None:
        self.seed: int | None = None  # of the training batches' draws
        self._starts_an_epoch = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit: nothing of an earlier one (or of a validate) holds; a restore comes after
            self.seed, self._starts_an_epoch = None, False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.seed is None:  # else restored already (ModelParallelStrategy restores after this hook)
            self.seed = trainer.strategy.broadcast(_run_seed())

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != "fit":
            return
        saved = checkpoint.get("callbacks", {}).get(self.state_key)
        if saved is None:
            rank_zero_warn("The checkpoint holds no seed of the training batches' random draws (saved without "
                           "ExactResume): dropout and other draws of the resumed run differ from the uninterrupted "
                           "run's.")
        elif "PL_GLOBAL_SEED" in os.environ and int(os.environ["PL_GLOBAL_SEED"]) != saved["seed"]:
            rank_zero_warn(f"The checkpoint's run was seeded with {saved['seed']}, this one with "
                           f"{os.environ['PL_GLOBAL_SEED']}: its order and augmentation differ from the uninterrupted "
                           "run's (the draws of its steps follow the checkpoint's seed). Resume with the checkpoint's "
                           "seed_everything.")
        if trainer.max_steps != -1:
            self._starts_an_epoch = _finish_saved_epoch(checkpoint)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = trainer.fit_loop
        if loop.is_resuming and loop._data_fetcher is not None:
            loop._load_combined_loader_states()  # left pending when the loader was made before the restore
            iter(loop._data_fetcher)  # the restored epoch's iterator, from its restored position
        if loop.restarted_mid_epoch and loop.epoch_progress.current.processed == loop.epoch_progress.current.started:
            # Saved after an epoch's last batch, before its end: Lightning counts that epoch as over, but would
            # start the next one without counting it started (nor calling on_train_epoch_start), so that the
            # checkpoints saved in it hold the wrong epoch.
            loop.reset_restart_stage()
        if self._starts_an_epoch:
            # Restarting, the epoch loop would take one turn without a batch (its "restarted on last" stage),
            # which shifts the steps validation is logged at by one.
            loop.epoch_loop.restarting = False
            self._starts_an_epoch = False

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        assert self.seed is not None  # set at fit start
        key = key_seed(b"lightning_rigl/b", self.seed, trainer.current_epoch, batch_idx, trainer.global_rank)
        seed_global_generators(key, cuda=True)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        batches = trainer.fit_loop.epoch_loop.batch_progress
        accumulated = batches.current.processed % trainer.accumulate_grad_batches
        if trainer.state.fn == "fit" and accumulated and not batches.is_last_batch:
            rank_zero_warn(f"A checkpoint at step {trainer.global_step} is saved in the middle of an accumulated step "
                           f"({accumulated} of {trainer.accumulate_grad_batches} micro-batches): it holds no "
                           "accumulated gradient, so a run resumed from it differs from the uninterrupted one. Save "
                           "at whole steps (val_check_interval a multiple of accumulate_grad_batches).")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]


def _run_seed() -> int:
    """``seed_everything``'s seed where it was called, else the seed this process's torch generator started from."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else torch.initial_seed()


def _finish_saved_epoch(checkpoint: dict[str, Any]) -> bool:
    """Marks the last epoch of a step-counted run's checkpoint saved at that epoch's end as finished (the batch
    counts of the epoch reset, the run's kept); whether it did. Other checkpoints are left as they are."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = fit_loop.get("epoch_progress"), fit_loop.get("epoch_loop.batch_progress")
    if epochs is None or batches is None:
        return False
    saved_at_epoch_end = all(
        counts["ready"] == counts["started"] == counts["processed"] == counts["completed"] + 1
        for counts in (epochs["total"], epochs["current"])
    )
    if not (saved_at_epoch_end and batches["is_last_batch"]):
        return False
    for counts in (epochs["total"], epochs["current"]):
        counts["started"] = counts["processed"] = counts["completed"] = counts["ready"]
    batches["current"] = dict.fromkeys(batches["current"], 0)
    batches["is_last_batch"] = False
    return True


class RequeueAtStepEnd(Callback):
    """Under SLURM with auto-requeue (Lightning's default there), saves the requeue checkpoint at the end of an
    optimizer step instead of in the signal handler, and then requeues the job.

    Lightning's own handler saves the checkpoint inside the handler, at whatever point of the step the signal
    lands: between two layers of a mask update, or halfway through the optimizer's writes, so that masks,
    densities and weights in the checkpoint need not fit together. This callback takes the requeue signal
    (``SIGUSR1``, or the one ``SLURMEnvironment(requeue_signal=...)`` names) before Lightning registers its own:
    the handler only notes it. At the end of the step (of the next one, when the step ends an epoch) every process
    agrees that a signal came, the loggers write what they hold, the checkpoint goes to ``hpc_ckpt_<N>.ckpt`` in
    ``trainer.default_root_dir`` (where Lightning looks when the job starts again under SLURM) and rank 0 runs
    ``scontrol requeue`` for the job.
    Training goes on until SLURM stops the job, as with Lightning's handler. Outside SLURM it does nothing.

    ``lightning-rigl`` adds it to every run; add it to your own ``Trainer`` if you requeue on SLURM.
    """

    def __init__(self) -> None:
        self._signal: signal.Signals | None = None
        self._previous_handler: Any = None
        self._received = False
        self._last_step = -1

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registers its signal handlers after on_fit_start, and none where one is set already.
        environment = trainer._accelerator_connector.cluster_environment
        if not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        self._signal = environment.requeue_signal or signal.SIGUSR1
        self._previous_handler = signal.signal(self._signal, self._note)
        self._last_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Only where an optimizer step just ended (a checkpoint holds no half-accumulated gradient), and not after
        # an epoch's last batch: a run resumed from there would skip that epoch's end (validation, epoch hooks).
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if self._signal is None or not stepped or last_batch or not trainer.strategy.reduce_boolean_decision(
                self._received, all=False):
            return
        self._received = False
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        if trainer.is_global_zero:
            _requeue_slurm_job()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._signal is not None:
            signal.signal(self._signal, self._previous_handler)
            self._signal = None

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._received = True


def run_test_on_final_weights(trainer: pl.Trainer, model: pl.LightningModule,
                              datamodule: pl.LightningDataModule | None) -> list[dict[str, float]]:
    """``trainer.test`` of the weights ``model`` holds now (after ``fit``: the final ones), as
    ``trainer.test(model)`` gives them outside SLURM. Under SLURM Lightning instead loads the newest requeue
    checkpoint it finds in ``default_root_dir`` (``hpc_ckpt_<N>.ckpt``) whenever ``ckpt_path`` is None, so a job
    that was requeued would be tested, and its results recorded, with the weights of the step it was last warned
    at."""
    connector = trainer._checkpoint_connector
    connector._ckpt_path, connector._user_managed = None, True  # "user managed": Lightning loads its _ckpt_path
    try:
        return trainer.test(model, datamodule=datamodule, verbose=False)
    finally:
        connector._user_managed = False


def slurm_job(environ: Mapping[str, str]) -> str | None:
    """The SLURM job (``<array job>_<task>`` for an array task) of this process's environment; None outside a
    batch job (no ``SLURM_NTASKS``, or an interactive one, as Lightning tells them apart)."""
    if "SLURM_NTASKS" not in environ or environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array_job = environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array_job}_{environ.get('SLURM_ARRAY_TASK_ID')}" if array_job else environ.get("SLURM_JOB_ID")


def _requeue_slurm_job() -> None:
    """``scontrol requeue`` this SLURM job (or array task); a failure is a warning, as in Lightning."""
    job = slurm_job(os.environ)
    result = subprocess.call(["scontrol", "requeue", str(job)])
    if result == 0:
        rank_zero_info(f"Requeued SLURM job {job}; it resumes from its checkpoint when it starts again.")
    else:
        rank_zero_warn(f"`scontrol requeue {job}` failed with status {result}: the job will not start again.")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it and renames it into place once complete, so that a
    process killed while saving leaves the previous checkpoint, never a truncated one that a restart would pick
    up (``hpc_ckpt_<N>.ckpt`` after a SLURM requeue, ``last.ckpt`` for ``--ckpt_path last``). The temporary
    name (``.partial-<hash>``) matches neither.

    Lightning's own writer goes through a temporary file in the system's temporary folder; the move from there
    is a rename only on the same file system, and a copy (which a kill can cut short) across file systems, as
    from a node's local /tmp to a shared checkpoint folder. Remote paths (``s3://`` ...) are left to Lightning's.
    ``lightning-rigl`` uses it for every run: ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".partial-{hashlib.sha1(target.name.encode()).hexdigest()[:12]}")
        with partial.open("wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, target)


class ContinuingCSVLogger(CSVLogger):
    """A ``CSVLogger`` that goes on with the ``metrics.csv`` it finds in its folder (a job started again after a
    requeue or a torchrun restart) instead of deleting it, as Lightning's does. Rows logged by the interrupted
    start after its last checkpoint are logged again, with the same values, by the resumed one; the report reads
    the last value of each step. ``lightning-rigl`` uses it in place of ``CSVLogger`` for such jobs."""

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


class _ContinuingWriter(ExperimentWriter):
    @override
    def _check_log_dir_exists(self) -> None:
        # Lightning's deletes metrics.csv here; its columns are read instead, and rows are appended to it.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


def join_torchrun_attempt(trainer: pl.Trainer) -> None:
    """Under torchrun (which serves the workers a store), creates the default process group on a part of that
    store reserved for this attempt (``TORCHELASTIC_RESTART_COUNT``), with the backend the trainer's strategy
    would use; Lightning then finds it made. Call it before ``trainer.fit``; it does nothing elsewhere.

    torchrun keeps one store across ``--max-restarts``: a restarted worker that asks for a peer's address before
    the peer has written its new one reads the previous attempt's, and fails to connect (about two restarts in
    three here when one worker starts a few seconds after the other, as Lightning's imports make it).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized() or trainer.world_size < 2:
        return
    backend = getattr(trainer.strategy, "_get_process_group_backend", None)
    if backend is None:
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), trainer.world_size,
                          is_master=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend(), store=dist.PrefixStore(f"lightning_rigl/attempt_{attempt}/", store),
                            rank=trainer.global_rank, world_size=trainer.world_size)
