"""Sparse kernels shared by training (``callbacks``) and inference (``export``): the compressed forms of a masked
weight (``forms``), the product that trains from the live weights only (``training``) and the timing rule that
picks the fastest kernel (``timing``). Plain PyTorch, no Lightning."""

from lightning_rigl.kernels.forms import LivePattern, condense, to_csr
from lightning_rigl.kernels.timing import medians_ms
from lightning_rigl.kernels.training import KERNEL_MODES, KernelPlan, LayerKernels, TrainingKernels

__all__ = [
    "KERNEL_MODES",
    "KernelPlan",
    "LayerKernels",
    "LivePattern",
    "TrainingKernels",
    "condense",
    "medians_ms",
    "to_csr",
]
