"""The weight initialisation the convolutional models share (torchvision's ResNet scheme)."""

from __future__ import annotations

from torch import nn


def he_init_(model: nn.Module) -> None:
    """He-normal convolution kernels (fan-out, ReLU gain); BatchNorm scales 1 and shifts 0, in place.

    Fan-out keeps the backward signal's variance constant through ReLU networks (He et al., 2015); it is
    what torchvision's ResNet and the RigL reproduction's WRN use. Linear layers keep PyTorch's default.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
