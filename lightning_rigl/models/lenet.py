"""LeNet-300-100 (LeCun et al., 1998): the fully connected baseline of the sparse-training literature."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lightning_rigl.models.registry import ModelConfig, register_model
from lightning_rigl.models.width import scale_channels


@dataclass(frozen=True)
class LeNet300100Config(ModelConfig):
    """``in_features`` inputs (28·28 grey-scale pixels), ReLU hidden layers of ``hidden`` units (times width)."""

    in_features: int = 28 * 28
    hidden: tuple[int, ...] = (300, 100)


class LeNet300100(nn.Module):
    """784 → 300 → 100 → classes MLP with ReLU; 266,610 parameters at width 1 with 10 classes."""

    def __init__(self, config: LeNet300100Config) -> None:
        super().__init__()
        sizes = [config.in_features] + [scale_channels(units, config.width) for units in config.hidden]
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes, sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(sizes[-1], config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, 1, 28, 28) images or (N, 784) flat pixels -> logits (N, num_classes)
        return self.classifier(self.features(x.flatten(1)))


@register_model("lenet300_100")
def lenet300_100(num_classes: int, width: float = 1.0) -> LeNet300100:
    """LeNet-300-100 for 28×28 grey-scale images (MNIST, Fashion-MNIST)."""
    return LeNet300100(LeNet300100Config(num_classes=num_classes, width=width))
