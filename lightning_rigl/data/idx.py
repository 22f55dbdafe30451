"""Reader for IDX files, the on-disk format of the MNIST family (Fashion-MNIST included)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch

_UNSIGNED_BYTE = 0x08


def read_idx(path: Path) -> torch.Tensor:
    """The uint8 tensor stored in an unsigned-byte IDX file, gzipped (``.gz``) or not.

    Layout: two zero bytes, a type byte (0x08: unsigned byte), the number of dimensions, one big-endian uint32
    per dimension, then the values in row-major order.

    Raises:
        ValueError: not an unsigned-byte IDX file, or a file whose length does not match its header.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        header = file.read(4)
        if len(header) < 4 or header[:2] != b"\0\0" or header[2] != _UNSIGNED_BYTE:
            raise ValueError(f"{path}: not an unsigned-byte IDX file (header {header.hex()})")
        ndim = header[3]
        shape = struct.unpack(f">{ndim}I", file.read(4 * ndim))
        values = file.read()
    expected = torch.Size(shape).numel()
    if len(values) != expected:
        raise ValueError(f"{path}: header says {shape} = {expected} bytes of data, the file holds {len(values)}")
    return torch.frombuffer(bytearray(values), dtype=torch.uint8).reshape(shape)
