"""The compact file of a sparse model, in the safetensors format: no pickle, loading memory-mapped, readable by
every tool that reads safetensors.

Each tensor of the model's state_dict is stored under its own name, except the sparse layers:

- ``NAME:mask`` (uint8: one bit per position, row-major, the first in the highest bit) and ``NAME:values`` (the
  live values in row-major order): 1 bit per weight and the live values, the official size accounting;
- a layer with a constant fan-in (SRigL), condensed: ``NAME:neurons`` (one bit per neuron, set for a neuron
  with live weights), ``NAME:indices`` (active neurons × k, the columns of each neuron's live weights in
  increasing order, int16 where the fan-in allows, else int32) and ``NAME:values`` (active neurons × k), which
  load straight into a condensed kernel. Its indices cost 16 bits per live weight instead of one bit per
  position: smaller than a bitmask above 15/16 sparsity, larger below (``condensed=False`` stores a bitmask).

The safetensors metadata (strings) holds the format's name and version, the model's class, each stored
tensor's original dtype and shape and its layout, the caller's ``metadata`` (JSON), and a CRC-32 of every
tensor's bytes: safetensors checks its header and lengths, the checksum the values, so a truncated or
corrupted file is refused before anything is loaded.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_rigl.errors import ConfigError
from lightning_rigl.sparsity.structure import ConstantFanIn, rows_and_fan_in
from lightning_rigl.sparsity.targets import sparsifiable_parameters

FORMAT = "lightning-rigl-sparse"
FORMAT_VERSION = 2
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}
BITMASK, CONDENSED, DENSE = "bitmask", "condensed", "dense"


class SparseFileError(ValueError):
    """A file that cannot be loaded: not a sparse file, a newer format, truncated, corrupted, or another model's."""


def save_sparse(model: nn.Module, path: str | Path, masks: Mapping[str, Tensor] | None = None,
                dtype: torch.dtype | None = None, metadata: Mapping[str, Any] | None = None,
                condensed: bool = True) -> Path:
    """Writes ``model``'s state_dict to ``path`` in the compact safetensors format; returns the path.

    Args:
        model: the model; every tensor of its ``state_dict`` (parameters and buffers) is saved.
        masks: parameter name -> bool tensor of its shape (True: live), the sparse layers, e.g.
            ``callback.masks``. Default: every convolution and linear weight that holds a zero, masked by its
            non-zero positions.
        dtype: a floating dtype (e.g. ``torch.float16``) in which to store every floating tensor; loading
            casts back to each tensor's own dtype. Default: each tensor's own dtype (an exact round trip).
        metadata: JSON-serialisable facts to keep in the file (the command stores the model's registry name
            and arguments); ``read_metadata`` returns them.
        condensed: store the sparse layers that have a constant fan-in condensed (values and indices), else as
            every other sparse layer (bitmask and values).

    Raises:
        ValueError: a mask names no tensor of the model, has another shape, or leaves a non-zero weight outside
            it (saving would change the model); ``dtype`` is not floating.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype such as torch.float16, got {dtype}.")
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    if masks is None:
        masks = nonzero_masks(model)
    masks = {name: mask.detach().cpu().bool() for name, mask in masks.items()}
    _check_masks(state, masks)
    tensors: dict[str, Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for name, tensor in state.items():
        stored = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        entry = {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype), "layout": DENSE}
        mask = masks.get(name)
        if mask is None:
            tensors[name] = tensor.to(stored)
        elif condensed and tensor.dim() >= 2 and not bool(mask.all()) and ConstantFanIn().violation(mask) is None:
            entry["layout"] = CONDENSED
            rows = mask.reshape(rows_and_fan_in(mask.shape))
            active = rows.any(1)
            columns = rows[active].nonzero()[:, 1].view(int(active.sum()), -1)
            index_dtype = torch.int16 if rows.shape[1] <= torch.iinfo(torch.int16).max + 1 else torch.int32
            tensors[f"{name}:neurons"] = _pack_bits(active)
            tensors[f"{name}:indices"] = columns.to(index_dtype)
            tensors[f"{name}:values"] = tensor.reshape(rows.shape)[active].gather(1, columns).to(stored)
        else:
            entry["layout"] = BITMASK
            tensors[f"{name}:mask"] = _pack_bits(mask)
            tensors[f"{name}:values"] = tensor[mask].to(stored)
        layout[name] = entry
    tensors = {key: value.contiguous().clone() for key, value in tensors.items()}  # no shared storage
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "model": type(model).__name__,
              "layout": json.dumps(layout, separators=(",", ":")),
              "metadata": json.dumps(dict(metadata or {}), separators=(",", ":")),
              "crc32": str(_checksum(tensors))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=header)
    return path


def load_sparse(path: str | Path, model: nn.Module | None = None) -> dict[str, Tensor] | nn.Module:
    """The tensors of a file written by ``save_sparse``: as a state_dict (dead positions 0, each tensor in its own
    dtype), or loaded into ``model``, which is returned.

    Raises:
        SparseFileError: not a lightning-rigl sparse file, a newer format, a truncated or corrupted file, or (with
            ``model``) tensors whose names or shapes differ from the model's; nothing is loaded then.
    """
    header, tensors = _read(Path(path))
    if model is not None:
        _check_fits(header, model, path)
    state = {}
    for name, entry in header["layout"].items():
        shape, dtype = torch.Size(entry["shape"]), _DTYPES[entry["dtype"]]
        if entry["layout"] == DENSE:
            state[name] = tensors[name].to(dtype)
            continue
        tensor = torch.zeros(shape, dtype=dtype)
        if entry["layout"] == BITMASK:
            tensor[_unpack_bits(tensors[f"{name}:mask"], shape)] = tensors[f"{name}:values"].to(dtype)
        else:
            rows = tensor.view(rows_and_fan_in(shape))
            active = _unpack_bits(tensors[f"{name}:neurons"], torch.Size([shape[0]]))
            block = torch.zeros(int(active.sum()), rows.shape[1], dtype=dtype)
            block.scatter_(1, tensors[f"{name}:indices"].long(), tensors[f"{name}:values"].to(dtype))
            rows[active] = block
        state[name] = tensor
    if model is None:
        return state
    model.load_state_dict(state, strict=True)
    return model


def read_masks(path: str | Path) -> dict[str, Tensor]:
    """The masks of the sparse layers stored in a file written by ``save_sparse`` (name -> bool tensor)."""
    header, tensors = _read(Path(path))
    masks = {}
    for name, entry in header["layout"].items():
        shape = torch.Size(entry["shape"])
        if entry["layout"] == BITMASK:
            masks[name] = _unpack_bits(tensors[f"{name}:mask"], shape)
        elif entry["layout"] == CONDENSED:
            mask = torch.zeros(rows_and_fan_in(shape), dtype=torch.bool)
            active = _unpack_bits(tensors[f"{name}:neurons"], torch.Size([shape[0]]))
            mask[active] = torch.zeros(int(active.sum()), mask.shape[1], dtype=torch.bool).scatter_(
                1, tensors[f"{name}:indices"].long(), True)
            masks[name] = mask.view(shape)
    return masks


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata`` stored by ``save_sparse``."""
    return _read(Path(path))[0]["metadata"]


