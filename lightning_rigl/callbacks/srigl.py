"""SRigL (Lasby, Golubeva, Evci, Nica, Ioannou, "Dynamic Sparse Training with Structured Sparsity", ICLR 2024):
RigL under a constant fan-in, with neuron ablation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from torch import Tensor
from typing_extensions import override

from lightning_rigl.callbacks.rigl import RigL
from lightning_rigl.errors import ConfigError
from lightning_rigl.sparsity.ablation import constant_fan_in_update, neurons_to_keep, salient_per_neuron
from lightning_rigl.sparsity.masks import MaskChange
from lightning_rigl.sparsity.structure import CONSTANT_FAN_IN, rows_and_fan_in, stored_index
from lightning_rigl.sparsity.targets import resolve_patterns

ABLATED_NEURONS = "sparsity/ablated_neurons"  # logged: neurons without a live weight, over every sparse layer


class SRigL(RigL):
    """RigL with a constant fan-in: every neuron of a sparse layer (a row of a linear or attention weight, an
    output channel of a convolution) holds the same number k of live weights, from the first step to the last,
    so the layer can be stored condensed (k indices and k values per neuron) and run fast.

    A layer of budget L (its count under the distribution) starts with k = ⌊L / neurons⌋. At every update the
    smallest |w| are dropped across the layer, as in RigL, and each neuron grows back to k where |dense gradient|
    is largest among its free positions. Neuron ablation (the official ``dynamic_ablation``): a neuron with
    fewer salient weights than ``min_salient_fraction`` of k (salient: what unstructured RigL would keep or grow
    this update) loses all its weights, and the others share its budget: k = ⌊L / active neurons⌋. Ablation is
    decided afresh at every update, so an ablated neuron whose gradients grow comes back. Never ablated: the
    layers matched by ``no_ablation`` (by default the last sparse layer, whose neurons are the outputs, as in
    the official code), and never so many neurons that k would exceed the dense fan-in.

    Defaults follow the official code's configuration (``configs/config.yaml``): ablation on, threshold 0.3
    of the sparse fan-in (``min_salient_weights_per_neuron`` with ``use_sparse_const_fan_in_for_ablation``);
    its ViT runs use 0.95 (``configs/rigl/vit.yaml``). Everything else is RigL's (drop fraction, cosine
    decay, T_end, ΔT). Differences from the official code, by design: a salient weight is one unstructured
    RigL would grow among the positions it does not keep (the official code ranks every position's gradient);
    a neuron left above k after its fan-in shrank keeps its largest |w| (the official code keeps arbitrary
    ones); the model's own initialisation is kept (the official code rescales sparse layers' initialisation).

    Example::

        trainer = pl.Trainer(max_steps=10_000, callbacks=[SRigL(sparsity=0.9, distribution="erk")])

    Besides the options of ``RigL`` (``structure`` is fixed to "constant_fan_in", ``redistribution`` to "none"):

    Args:
        min_salient_fraction: γ_sal, the fraction of k (before ablation) a neuron's salient weights must reach to
            stay, in [0, 1]; 0 turns ablation off.
        no_ablation: glob patterns over parameter names whose neurons are never ablated; None: the last sparse
            layer.

    Raises:
        ValueError: ``min_salient_fraction`` outside [0, 1], another structure or a redistribution (here); a
            ``no_ablation`` pattern matching no sparse layer, or a layer with fewer live weights than neurons
            (at setup).
    """

    def __init__(self, *args: Any, min_salient_fraction: float = 0.3, no_ablation: Sequence[str] | None = None,
                 structure: str = CONSTANT_FAN_IN, **kwargs: Any) -> None:
        if structure != CONSTANT_FAN_IN:
            raise ConfigError(f"SRigL keeps a constant fan-in; structure={structure!r} is for RigL, SET or Static.")
        super().__init__(*args, structure=structure, **kwargs)
        if isinstance(min_salient_fraction, bool) or not isinstance(min_salient_fraction, (int, float)) \
                or not 0 <= min_salient_fraction <= 1:
            raise ConfigError(f"min_salient_fraction must be a fraction in [0, 1], got {min_salient_fraction!r}.")
        self.min_salient_fraction = float(min_salient_fraction)
        self.no_ablation = None if no_ablation is None else tuple(no_ablation)
        self._ablating: set[str] = set()  # the layers whose neurons may be ablated

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.min_salient_fraction == 0:
            return
        names = list(self.targets)
        spared = {names[-1]} if self.no_ablation is None else resolve_patterns(names, self.no_ablation,
                                                                                "no_ablation")
        self._ablating = {name for name in names if name not in spared}

    @override
    def change_mask(self, name: str, weights: Tensor, scores: Tensor, n_drop: int, n_grow: int) -> MaskChange:
        if name not in self._ablating:  # its fan-in never changes: RigL within the structure
            return super().change_mask(name, weights, scores, n_drop, n_grow)
        mask, budget = self.masks[name], self.budgets[name]
        transposed = name in self.neurons_in_columns  # its neurons are columns: the rule reads the transpose
        layer = mask.t().contiguous() if transposed else mask
        weights, scores = (weights.t(), scores.t()) if transposed else (weights, scores)
        rows, fan_in = rows_and_fan_in(layer.shape)
        min_salient = max(1, int(self.min_salient_fraction * (budget // rows)))  # as the official code rounds
        active = neurons_to_keep(salient_per_neuron(layer, weights, scores, n_drop), budget, fan_in, min_salient)
        change = constant_fan_in_update(layer, weights, scores, n_drop, active, budget)
        if not transposed:
            return change
        mask.copy_(layer.t())
        shape = tuple(mask.shape)
        return MaskChange(stored_index(change.removed, shape), stored_index(change.added, shape))

    @override
    def density_metrics(self) -> dict[str, float]:
        return {**super().density_metrics(), ABLATED_NEURONS: float(self.ablated_neurons())}

    @override
    def densities_move(self) -> bool:
        return bool(self._ablating)
