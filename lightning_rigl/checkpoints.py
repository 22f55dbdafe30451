"""Reading Lightning checkpoints in both forms: one file, or the folder of shards ``ModelParallelStrategy`` writes
(``torch.distributed.checkpoint`` shards of the model and optimizer, and ``meta.pt`` with everything else,
the callbacks' states included).

In a folder of shards a callback may keep its sharded tensors (masks, say) with the model's, as shards: its state
in ``meta.pt`` then lists them under ``SHARDED_TENSORS`` (kind → names), and each is stored in the model's state
dict under ``sharded_key(state_key, kind, name)``. ``read_checkpoint`` puts them back into the callback's state,
whole; a running process reads its own rows with ``load_sharded_tensors``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

SHARDED_METADATA = "meta.pt"
SHARDED_TENSORS = "sharded_tensors"
_MODEL = "state_dict."  # how torch.distributed.checkpoint names the entries of Lightning's "state_dict"


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a folder of shards written by ``ModelParallelStrategy``."""
    return path.is_dir() and (path / SHARDED_METADATA).is_file()


def sharded_key(state_key: str, kind: str, name: str) -> str:
    """The model-state-dict key under which a callback's sharded tensor is stored in a folder of shards."""
    return f"{state_key}.{kind}.{name}"


def read_checkpoint(path: Path, *, weights: bool = True) -> Any:
    """The checkpoint's dictionary, on the CPU (``weights_only`` loading). From a folder of shards: ``meta.pt``,
    with every callback's sharded tensors whole in its state and, when ``weights``, the model's ``state_dict``
    assembled whole from the shards (in one process, no process group; the optimizer's shards are not read).
    torch's errors propagate for files it cannot read."""
    if not is_sharded_checkpoint(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    checkpoint = torch.load(path / SHARDED_METADATA, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        return checkpoint
    owners = {}  # stored key → (callback state, kind, name)
    for state_key, state in checkpoint.get("callbacks", {}).items():
        if isinstance(state, dict):
            for kind, names in state.pop(SHARDED_TENSORS, {}).items():
                owners.update({_MODEL + sharded_key(state_key, kind, name): (state, kind, name) for name in names})
    reader = FileSystemReader(path)
    stored = reader.read_metadata().state_dict_metadata
    wanted = [key for key in stored if key in owners or (weights and key.startswith(_MODEL))]
    tensors = {key: torch.empty(stored[key].size, dtype=stored[key].properties.dtype)
               if isinstance(stored[key], TensorStorageMetadata) else None for key in wanted}
    if tensors:
        with warnings.catch_warnings():  # that it loads in one process is the intent here
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(tensors, storage_reader=reader, no_dist=True)
    for key, (state, kind, name) in owners.items():
        state.setdefault(kind, {})[name] = tensors.pop(key)
    if weights:
        checkpoint["state_dict"] = {key.removeprefix(_MODEL): value for key, value in tensors.items()}
    return checkpoint


def load_sharded_tensors(path: Path, state_key: str, like: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """A callback's sharded tensors from a folder of shards, each process reading its own rows (a collective:
    every process calls it with the same names): ``like`` maps kind → name → a tensor laid out as the stored one
    is to be (its parameter); the result holds the stored tensors, with the stored dtypes, laid out so."""
    stored = FileSystemReader(path).read_metadata().state_dict_metadata
    loaded = {kind: {name: torch.empty_like(layout, dtype=stored[_MODEL + sharded_key(state_key, kind, name)]
                                             .properties.dtype)
                     for name, layout in tensors.items()} for kind, tensors in like.items()}
    targets = {sharded_key(state_key, kind, name): tensor for kind, tensors in loaded.items()
               for name, tensor in tensors.items()}
    dcp.load({"state_dict": targets}, checkpoint_id=path)
    return loaded
