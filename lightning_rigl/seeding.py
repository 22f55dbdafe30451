"""The global random generators seeded from a key: what a training batch (``ExactResume``) and an example's
augmentation (``Transformed``) draw from, so that both are functions of the run's seed and of where they are in the
run alone, not of what drew before them."""

from __future__ import annotations

import hashlib
import random
import struct

import numpy as np
import torch

_LOW_64, _LOW_32 = (1 << 64) - 1, (1 << 32) - 1


def key_seed(domain: bytes, *key: int) -> int:
    """A 128-bit seed drawn from ``key`` (ints, each read modulo 2**64) alone: BLAKE2b, personalised by ``domain``
    (at most 16 bytes), so that neighbouring keys, and equal keys of two domains, get unrelated seeds."""
    packed = struct.pack(f"<{len(key)}Q", *(part & _LOW_64 for part in key))
    digest = hashlib.blake2b(packed, digest_size=16, person=domain).digest()
    return int.from_bytes(digest, "little")


def seed_global_generators(seed: int, cuda: bool = False) -> None:
    """Seeds torch's CPU generator (and, with ``cuda``, the current CUDA device's where CUDA is in use), Python's
    ``random`` and NumPy's global generator from a 128-bit ``seed``: about 10 us, where saving and restoring NumPy's
    state alone takes 0.1 ms."""
    torch.default_generator.manual_seed(seed & _LOW_64)
    if cuda and torch.cuda.is_initialized():
        torch.cuda.manual_seed(seed & _LOW_64)
    random.seed(seed)
    np.random.seed((seed >> 64) & _LOW_32)
