"""CIFAR-10/100 read by torchvision's own loaders, then kept on the device as uint8."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from esam.data.bundle import DataBundle, carve_validation, loader_kwargs, tensor_bundle
from esam.data.registry import register_dataset
from esam.errors import UserError

# Per-channel statistics of the training sets (as in the SAM/ESAM reference code).
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


def load_cifar_arrays(name: str, root: str, download: bool) -> tuple[np.ndarray, ...]:
    """(train images NHWC uint8, train labels, test images, test labels) via torchvision."""
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except Exception as e:  # torchvision raises RuntimeError (missing) or URLError (offline)
        where = os.path.join(os.path.abspath(root), FOLDERS[name])
        how = ("the download failed" if download else "dataset.download=false")
        raise UserError(
            f"{name} not found in {where} and {how} ({type(e).__name__}: {e}); "
            f"if it is elsewhere, pass dataset.root=<the folder that holds {FOLDERS[name]}>; "
            f"else get it with dataset.download=true on a machine with internet, or fetch {URLS[name]} "
            f"and extract it into {os.path.abspath(root)}"
        ) from None
    return train.data, np.asarray(train.targets), test.data, np.asarray(test.targets)


def _build(name: str, *, root: str = "data", download: bool = True, val_fraction: float = 0.0,
           **kwargs: Any) -> DataBundle:
    """``val_fraction`` of the training images become a validation split (the leaderboard's)."""
    x_tr, y_tr, x_te, y_te = load_cifar_arrays(name, root, download)
    to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    mean, std = STATS[name]
    x_tr, y_tr, x_val, y_val = carve_validation(to_nchw(x_tr), torch.from_numpy(y_tr), val_fraction, 0)
    return tensor_bundle(
        x_tr, y_tr, to_nchw(x_te), torch.from_numpy(y_te), val_images=x_val, val_labels=y_val,
        num_classes=100 if name == "cifar100" else 10, mean=mean, std=std, **loader_kwargs(kwargs),
    )


@register_dataset("cifar10")
def build_cifar10(**kwargs: Any) -> DataBundle:
    return _build("cifar10", **kwargs)


@register_dataset("cifar100")
def build_cifar100(**kwargs: Any) -> DataBundle:
    return _build("cifar100", **kwargs)
