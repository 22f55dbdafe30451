"""Lightning callbacks that train sparse networks from scratch."""

from lightning_rigl.callbacks.dynamic import DynamicSparseTraining
from lightning_rigl.callbacks.rigl import RigL
from lightning_rigl.callbacks.set import SET
from lightning_rigl.callbacks.sparse_training import SparseTraining
from lightning_rigl.callbacks.static import Static

__all__ = ["DynamicSparseTraining", "RigL", "SET", "SparseTraining", "Static"]
