"""lightning-rigl: sparse networks trained from scratch (RigL and the methods it is compared with) as PyTorch
Lightning callbacks."""

from lightning_rigl.callbacks import (
    SET,
    SNFS,
    SNIP,
    DynamicSparseTraining,
    GradualMagnitudePruning,
    LotteryTicket,
    MaskDisagreementError,
    PruningFromDense,
    RigL,
    SparseTraining,
    SRigL,
    Static,
)
from lightning_rigl.classifier import ImageClassifier
from lightning_rigl.language_model import CausalLM
from lightning_rigl.resume import AtomicCheckpointIO, ExactResume, RequeueAtStepEnd

__version__ = "0.1.0"

__all__ = [
    "AtomicCheckpointIO",
    "CausalLM",
    "SET",
    "SNFS",
    "SNIP",
    "SRigL",
    "DynamicSparseTraining",
    "ExactResume",
    "GradualMagnitudePruning",
    "ImageClassifier",
    "LotteryTicket",
    "MaskDisagreementError",
    "PruningFromDense",
    "RequeueAtStepEnd",
    "RigL",
    "SparseTraining",
    "Static",
    "__version__",
]
