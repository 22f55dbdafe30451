"""A name registry so recipes can say ``create_model("wrn22_2", num_classes=10)``, and the config every model shares."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from lightning_rigl.errors import ConfigError

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def check_width(width: object) -> None:
    """Raises ``ConfigError`` unless ``width`` is a finite number > 0."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (math.isfinite(width) and width > 0):
        raise ConfigError(f"width must be a finite number > 0 (1.0 is the standard network), got {width!r}.")


def check_num_classes(num_classes: object) -> None:
    """Raises ``ConfigError`` unless ``num_classes`` is an integer >= 1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}.")


@dataclass(frozen=True)
class ModelConfig:
    """What every registered model takes.

    Attributes:
        num_classes: size of the output layer (logits).
        width: multiplier on every hidden layer's channel or unit count (rounded half up, at least 1); 1.0 is
            the standard architecture. Input and output sizes are never scaled.
    """

    num_classes: int = 10
    width: float = 1.0

    def __post_init__(self) -> None:
        check_num_classes(self.num_classes)
        check_width(self.width)


def register_model(name: str) -> Callable[[Factory], Factory]:
    """Decorator adding ``factory(num_classes, width=1.0, *, options...) -> nn.Module`` under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def add(factory: Factory) -> Factory:
        if name in _MODELS:
            raise ValueError(f"A model is already registered as {name!r}; pick another name.")
        _MODELS[name] = factory
        return factory

    return add


def list_models() -> list[str]:
    """The registered names, sorted."""
    return sorted(_MODELS)


def create_model(name: str, num_classes: int, width: float = 1.0, **kwargs: object) -> nn.Module:
    """Build the registered model ``name`` with ``num_classes`` outputs, ``width`` times the standard width.

    Args:
        name: one of ``list_models()``.
        num_classes: size of the output layer.
        width: multiplier on every hidden layer's channel or unit count; must be > 0.
        **kwargs: the model's own options (see its factory), e.g. ``zero_init_residual=True``.

    Raises:
        ConfigError: an unknown name (the message lists the available ones), ``width`` <= 0, ``num_classes``
            < 1, or an option the model does not take (the message lists the ones it takes).
    """
    factory = _MODELS.get(name)
    if factory is None:
        raise ConfigError(f"Unknown model {name!r}. Available models: {', '.join(list_models())}.")
    signature = inspect.signature(factory)
    try:  # width and num_classes are checked by the model's config (ModelConfig)
        signature.bind(num_classes=num_classes, width=width, **kwargs)
    except TypeError:
        options = [p for p in signature.parameters if p not in ("num_classes", "width")]
        raise ConfigError(
            f"Model {name!r} takes the options {options or 'none'}, got {sorted(kwargs)}; fix the model options."
        ) from None
    return factory(num_classes=num_classes, width=width, **kwargs)
