"""The mathematics of sparse training on plain PyTorch tensors; no Lightning import."""

from lightning_rigl.sparsity.distributions import (
    DISTRIBUTIONS,
    GLOBAL,
    densities_for_shapes,
    layer_densities,
    live_count,
)
from lightning_rigl.sparsity.masks import (
    MaskChange,
    apply_change,
    apply_mask,
    global_density,
    mask_densities,
    mask_digest,
    random_mask,
    random_masks,
)
from lightning_rigl.sparsity.schedules import DROP_SCHEDULES, drop_fraction, is_update_step
from lightning_rigl.sparsity.targets import sparsifiable_parameters
from lightning_rigl.sparsity.selection import top_k_indices
from lightning_rigl.sparsity.updates import drop_and_grow, prune, prune_globally

__all__ = [
    "DISTRIBUTIONS",
    "DROP_SCHEDULES",
    "GLOBAL",
    "MaskChange",
    "apply_change",
    "apply_mask",
    "densities_for_shapes",
    "drop_and_grow",
    "drop_fraction",
    "global_density",
    "is_update_step",
    "layer_densities",
    "live_count",
    "mask_densities",
    "mask_digest",
    "prune",
    "prune_globally",
    "random_mask",
    "random_masks",
    "sparsifiable_parameters",
    "top_k_indices",
]
