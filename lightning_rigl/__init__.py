"""lightning-rigl: sparse networks trained from scratch (RigL, SET, static) as PyTorch Lightning callbacks."""

from lightning_rigl.callbacks import SET, DynamicSparseTraining, RigL, SparseTraining, Static

__version__ = "0.1.0"

__all__ = ["SET", "DynamicSparseTraining", "RigL", "SparseTraining", "Static", "__version__"]
