"""What the registry's transformers (the ViTs, the GPT decoders) share: their sizes and how ``width`` scales them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_rigl.models.registry import ModelConfig
from lightning_rigl.models.width import scale_channels


@dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    """``layers`` blocks of ``hidden`` features in ``heads`` heads, ``mlp`` hidden units in each block's MLP;
    ``width`` scales ``hidden`` (to a multiple of ``heads``) and ``mlp``."""

    layers: int = 12
    heads: int = 12
    hidden: int = 768
    mlp: int = 3072

    @property
    def scaled_hidden(self) -> int:
        """``hidden`` times ``width``, rounded half up to a multiple of ``heads`` (at least one feature a head)."""
        return self.heads * max(1, math.floor(scale_channels(self.hidden, self.width) / self.heads + 0.5))

    @property
    def scaled_mlp(self) -> int:
        return scale_channels(self.mlp, self.width)
