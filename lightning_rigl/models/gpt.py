"""GPT-style decoders (causal language models) as plain modules: token and position embeddings, pre-norm blocks
whose query, key, value, output and MLP projections are ``nn.Linear`` modules (so the default selection sparsifies
exactly them, and the sparse kernels train them), causal attention through ``F.scaled_dot_product_attention``, and
an output head tied to the token embedding.

In the registry ``num_classes`` is the vocabulary: the output layer's size, as for a classifier.

The tied embedding and head are one weight, read twice: as a lookup table at the input and as the output
projection (``F.linear`` on the embedding's weight, not a module). Neither an embedding nor that head is a layer
the default selection takes, so it stays dense, as the sparse-training literature keeps embeddings: as a lookup
it costs no FLOPs, and at GPT-2's size it is a third of the parameters, whose rows a byte or a rare token would
lose. As the head it does cost FLOPs (2 x width x vocabulary a token: a quarter of gpt2_small's forward pass),
which a sparse run keeps dense, and its FLOP count says so. Name it with ``include`` to sparsify it: one mask then serves both uses, since it is one Parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_rigl.errors import ConfigError
from lightning_rigl.models.registry import register_model
from lightning_rigl.models.transformer import TransformerConfig


@dataclass(frozen=True)
class GPTConfig(TransformerConfig):
    """A decoder of ``layers`` blocks over contexts of up to ``context`` tokens of a ``num_classes``-token
    vocabulary; ``hidden`` features in ``heads`` heads, ``mlp`` hidden units in each block's MLP, ``dropout`` on
    the embeddings, the attention weights and each residual branch. ``width`` scales ``hidden`` (to a multiple of
    ``heads``) and ``mlp``."""

    context: int = 1024
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("context", "layers", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}.")


class CausalSelfAttention(nn.Module):
    """Multi-head attention of each position to itself and the positions before it."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, hidden = x.shape
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (projection(x).view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)
                   for projection in (self.query, self.key, self.value))
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                                  is_causal=True)
        return self.output(attended.transpose(1, 2).reshape(batch, length, hidden))


class MLP(nn.Module):
    def __init__(self, hidden: int, units: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, units)
        self.proj = nn.Linear(units, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # GPT-2's GELU


class Block(nn.Module):
    """x + attention(norm(x)), then + MLP(norm(...)): GPT-2's pre-norm block."""

    def __init__(self, hidden: int, heads: int, units: int, dropout: float) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(hidden)
        self.attention = CausalSelfAttention(hidden, heads, dropout)
        self.norm_2 = nn.LayerNorm(hidden)
        self.mlp = MLP(hidden, units)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attention(self.norm_1(x)))
        return x + self.drop(self.mlp(self.norm_2(x)))


class GPT(nn.Module):
    """Tokens (B, T) of ids below the vocabulary, T <= ``context`` → next-token logits (B, T, vocabulary)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.scaled_hidden
        self.context = config.context
        self.token_embedding = nn.Embedding(config.num_classes, hidden)
        self.position_embedding = nn.Embedding(config.context, hidden)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(hidden, config.heads, config.scaled_mlp,
                                          config.dropout) for _ in range(config.layers))
        self.norm = nn.LayerNorm(hidden)
        self._init_weights(config.layers)

    def _init_weights(self, layers: int) -> None:
        # GPT-2's: normal(0, 0.02) weights, zero biases, the projections into the residual stream scaled by
        # 1/sqrt(2·layers) (two per block), so that the stream's variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block.attention.output, block.mlp.proj):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(f"a sequence of {length} tokens is longer than the model's context ({self.context}).")
        positions = self.position_embedding.weight[:length]  # (T, C)
        x = self.drop(self.token_embedding(tokens) + positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm(x), self.token_embedding.weight)  # the head tied to the embedding


@register_model("gpt_tiny")
def gpt_tiny(num_classes: int = 256, width: float = 1.0, *, context: int = 256, dropout: float = 0.0) -> GPT:
    """A GPT for this project's CPU: 4 blocks of 192 features in 6 heads, MLPs of 768, contexts of 256 tokens;
    1,878,144 parameters with the byte vocabulary (256)."""
    return GPT(GPTConfig(num_classes=num_classes, width=width, context=context, layers=4, heads=6, hidden=192,
                         mlp=768, dropout=dropout))


@register_model("gpt2_small")
def gpt2_small(num_classes: int = 50257, width: float = 1.0, *, context: int = 1024, dropout: float = 0.0) -> GPT:
    """GPT-2 small's shapes (Radford et al., 2019): 12 blocks of 768 features in 12 heads, MLPs of 3,072, contexts
    of 1,024 tokens; 124,439,808 parameters with GPT-2's vocabulary (50,257), as published."""
    return GPT(GPTConfig(num_classes=num_classes, width=width, context=context, layers=12, heads=12, hidden=768,
                         mlp=3072, dropout=dropout))
