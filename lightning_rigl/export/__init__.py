"""Sparse models outside training: a compact file (``save_sparse``, ``load_sparse``) and inference with sparse
kernels (``sparse_inference``)."""

from lightning_rigl.export.file import SparseFileError, load_sparse, read_masks, read_metadata, save_sparse
from lightning_rigl.export.inference import (
    CondensedConv2d,
    CondensedLinear,
    LayerChoice,
    SemiStructuredLinear,
    SparseConv2d,
    SparseLinear,
    SparseMultiheadAttention,
    condense,
    sparse_inference,
)

__all__ = [
    "CondensedConv2d",
    "CondensedLinear",
    "LayerChoice",
    "SemiStructuredLinear",
    "SparseConv2d",
    "SparseFileError",
    "SparseLinear",
    "SparseMultiheadAttention",
    "condense",
    "load_sparse",
    "read_masks",
    "read_metadata",
    "save_sparse",
    "sparse_inference",
]
