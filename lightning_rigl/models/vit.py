"""Vision transformers: torchvision's ``VisionTransformer``, as ViT-B/16 for ImageNet and as a small ViT for
28×28 and 32×32 images that trains on a CPU in minutes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from torchvision.models import VisionTransformer

from lightning_rigl.errors import ConfigError
from lightning_rigl.models.registry import register_model
from lightning_rigl.models.transformer import TransformerConfig


@dataclass(frozen=True)
class ViTConfig(TransformerConfig):
    """A ViT of ``layers`` encoder blocks on ``in_channels``×``image_size``² images cut into ``patch_size``²
    patches; ``hidden`` features in ``heads`` heads, ``mlp`` hidden units in each block's MLP. ``width`` scales
    ``hidden`` (to a multiple of ``heads``) and ``mlp``."""

    in_channels: int = 3
    image_size: int = 224
    patch_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}; "
                              "pick sizes that tile the image.")


def build_vit(config: ViTConfig) -> VisionTransformer:
    """torchvision's ``VisionTransformer`` for ``config``, its patch embedding taking ``in_channels`` (torchvision's
    takes 3) and initialised as torchvision initialises it."""
    hidden = config.scaled_hidden
    model = VisionTransformer(image_size=config.image_size, patch_size=config.patch_size, num_layers=config.layers,
                              num_heads=config.heads, hidden_dim=hidden,
                              mlp_dim=config.scaled_mlp, num_classes=config.num_classes)
    if config.in_channels != 3:
        model.conv_proj = nn.Conv2d(config.in_channels, hidden, kernel_size=config.patch_size,
                                    stride=config.patch_size)
        fan_in = config.in_channels * config.patch_size**2
        nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(model.conv_proj.bias)
    return model


@register_model("vit_tiny")
def vit_tiny(num_classes: int, width: float = 1.0, *, in_channels: int = 1, image_size: int = 28) -> VisionTransformer:
    """A small ViT for Fashion-MNIST (28×28×1, the default) or CIFAR (``in_channels=3, image_size=32``): patches
    of 4×4 (49 or 64 tokens and a class token), 4 blocks of 64 features in 4 heads, MLPs of 128 units; 139,018
    parameters on Fashion-MNIST."""
    return build_vit(ViTConfig(num_classes=num_classes, width=width, in_channels=in_channels, image_size=image_size,
                               patch_size=4, layers=4, heads=4, hidden=64, mlp=128))


@register_model("vit_b_16")
def vit_b_16(num_classes: int, width: float = 1.0) -> VisionTransformer:
    """ViT-B/16 as torchvision builds it (224×224×3, patches of 16, 12 blocks of 768 features in 12 heads, MLPs of
    3,072): 86,567,656 parameters with 1,000 classes, as torchvision publishes."""
    return build_vit(ViTConfig(num_classes=num_classes, width=width))
