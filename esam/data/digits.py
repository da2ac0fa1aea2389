"""scikit-learn's bundled 8x8 digits: the embedded default that needs no download."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from esam.data import DataBundle, loader_kwargs, register_dataset, tensor_bundle


@register_dataset("digits")
def build_digits(*, test_size: float = 0.2, split_seed: int = 0, **kwargs: Any) -> DataBundle:
    """1,797 grey 8x8 images, 10 classes; a stratified split fixed by ``split_seed``
    (independent of the run seed, so every run tests on the same images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, data.target, test_size=test_size, random_state=split_seed, stratify=data.target
    )
    mean, std = float(x_tr.mean() / 255), float(x_tr.std() / 255)
    return tensor_bundle(
        torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te),
        num_classes=10, mean=(mean,), std=(std,), **loader_kwargs(kwargs),
    )
