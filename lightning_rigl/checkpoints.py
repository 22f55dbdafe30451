"""Reading Lightning checkpoints in both forms: one file, or the folder of shards ``ModelParallelStrategy`` writes
(``torch.distributed.checkpoint`` shards of the model and optimizer, and ``meta.pt`` with everything else,
the callbacks' states included)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

SHARDED_METADATA = "meta.pt"


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a folder of shards written by ``ModelParallelStrategy``."""
    return path.is_dir() and (path / SHARDED_METADATA).is_file()


def read_checkpoint(path: Path, *, weights: bool = True) -> Any:
    """The checkpoint's dictionary, on the CPU (``weights_only`` loading). From a folder of shards: ``meta.pt``,
    with the model's ``state_dict`` assembled whole from the shards when ``weights`` (in one process, no process
    group; the optimizer's shards are left out). torch's errors propagate for files it cannot read."""
    if not is_sharded_checkpoint(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    state = torch.load(path / SHARDED_METADATA, map_location="cpu", weights_only=True)
    if weights and isinstance(state, dict):
        with tempfile.TemporaryDirectory() as folder:
            whole = Path(folder) / "whole.pt"
            dcp_to_torch_save(path, whole)
            state["state_dict"] = torch.load(whole, map_location="cpu", weights_only=True)["state_dict"]
    return state
