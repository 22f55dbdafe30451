"""RigL (Evci et al., ICML 2020): grow where the dense gradient is largest."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_rigl.callbacks.dynamic import DynamicSparseTraining


class RigL(DynamicSparseTraining):
    """Rigging the Lottery: drop the smallest-magnitude live weights and grow the positions with the largest
    |gradient| of the loss with respect to the (masked) weight, read just before the optimizer step.

    Dead positions receive a gradient too (the weight is a dense tensor with zeros), so no extra backward
    pass and no persistent dense-gradient buffer is needed.

    Example::

        trainer = pl.Trainer(max_steps=10_000, callbacks=[RigL(sparsity=0.9, distribution="erk")])
    """

    def grow_scores(self, name: str, param: nn.Parameter, step: int, layer_index: int) -> Tensor:
        if param.grad is None:
            raise RuntimeError(
                f"RigL needs the gradient of {name!r} at step {step}, but it has none: the parameter did not "
                "take part in the loss. Leave it out with exclude=[...]."
            )
        return param.grad.abs()
