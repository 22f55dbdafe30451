"""ResNet-50 (v1.5, torchvision's definition) with a width multiplier, and its CIFAR variant from the RigL
reproducibility report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from lightning_rigl.errors import ConfigError
from lightning_rigl.models.initialization import he_init_
from lightning_rigl.models.registry import ModelConfig, register_model
from lightning_rigl.models.width import scale_channels

Stem = Literal["imagenet", "cifar"]
_STEM_CHANNELS = 64
_STAGE_PLANES = (64, 128, 256, 512)  # bottleneck widths; each stage outputs 4× its planes


@dataclass(frozen=True)
class ResNetConfig(ModelConfig):
    """A bottleneck ResNet.

    Attributes:
        blocks: bottleneck blocks per stage; (3, 4, 6, 3) is ResNet-50.
        stem: "imagenet": conv7×7 stride 2 + max-pool 3×3 stride 2 (for 224×224 inputs); "cifar": conv3×3
            stride 1 and no max-pool (for 32×32 inputs).
        zero_init_residual: start the last BatchNorm scale of every bottleneck at 0, so that each block
            starts as the identity (Goyal et al., 2017).
    """

    num_classes: int = 1000
    blocks: tuple[int, int, int, int] = (3, 4, 6, 3)
    stem: Stem = "imagenet"
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stem not in ("imagenet", "cifar"):
            raise ConfigError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}.")
        if len(self.blocks) != len(_STAGE_PLANES) or min(self.blocks) < 1:
            raise ConfigError(f"blocks must be four counts >= 1, got {self.blocks}.")


def _stage(in_channels: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` bottlenecks; the first one strides (on its 3×3 conv: v1.5) and projects the shortcut."""
    out_channels = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
        )
    layers = [Bottleneck(in_channels, planes, stride, downsample)]
    layers += [Bottleneck(out_channels, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """Stem, four stages of torchvision bottlenecks (strides 1, 2, 2, 2), global average pool, linear.

    Module and parameter names are torchvision's (conv1, bn1, layer1..layer4, fc), so at width 1 with the
    ImageNet stem and 1000 classes the state dict matches ``torchvision.models.resnet50()`` key for key and
    shape for shape (25,557,032 parameters; 8.18e9 FLOPs per 224×224 image, the RigL README's 8.2e9). The
    width multiplies the stem and every stage's planes.
    """

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        stem_channels = scale_channels(_STEM_CHANNELS, config.width)
        if config.stem == "imagenet":
            self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, stem_channels, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()  # keeps 32×32 inputs at 32×32 into layer1
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        in_channels = stem_channels
        stages = []
        for index, (planes, blocks) in enumerate(zip(_STAGE_PLANES, config.blocks)):
            planes = scale_channels(planes, config.width)
            stages.append(_stage(in_channels, planes, blocks, stride=1 if index == 0 else 2))
            in_channels = planes * Bottleneck.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, config.num_classes)
        he_init_(self)
        if config.zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, 3, 224, 224) -> layer4 (N, 2048, 7, 7); CIFAR stem: (N, 3, 32, 32) -> (N, 2048, 4, 4)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("resnet50")
def resnet50(num_classes: int, width: float = 1.0, *, zero_init_residual: bool = False) -> ResNet:
    """ResNet-50 v1.5 for 224×224 ImageNet images, as torchvision defines it (any input of 32×32 or more runs)."""
    config = ResNetConfig(num_classes=num_classes, width=width, zero_init_residual=zero_init_residual)
    return ResNet(config)


@register_model("resnet50_cifar")
def resnet50_cifar(num_classes: int, width: float = 1.0, *, zero_init_residual: bool = True) -> ResNet:
    """ResNet-50 for 32×32 CIFAR images, as in the RigL reproducibility report (Sundar & Dwaraknath, MLRC 2020).

    Stem: one conv3×3 3→64, stride 1, BN, ReLU, and no max-pool; then ResNet-50's v1.5 bottlenecks, the last
    BatchNorm of each starting at 0 (``zero_init_residual``, the reproduction's default).

    Verified against the report's dense cost, 2.59e9 inference FLOPs per 32×32 image (multiply-add = 2):
    this network has 2.596e9 (convolutions and linear layer, 100 classes). The alternatives do not fit: a
    stem of two 3×3 convolutions, as the report's prose can be read, gives 2.632e9 (3→32→64) or 2.672e9
    (3→64→64); the stride on the first 1×1 conv of a bottleneck (v1) gives 2.445e9. The reproduction's code
    documents the same stem ("Uses 3x3 conv in first layer instead of 7x7", models/resnet.py of
    varun19299/rigl-reproducibility); the final version of that file was not available to read.
    Assumed: BatchNorm and ReLU follow the stem conv, as in torchvision's stem. 23,705,252 parameters with 100 classes.
    """
    config = ResNetConfig(num_classes=num_classes, width=width, stem="cifar", zero_init_residual=zero_init_residual)
    return ResNet(config)
