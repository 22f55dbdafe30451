"""A callback the resume tests add to the command's run through a config file (so it must be importable by class
path: tests/ is on sys.path under pytest, and on PYTHONPATH for torchrun): each process records digests of its
batches, masks and parameters (whole, under FSDP2) after every step and writes them, with its final masks and
parameters, to ``folder/rank<global rank>.pt``; optionally it stops the run after a given step, as a crash after
that epoch's checkpoint would leave it."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml

from lightning_rigl.callbacks.sparse_training import SparseTraining
from lightning_rigl.sparsity.sharding import gather, is_sharded


class RecordMasksPerProcess(pl.Callback):
    """Writes ``{"batch_digests", "mask_digests" and "param_digests": [(step, sha256)], "masks", "params",
    "updates", "global_step", "checkpoint_io"}`` per process.

    Args:
        folder: where ``rank<N>.pt`` goes.
        stop_after_step: ask the trainer to stop after this optimizer step (None: run to the end).
        signal_at_step: send this process SIGUSR1 (SLURM's warning before the time limit) as the batch of this
            optimizer step starts.
        kill_at_step: kill this process with SIGKILL as the batch of this step starts (the time limit, a lost
            node), on the first start only (not in a job torchrun restarted).
        kill_rank: the global rank that kills itself (None: every process).
    """

    def __init__(self, folder: str, stop_after_step: int | None = None, signal_at_step: int | None = None,
                 kill_at_step: int | None = None, kill_rank: int | None = None) -> None:
        self.folder, self.stop_after_step = Path(folder), stop_after_step
        self.signal_at_step, self.kill_at_step, self.kill_rank = signal_at_step, kill_at_step, kill_rank
        self.digests: list[tuple[int, str]] = []
        self.param_digests: list[tuple[int, str]] = []
        self.batch_digests: list[tuple[int, str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.signal_at_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        first_start = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if (trainer.global_step == self.kill_at_step and first_start
                and self.kill_rank in (None, trainer.global_rank)):
            os.kill(os.getpid(), signal.SIGKILL)

    def _sparse(self, trainer: pl.Trainer) -> SparseTraining:
        (sparse,) = [c for c in trainer.callbacks if isinstance(c, SparseTraining)]
        return sparse

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        masks = hashlib.sha256()
        for name, mask in sorted(self._sparse(trainer).masks.items()):
            masks.update(name.encode() + gather(mask).cpu().numpy().tobytes())
        params = hashlib.sha256()
        for name, param in pl_module.named_parameters():
            params.update(name.encode() + gather(param.detach()).cpu().numpy().tobytes())
        self.digests.append((trainer.global_step, masks.hexdigest()))
        self.param_digests.append((trainer.global_step, params.hexdigest()))
        self.batch_digests.append((trainer.global_step, hashlib.sha256(b"".join(
            tensor.cpu().numpy().tobytes() for tensor in batch)).hexdigest()))
        if self.stop_after_step is not None and trainer.global_step >= self.stop_after_step:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        sparse = self._sparse(trainer)
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({"mask_digests": self.digests, "param_digests": self.param_digests,
                    "batch_digests": self.batch_digests,
                    "masks": {name: gather(mask).cpu() for name, mask in sparse.masks.items()},
                    "params": {name: gather(p.detach()).cpu().clone() for name, p in pl_module.named_parameters()},
                    "sharded": any(is_sharded(mask) for mask in sparse.masks.values()),
                    "updates": sparse.num_updates, "global_step": trainer.global_step,
                    "checkpoint_io": type(trainer.strategy.checkpoint_io).__name__},
                   self.folder / f"rank{trainer.global_rank}.pt")


def probe_config(folder: Path, records: Path, callbacks: list[dict], stop_after_step: int | None = None,
                 **probe_options: int | None) -> Path:
    """A config that puts the probe (with ``probe_options``) in front of ``callbacks`` (the sparse callback stays
    last)."""
    probe = {"class_path": f"{__name__}.RecordMasksPerProcess",
             "init_args": {"folder": str(records), "stop_after_step": stop_after_step, **probe_options}}
    path = folder / "probe.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [probe, *callbacks]}}))
    return path


def load_records(records: Path, world_size: int = 1) -> list[dict]:
    """What each process wrote, by rank."""
    return [torch.load(records / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]
