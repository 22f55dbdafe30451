"""MobileNet-v1 (Howard et al., 2017) for 224×224 ImageNet images, with its width multiplier α."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lightning_rigl.models.initialization import he_init_
from lightning_rigl.models.registry import ModelConfig, register_model
from lightning_rigl.models.width import scale_channels

_STEM_CHANNELS = 32
# (output channels, stride) of the 13 depthwise-separable blocks: Table 1 of the paper.
_BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)  # fmt: skip


@dataclass(frozen=True)
class MobileNetV1Config(ModelConfig):
    """MobileNet-v1; ``width`` is the paper's width multiplier α."""

    num_classes: int = 1000


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1) -> nn.Sequential:
    """Conv (no bias: the BatchNorm shifts) → BN → ReLU; ``groups == in_channels`` makes it depthwise."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False
    )
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    """conv3×3 stride 2 3→32, 13 blocks of [depthwise 3×3 → BN → ReLU, pointwise 1×1 → BN → ReLU] up to 1024
    channels, global average pool, linear.

    At width 1 with 1000 classes: 1.137e9 FLOPs per 224×224 image (the paper's 569 million multiply-adds) and
    4,231,976 parameters, the trainable count Keras reports for its MobileNet
    (BatchNorm running statistics are buffers here, non-trainable weights there). Differences from Keras'
    that change no parameter: ReLU instead of ReLU6, symmetric padding on strided convolutions, a linear
    layer instead of a 1×1 conv classifier, and no dropout before it.
    """

    def __init__(self, config: MobileNetV1Config) -> None:
        super().__init__()
        in_channels = scale_channels(_STEM_CHANNELS, config.width)
        layers = [_conv_bn_relu(3, in_channels, 3, stride=2)]
        for channels, stride in _BLOCKS:
            out_channels = scale_channels(channels, config.width)
            depthwise = _conv_bn_relu(in_channels, in_channels, 3, stride, groups=in_channels)
            layers.append(nn.Sequential(depthwise, _conv_bn_relu(in_channels, out_channels, 1, stride=1)))
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, config.num_classes)
        he_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, 3, 224, 224) -> features (N, 1024, 7, 7) at width 1 -> logits (N, num_classes)
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("mobilenet_v1")
def mobilenet_v1(num_classes: int, width: float = 1.0) -> MobileNetV1:
    """MobileNet-v1 for 224×224 ImageNet images (any input of 32×32 or more runs)."""
    return MobileNetV1(MobileNetV1Config(num_classes=num_classes, width=width))
