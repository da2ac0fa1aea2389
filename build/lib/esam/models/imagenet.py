"""ImageNet models: torchvision's ResNet-50/101 and any timm model by name.

Weights are always freshly initialised (pretrained=False): the benchmark compares
optimizers from scratch, and nothing is ever downloaded.
"""
from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from esam.errors import UserError
from esam.models.registry import register_model

IMAGENET_INPUT = (3, 224, 224)


def _torchvision_resnet(depth: int, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    builder = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]
    # torchvision's own init: Kaiming-normal (fan_out) convs, unit BN, zero_init_residual=False.
    model = builder(weights=None, num_classes=num_classes)
    if in_channels != 3:  # torchvision has no in_chans argument: swap the stem, initialised alike
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("resnet50", input_size=IMAGENET_INPUT, num_classes=1000)
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-50 (v1.5, stride on the 3x3): 25,557,032 parameters for 1000 classes."""
    return _torchvision_resnet(50, num_classes, in_channels)


@register_model("resnet101", input_size=IMAGENET_INPUT, num_classes=1000)
def resnet101(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-101 (v1.5): 44,549,160 parameters for 1000 classes."""
    return _torchvision_resnet(101, num_classes, in_channels)


@register_model("timm", input_size=IMAGENET_INPUT, num_classes=1000)
def timm_model(num_classes: int = 1000, in_channels: int = 3, model_name: str = "resnet18",
               **kwargs: Any) -> nn.Module:
    """Any ``timm`` architecture by name (``model=timm model.args.model_name=<name>``), with timm's init."""
    import timm

    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
        raise UserError(
            f"model.args.model_name={model_name!r} is not a timm model; close names: {close or 'none'} "
            f"(list them with python -c \"import timm; print(timm.list_models('*resnet*'))\")"
        )
    return timm.create_model(model_name, pretrained=False, num_classes=num_classes,
                             in_chans=in_channels, **kwargs)
