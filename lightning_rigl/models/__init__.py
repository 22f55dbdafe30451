"""Architectures of the RigL experiments, by name: ``create_model("wrn22_2", num_classes=10)``.

Importing this package registers every model below. Models are plain ``nn.Module``s returning logits, free of
training code; each takes ``num_classes`` and ``width`` (a multiplier on every hidden layer's channel count).
"""

# Importing the model modules registers their models.
from lightning_rigl.models import gpt, lenet, mobilenet, resnet, small_cnn, vit, wide_resnet
from lightning_rigl.models.registry import ModelConfig, create_model, list_models, register_model
from lightning_rigl.models.width import count_parameters, match_width, scale_channels, sparse_parameter_count

__all__ = [
    "ModelConfig",
    "count_parameters",
    "gpt",
    "create_model",
    "lenet",
    "list_models",
    "match_width",
    "mobilenet",
    "register_model",
    "resnet",
    "scale_channels",
    "small_cnn",
    "sparse_parameter_count",
    "vit",
    "wide_resnet",
]
