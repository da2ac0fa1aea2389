"""Random uint8 images at any shape, for speed work and CPU-scale comparisons.

Each class has a fixed smooth random template; an image is ``class_signal`` of its class's
template plus the rest uniform noise, so with ``class_signal > 0`` there is something to
learn (and to overfit), while ``class_signal=0`` gives pure noise with random labels.
"""
from __future__ import annotations

from typing import Any

import torch

from esam.data.bundle import DataBundle, loader_kwargs, tensor_bundle
from esam.data.registry import register_dataset


@register_dataset("synthetic")
def build_synthetic(
    *, num_train: int = 5000, num_test: int = 1000, num_classes: int = 10, in_channels: int = 3,
    image_size: int = 32, class_signal: float = 0.2, data_seed: int = 0, **kwargs: Any,
) -> DataBundle:
    g = torch.Generator().manual_seed(data_seed)
    shape = (in_channels, image_size, image_size)
    n = num_train + num_test
    labels = torch.randint(0, num_classes, (n,), generator=g)
    # Smooth templates (4x4 upsampled) survive random crops and flips, as real objects do.
    coarse = torch.rand((num_classes, in_channels, 4, 4), generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                                                align_corners=False)
    noise = torch.rand((n, *shape), generator=g)
    images = (255 * (class_signal * templates[labels] + (1 - class_signal) * noise)).round().to(torch.uint8)
    return tensor_bundle(
        images[:num_train], labels[:num_train], images[num_train:], labels[num_train:],
        num_classes=num_classes, mean=(0.5,) * in_channels, std=(0.29,) * in_channels, **loader_kwargs(kwargs),
    )
