"""Random uint8 images with random labels, for speed work at any shape (nothing to learn)."""
from __future__ import annotations

from typing import Any

import torch

from esam.data import DataBundle, loader_kwargs, register_dataset, tensor_bundle


@register_dataset("synthetic")
def build_synthetic(
    *, num_train: int = 5000, num_test: int = 1000, num_classes: int = 10, in_channels: int = 3,
    image_size: int = 32, data_seed: int = 0, **kwargs: Any,
) -> DataBundle:
    g = torch.Generator().manual_seed(data_seed)
    shape = (in_channels, image_size, image_size)
    images = torch.randint(0, 256, (num_train + num_test, *shape), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (num_train + num_test,), generator=g)
    return tensor_bundle(
        images[:num_train], labels[:num_train], images[num_train:], labels[num_train:],
        num_classes=num_classes, mean=(0.5,) * in_channels, std=(0.29,) * in_channels, **loader_kwargs(kwargs),
    )
