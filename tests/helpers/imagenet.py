"""A tiny ImageNet folder of generated JPEGs whose pixels say which image they are, and its loader."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from esam.data import build_data
from esam.data.imagenet import MEAN, STD

CLASSES = ["n01", "n02", "n03"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 5, 2


def colour(label: int, index: int) -> tuple[int, int]:
    """(red, green) that identify an image: red its class, green its index in the class."""
    return 30 + 80 * label, 30 + 40 * index


def write_image(path: str, label: int, index: int, size: tuple[int, int]) -> None:
    # Red and green are uniform, so every crop keeps the image's identity; blue is a
    # horizontal ramp, so crops and flips change the pixels and show the augmentation.
    w, h = size
    red, green = colour(label, index)
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[..., 0], pixels[..., 1] = red, green
    pixels[..., 2] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    Image.fromarray(pixels).save(path, quality=95)


def write_imagenet(root: Path) -> str:
    """train/ and val/ folders of CLASSES under ``root`` (the ``imagenet_root`` fixture's)."""
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label, wnid in enumerate(CLASSES):
            os.makedirs(root / split / wnid)
            for index in range(count):  # varied shapes: the pipeline must resize and crop
                size = (40 + 8 * index, 48 - 4 * label)
                write_image(str(root / split / wnid / f"{wnid}_{index}.JPEG"), label, index, size)
    return str(root)


def build(root: str, **overrides):
    kwargs = dict(root=root, batch_size=4, test_batch_size=4, image_size=32, num_workers=0, seed=0)
    return build_data("imagenet", **{**kwargs, **overrides})


def identities(images: torch.Tensor) -> list[tuple[int, int]]:
    """(class, index) of each normalised image, read back from its mean red and green."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    rgb = ((images * std + mean) * 255).mean(dim=(2, 3))
    return [(round((r - 30) / 80), round((g - 30) / 40)) for r, g in rgb[:, :2].tolist()]
