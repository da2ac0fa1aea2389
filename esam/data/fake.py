"""Random images of a dataset's shape, to run a recipe's first steps without its data.

``dataset.fake=N`` keeps everything a recipe sets (batch, augmentation, the model's class
count and input size) and swaps the files for N training images (N/4 test images) from the
synthetic builder: what `make test` trains every recipe on, and what a user can try a recipe
with before downloading anything.
"""
from __future__ import annotations

from typing import Any

from esam.data import DataBundle, build_data, loader_kwargs
from esam.errors import UserError

# (channels, image side, classes) of each dataset; ImageNet's side is its recipe's image_size.
SHAPES: dict[str, tuple[int, int | None, int]] = {
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "imagenet": (3, None, 1000),
    "digits": (1, 8, 10),
    "synthetic": (3, None, 10),
}


def build_fake(name: str, *, fake: int, **kwargs: Any) -> DataBundle:
    """``fake`` random images shaped like dataset ``name`` (a registered dataset with a known shape)."""
    if name not in SHAPES:
        raise UserError(f"dataset.fake is not available for dataset {name!r}; allowed: {', '.join(SHAPES)}")
    channels, side, classes = SHAPES[name]
    side = side or int(kwargs.get("image_size", 32))
    if name == "synthetic":
        channels, classes = int(kwargs.get("in_channels", channels)), int(kwargs.get("num_classes", classes))
    batch = int(kwargs.get("batch_size", 1))
    if fake < batch:
        raise UserError(f"dataset.fake={fake} must be at least dataset.batch_size={batch} (one batch)")
    return build_data("synthetic", num_train=fake, num_test=max(1, fake // 4), num_classes=classes,
                      in_channels=channels, image_size=side, **loader_kwargs(kwargs))  # not root, download, ...
