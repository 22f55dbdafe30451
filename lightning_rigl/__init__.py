"""lightning-rigl: sparse networks trained from scratch (RigL, SET, static) as PyTorch Lightning callbacks."""

from lightning_rigl.callbacks import SET, DynamicSparseTraining, RigL, SparseTraining, Static
from lightning_rigl.classifier import ImageClassifier

__version__ = "0.1.0"

__all__ = ["SET", "DynamicSparseTraining", "ImageClassifier", "RigL", "SparseTraining", "Static", "__version__"]
