"""Wide ResNet (Zagoruyko & Komodakis, 2016) for 32×32 images: WRN-22-2 is RigL's CIFAR-10 network."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn import functional as F

from lightning_rigl.errors import ConfigError
from lightning_rigl.models.initialization import he_init_
from lightning_rigl.models.registry import ModelConfig, register_model
from lightning_rigl.models.width import scale_channels

# Channels of the stem and of the three groups before the widen factor; the groups' strides.
_STEM_CHANNELS = 16
_GROUP_CHANNELS = (16, 32, 64)
_GROUP_STRIDES = (1, 2, 2)


@dataclass(frozen=True)
class WideResNetConfig(ModelConfig):
    """WRN-``depth``-``widen_factor``; ``drop_rate`` is the dropout between the two convs of a block.

    ``depth`` counts the convolutions on the main path plus the classifier: 6·n + 4 for n blocks per group.
    """

    depth: int = 22
    widen_factor: int = 2
    drop_rate: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth < 10 or (self.depth - 4) % 6 != 0:
            raise ConfigError(f"WRN depth must be 6·n + 4 with n >= 1 (10, 16, 22, 28, ...), got {self.depth}.")
        if self.widen_factor < 1:
            raise ConfigError(f"widen_factor must be >= 1, got {self.widen_factor}.")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {self.drop_rate}.")


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3 (stride) → BN-ReLU-dropout-conv3×3, added to the identity or a 1×1 conv shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False) if changes_shape else None

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)
        activated = F.relu(self.bn1(x))
        # The projection reads the pre-activated input and the identity the raw one, as in the official
        # TensorFlow WRN of RigL and in the reproduction.
        skip = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + skip


class WideResNet(nn.Module):
    """conv3×3 3→16, three groups of (depth − 4) / 6 pre-activation blocks with 16k, 32k, 64k channels
    (k = widen_factor; strides 1, 2, 2), BN-ReLU, global average pool, linear.

    Convolutions have no bias (a BatchNorm follows each). WRN-22-2 at width 1 with 10 classes has 1,079,642
    parameters and 3.15e8 FLOPs per 32×32 image (convolutions and the linear layer, multiply-add = 2), the
    reproducibility report's dense figure.
    """

    def __init__(self, config: WideResNetConfig) -> None:
        super().__init__()
        blocks_per_group = (config.depth - 4) // 6
        in_channels = scale_channels(_STEM_CHANNELS, config.width)
        self.stem = nn.Conv2d(3, in_channels, 3, padding=1, bias=False)
        groups = []
        for base, stride in zip(_GROUP_CHANNELS, _GROUP_STRIDES):
            channels = scale_channels(base * config.widen_factor, config.width)
            blocks = []
            for index in range(blocks_per_group):
                blocks.append(PreActBlock(in_channels, channels, stride if index == 0 else 1, config.drop_rate))
                in_channels = channels
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(in_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, config.num_classes)
        he_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, 3, 32, 32) -> groups (N, 128, 8, 8) for WRN-22-2 -> logits (N, num_classes)
        out = F.relu(self.bn(self.groups(self.stem(x))))
        return self.fc(self.pool(out).flatten(1))


@register_model("wrn22_2")
def wrn22_2(num_classes: int, width: float = 1.0, *, drop_rate: float = 0.3) -> WideResNet:
    """WRN-22-2 for 32×32 CIFAR images, as in RigL's CIFAR-10 experiments.

    ``drop_rate`` 0.3 is the default of the official TensorFlow model (google-research/rigl,
    rigl/cifar_resnet/resnet_model.py), which the training script does not override, and of the
    reproduction's registry (varun19299/rigl-reproducibility).
    """
    return WideResNet(WideResNetConfig(num_classes=num_classes, width=width, drop_rate=drop_rate))