def nonzero_masks(model: nn.Module) -> dict[str, Tensor]:
    """Every convolution and linear weight that holds a zero, masked by its non-zero positions."""
    try:
        weights = sparsifiable_parameters(model)
    except ConfigError:  # no convolution or linear weight at all
        return {}
    return {name: weight.detach().cpu() != 0 for name, weight in weights.items() if bool((weight == 0).any())}


def _check_masks(state: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    for name, mask in masks.items():
        if name not in state:
            raise ValueError(f"masks name {name!r}, which the model's state_dict lacks.")
        tensor = state[name]
        if mask.shape != tensor.shape:
            raise ValueError(f"the mask of {name!r} has shape {tuple(mask.shape)}, the tensor {tuple(tensor.shape)}.")
        if bool(tensor[~mask].ne(0).any()):
            raise ValueError(f"{name!r} has non-zero weights outside its mask: saving would change the model. Pass "
                             "the masks the model was trained with, or masks=None to keep every non-zero weight.")


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The file's header (layout and metadata parsed) and its tensors, checked: safetensors checks the header and
    the lengths, the CRC-32 the values."""
    if not path.is_file():
        raise SparseFileError(f"no sparse model file at {path}.")
    try:
        with safe_open(path, framework="pt") as file:
            header = file.metadata() or {}
            if header.get("format") != FORMAT:
                raise SparseFileError(f"{path} is not a lightning-rigl sparse model file (written by save_sparse or "
                                      "`lightning-rigl export`).")
            version = int(header["format_version"])
            if version > FORMAT_VERSION:
                raise SparseFileError(f"{path} has format {version}, written by a newer lightning-rigl; this "
                                      f"version reads format {FORMAT_VERSION}. Upgrade lightning-rigl.")
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (no iterator)
    except SafetensorError as error:
        raise SparseFileError(f"{path} is not a safetensors file, or is truncated or corrupted ({error}).") from None
    if _checksum(tensors) != int(header["crc32"]):
        raise SparseFileError(f"{path} is corrupted: its tensors do not match the checksum in its header.")
    return {**header, "layout": json.loads(header["layout"]), "metadata": json.loads(header["metadata"])}, tensors


def _check_fits(header: Mapping[str, Any], model: nn.Module, path: str | Path) -> None:
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    stored = {name: tuple(entry["shape"]) for name, entry in header["layout"].items()}
    problems = [f"missing {name}" for name in expected if name not in stored]
    problems += [f"unexpected {name}" for name in stored if name not in expected]
    problems += [f"{name}: {stored[name]} in the file, {shape} in the model" for name, shape in expected.items()
                 if name in stored and stored[name] != shape]
    if problems:
        raise SparseFileError(f"{path} holds another model than the {type(model).__name__} given (it was saved from a "
                              f"{header['model']}): {'; '.join(problems[:5])}" + (" ..." if len(problems) > 5 else "")
                              + ". Load it into the model it was saved from.")


def _pack_bits(mask: Tensor) -> Tensor:
    """One bit per position, row-major, the first position in the highest bit of the first byte (uint8)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
    return (flat * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:math.prod(shape)].bool().reshape(shape)


def _checksum(tensors: Mapping[str, Tensor]) -> int:
    """CRC-32 of every tensor's bytes, in name order."""
    crc = 0
    for key in sorted(tensors):
        crc = zlib.crc32(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"tensors of dtype {dtype} cannot be saved in the sparse format.")
    return name
