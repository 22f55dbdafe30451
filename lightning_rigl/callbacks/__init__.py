"""Lightning callbacks that train sparse networks: each module states one method's rule."""

from lightning_rigl.callbacks.agreement import MaskDisagreementError
from lightning_rigl.callbacks.dynamic import DynamicSparseTraining
from lightning_rigl.callbacks.lottery import LotteryTicket
from lightning_rigl.callbacks.pruning import GradualMagnitudePruning, PruningFromDense
from lightning_rigl.callbacks.rigl import RigL
from lightning_rigl.callbacks.set import SET
from lightning_rigl.callbacks.snfs import SNFS
from lightning_rigl.callbacks.snip import SNIP
from lightning_rigl.callbacks.sparse_training import SparseTraining
from lightning_rigl.callbacks.srigl import SRigL
from lightning_rigl.callbacks.static import Static

__all__ = [
    "SET",
    "SNFS",
    "SNIP",
    "SRigL",
    "DynamicSparseTraining",
    "GradualMagnitudePruning",
    "LotteryTicket",
    "MaskDisagreementError",
    "PruningFromDense",
    "RigL",
    "SparseTraining",
    "Static",
]
