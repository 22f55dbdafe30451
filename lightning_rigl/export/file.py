"""The compact file of a sparse model: a bitmask and the live values of every sparse layer, every other tensor
as it is.

Layout: 8 magic bytes, the format version (uint32, little-endian), the header's length (uint64), the header
(zlib-compressed UTF-8 JSON: each tensor's name, shape, dtypes, place in the payload and, for sparse layers, live
count; compressed because the names repeat, so that the header stays small beside a small model's tensors),
then the payload. The header also holds the payload's length and CRC-32, so a truncated or corrupted file is
refused before anything is loaded.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rigl.errors import ConfigError
from lightning_rigl.sparsity.targets import sparsifiable_parameters

MAGIC = b"LRIGLSPR"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIQ")  # magic, format version, header length
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


class SparseFileError(ValueError):
    """A file that cannot be loaded: not a sparse file, a newer format, truncated, corrupted, or another model's."""


def save_sparse(model: nn.Module, path: str | Path, masks: Mapping[str, Tensor] | None = None,
                dtype: torch.dtype | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
    """Writes ``model``'s state_dict to ``path`` in the compact format; returns the path.

    Args:
        model: the model; every tensor of its ``state_dict`` (parameters and buffers) is saved.
        masks: parameter name -> bool tensor of its shape (True: live), the sparse layers, e.g.
            ``callback.masks``. Default: every convolution and linear weight that holds a zero, masked by its
            non-zero positions.
        dtype: a floating dtype (e.g. ``torch.float16``) in which to store every floating tensor; loading
            casts back to each tensor's own dtype. Default: each tensor's own dtype (an exact round trip).
        metadata: JSON-serialisable facts to keep in the header (the command stores the model's registry
            name and arguments); ``read_metadata`` returns them.

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
    entries, blobs, offset = [], [], 0
    for name, tensor in state.items():
        stored = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        entry: dict[str, Any] = {"name": name, "shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype),
                                 "stored": _dtype_name(stored)}
        if name in masks:
            mask = masks[name]
            bits = _pack_bits(mask)
            values = _to_bytes(tensor[mask].to(stored))
            entry.update(live=int(mask.sum()), mask_bytes=len(bits))
            parts = [bits, values]
        else:
            parts = [_to_bytes(tensor.to(stored))]
        entry.update(offset=offset, bytes=sum(len(part) for part in parts))
        offset += entry["bytes"]
        entries.append(entry)
        blobs.extend(parts)
    payload = b"".join(blobs)
    header = zlib.compress(json.dumps({"tensors": entries, "payload_bytes": len(payload), "crc32": zlib.crc32(payload),
                                       "model": type(model).__name__, "metadata": dict(metadata or {})},
                                      separators=(",", ":")).encode(), level=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)) + header + payload)
    return path


def load_sparse(path: str | Path, model: nn.Module | None = None) -> dict[str, Tensor] | nn.Module:
    """The tensors of a file written by ``save_sparse``: as a state_dict (dead positions 0, each tensor in its own
    dtype), or loaded into ``model``, which is returned.

    Raises:
        SparseFileError: not a lightning-rigl sparse file, a newer format, a truncated or corrupted file, or (with
            ``model``) tensors whose names or shapes differ from the model's; nothing is loaded then.
    """
    header, payload = _read(Path(path))
    if model is not None:
        _check_fits(header, model, path)
    state = {}
    for entry in header["tensors"]:
        stored, dtype = _DTYPES[entry["stored"]], _DTYPES[entry["dtype"]]
        shape = torch.Size(entry["shape"])
        blob = payload[entry["offset"]:entry["offset"] + entry["bytes"]]
        if "live" in entry:
            mask = _unpack_bits(blob[:entry["mask_bytes"]], shape)
            tensor = torch.zeros(shape, dtype=dtype)
            tensor[mask] = _from_bytes(blob[entry["mask_bytes"]:], stored).to(dtype)
        else:
            tensor = _from_bytes(blob, stored).to(dtype).reshape(shape)
        state[entry["name"]] = tensor
    if model is None:
        return state
    model.load_state_dict(state, strict=True)
    return model


def read_masks(path: str | Path) -> dict[str, Tensor]:
    """The masks of the sparse layers stored in a file written by ``save_sparse`` (name -> bool tensor)."""
    header, payload = _read(Path(path))
    return {entry["name"]: _unpack_bits(payload[entry["offset"]:entry["offset"] + entry["mask_bytes"]],
                                        torch.Size(entry["shape"]))
            for entry in header["tensors"] if "live" in entry}


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


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    if not path.is_file():
        raise SparseFileError(f"no sparse model file at {path}.")
    data = path.read_bytes()
    if len(data) < _PREAMBLE.size or not data.startswith(MAGIC):
        raise SparseFileError(f"{path} is not a lightning-rigl sparse model file (written by save_sparse or "
                              "`lightning-rigl export`).")
    _, version, header_length = _PREAMBLE.unpack_from(data)
    if version > FORMAT_VERSION:
        raise SparseFileError(f"{path} has format {version}, written by a newer lightning-rigl; this version reads "
                              f"format {FORMAT_VERSION}. Upgrade lightning-rigl.")
    start = _PREAMBLE.size + header_length
    try:
        header = json.loads(zlib.decompress(data[_PREAMBLE.size:start]))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError):
        raise SparseFileError(f"{path} is truncated or corrupted (its header does not parse).") from None
    payload = data[start:]
    if len(payload) != header["payload_bytes"]:
        raise SparseFileError(f"{path} is truncated or corrupted: {len(payload)} bytes of tensors, the header says "
                              f"{header['payload_bytes']}.")
    if zlib.crc32(payload) != header["crc32"]:
        raise SparseFileError(f"{path} is corrupted: its tensors do not match the header's checksum.")
    return header, payload


def _check_fits(header: Mapping[str, Any], model: nn.Module, path: str | Path) -> None:
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    stored = {entry["name"]: tuple(entry["shape"]) for entry in header["tensors"]}
    problems = [f"missing {name}" for name in expected if name not in stored]
    problems += [f"unexpected {name}" for name in stored if name not in expected]
    problems += [f"{name}: {stored[name]} in the file, {shape} in the model" for name, shape in expected.items()
                 if name in stored and stored[name] != shape]
    if problems:
        raise SparseFileError(f"{path} holds another model than the {type(model).__name__} given (it was saved from a "
                              f"{header['model']}): {'; '.join(problems[:5])}" + (" ..." if len(problems) > 5 else "")
                              + ". Load it into the model it was saved from.")


def _pack_bits(mask: Tensor) -> bytes:
    """One bit per position, row-major, the first position in the highest bit of the first byte."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
    return _to_bytes((flat * _BIT_WEIGHTS).sum(1, dtype=torch.uint8))


def _unpack_bits(data: bytes, shape: torch.Size) -> Tensor:
    packed = _from_bytes(data, torch.uint8)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:shape.numel()].bool().reshape(shape)


def _to_bytes(tensor: Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype) -> Tensor:
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"tensors of dtype {dtype} cannot be saved in the sparse format.")
    return name
