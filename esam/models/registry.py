"""Name -> builder registry: ``build_model('resnet18', num_classes=10)``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from esam.registry import Registry, keyword_names, refuse_unknown_keys

ModelBuilder = Callable[..., nn.Module]
MODELS: Registry = Registry("model")


@dataclass(frozen=True)
class NativeShape:
    """The input (C, H, W) and class count a model was designed and published at."""

    input_size: tuple[int, int, int] = (3, 32, 32)  # CIFAR
    num_classes: int = 10


# Used by the model table and the parameter-count tests; building never needs it.
NATIVE_SHAPES: dict[str, NativeShape] = {}


def register_model(
    name: str, *, input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding a builder ``fn(num_classes, in_channels, **kwargs) -> nn.Module``.

    ``input_size`` and ``num_classes`` record the model's native setting (CIFAR by default).
    """

    def add(fn: ModelBuilder) -> ModelBuilder:
        MODELS.add(name, fn)
        NATIVE_SHAPES[name] = NativeShape(tuple(input_size), num_classes)
        return fn

    return add


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """The registered model ``name``; a key its builder does not take (``model.args``) is one sentence."""
    builder = MODELS.lookup(name)
    allowed = keyword_names(builder, skip=("num_classes", "in_channels"))
    if allowed is not None:
        refuse_unknown_keys(f"model {name}", "model.args.", kwargs, allowed)
    return builder(num_classes=num_classes, in_channels=in_channels, **kwargs)


def build_model_on(name: str, *, num_classes: int, in_channels: int, device: Any, channels_last: bool,
                   **kwargs: Any) -> nn.Module:
    """``build_model`` moved to ``device`` (and to channels_last memory): what the trainer and the
    bench train. Seed torch before calling it for reproducible initial weights."""
    model = build_model(name, num_classes=num_classes, in_channels=in_channels, **kwargs).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
