"""A callback the resume tests add to the command's run through a config file (so it must be importable by class
path: tests/ is on sys.path under pytest, and on PYTHONPATH for torchrun): each process records digests of its
masks and parameters after every step and writes them, with its final masks and parameters, to
``folder/rank<global rank>.pt``; optionally it stops the run after a given step, as a crash after that epoch's
checkpoint would leave it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml

from lightning_rigl.callbacks.sparse_training import SparseTraining


class RecordMasksPerProcess(pl.Callback):
    """Writes ``{"mask_digests" and "param_digests": [(step, sha256)], "masks", "params", "updates",
    "global_step"}`` per process.

    Args:
        folder: where ``rank<N>.pt`` goes.
        stop_after_step: ask the trainer to stop after this optimizer step (None: run to the end).
    """

    def __init__(self, folder: str, stop_after_step: int | None = None) -> None:
        self.folder, self.stop_after_step = Path(folder), stop_after_step
        self.digests: list[tuple[int, str]] = []
        self.param_digests: list[tuple[int, str]] = []

    def _sparse(self, trainer: pl.Trainer) -> SparseTraining:
        (sparse,) = [c for c in trainer.callbacks if isinstance(c, SparseTraining)]
        return sparse

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        masks = hashlib.sha256()
        for name, mask in sorted(self._sparse(trainer).masks.items()):
            masks.update(name.encode() + mask.cpu().numpy().tobytes())
        params = hashlib.sha256()
        for name, param in pl_module.named_parameters():
            params.update(name.encode() + param.detach().cpu().numpy().tobytes())
        self.digests.append((trainer.global_step, masks.hexdigest()))
        self.param_digests.append((trainer.global_step, params.hexdigest()))
        if self.stop_after_step is not None and trainer.global_step >= self.stop_after_step:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        sparse = self._sparse(trainer)
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({"mask_digests": self.digests, "param_digests": self.param_digests,
                    "masks": {name: mask.cpu() for name, mask in sparse.masks.items()},
                    "params": {name: p.detach().cpu().clone() for name, p in pl_module.named_parameters()},
                    "updates": sparse.num_updates, "global_step": trainer.global_step},
                   self.folder / f"rank{trainer.global_rank}.pt")


def probe_config(folder: Path, records: Path, callbacks: list[dict], stop_after_step: int | None = None) -> Path:
    """A config that puts the probe in front of ``callbacks`` (the sparse callback stays last)."""
    probe = {"class_path": f"{__name__}.RecordMasksPerProcess",
             "init_args": {"folder": str(records), "stop_after_step": stop_after_step}}
    path = folder / "probe.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [probe, *callbacks]}}))
    return path


def load_records(records: Path, world_size: int = 1) -> list[dict]:
    """What each process wrote, by rank."""
    return [torch.load(records / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]
