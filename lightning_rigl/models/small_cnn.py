"""A small CNN for 28×28 grey-scale images: a quick convolutional network for Fashion-MNIST on the CPU."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lightning_rigl.errors import ConfigError
from lightning_rigl.models.registry import ModelConfig, register_model
from lightning_rigl.models.width import scale_channels


@dataclass(frozen=True)
class SmallCNNConfig(ModelConfig):
    """Input ``in_channels``×``image_size``², conv blocks of ``channels`` filters, a ``hidden``-unit layer."""

    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, ...] = (32, 64)
    hidden: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size < 2 ** len(self.channels):
            raise ConfigError(
                f"image_size {self.image_size} is too small for {len(self.channels)} 2×2 max-pools; "
                f"use at least {2 ** len(self.channels)}."
            )


class SmallCNN(nn.Module):
    """[conv3×3 (padding 1, bias) → ReLU → max-pool 2×2] per entry of ``channels``, then linear → ReLU → linear.

    At width 1 with 10 classes: conv 1→32 (320), conv 32→64 (18,496), linear 64·7·7→128 (401,536),
    linear 128→10 (1,290): 421,642 parameters. The first linear layer is sized for ``image_size``, so the
    network takes only that input size.
    """

    def __init__(self, config: SmallCNNConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels, side = config.in_channels, config.image_size
        for channels in config.channels:
            out_channels = scale_channels(channels, config.width)
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            in_channels, side = out_channels, side // 2
        self.features = nn.Sequential(*layers)
        hidden = scale_channels(config.hidden, config.width)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, config.num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, 1, 28, 28) -> features (N, 64, 7, 7) at width 1 -> logits (N, num_classes)
        return self.classifier(self.features(x))


@register_model("small_cnn")
def small_cnn(num_classes: int, width: float = 1.0) -> SmallCNN:
    """The small CNN for 28×28×1 images (Fashion-MNIST)."""
    return SmallCNN(SmallCNNConfig(num_classes=num_classes, width=width))
