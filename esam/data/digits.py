"""scikit-learn's bundled 8x8 digits: the embedded default that needs no download.

``label_noise`` turns it into a CPU-scale task where sharpness-aware training is known to
matter: symmetric label noise on the training set (SAM's robustness to noisy labels,
Foret et al. 2021, Sec. 4.3).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from esam.data.bundle import DataBundle, carve_validation, loader_kwargs, tensor_bundle
from esam.data.registry import register_dataset
from esam.errors import UserError

# The noisy label set is a property of the dataset, not of the run: a fixed seed (offset from the
# split seed so the two draws are unrelated) gives every method and every run seed the same flips.
NOISE_SEED_OFFSET = 1_000_003


NOISE_TYPES = ("symmetric", "pair")


def flip_labels(labels: np.ndarray, rate: float, num_classes: int, seed: int,
                noise_type: str = "symmetric") -> np.ndarray:
    """Label noise on exactly round(rate * n) labels, chosen uniformly. ``symmetric``: each is
    replaced by a uniformly drawn *other* class (so every chosen label really changes). ``pair``
    (class-dependent, Han et al. 2018's pair flipping): class c becomes c + 1 (mod C), so at
    rate < 0.5 the true class stays each class's majority label but one wrong class is frequent."""
    if not 0.0 <= rate < 1.0:
        raise UserError(f"dataset.label_noise={rate} must be a fraction in [0, 1)")
    if noise_type not in NOISE_TYPES:
        raise UserError(f"dataset.noise_type={noise_type!r} is not one of {', '.join(NOISE_TYPES)}")
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    chosen = rng.choice(len(labels), size=int(round(rate * len(labels))), replace=False)
    if noise_type == "pair":
        noisy[chosen] = (labels[chosen] + 1) % num_classes
        return noisy
    # Adding 1..C-1 modulo C is a uniform draw over the C-1 other classes.
    noisy[chosen] = (labels[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes
    return noisy


@register_dataset("digits")
def build_digits(*, test_size: float = 0.2, label_noise: float = 0.0, noise_type: str = "symmetric",
                 val_fraction: float = 0.0, split_seed: int = 0, **kwargs: Any) -> DataBundle:
    """1,797 grey 8x8 images, 10 classes; a stratified split fixed by ``split_seed``
    (independent of the run seed, so every run tests on the same images). ``label_noise`` flips
    that fraction of the training labels (test labels stay clean); then ``val_fraction`` of the
    training images (with their noisy labels) become the validation split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, data.target, test_size=test_size, random_state=split_seed, stratify=data.target
    )
    y_tr = flip_labels(y_tr, label_noise, 10, split_seed + NOISE_SEED_OFFSET, noise_type)
    # Flipped before the validation split is carved, so with val_fraction=0 the training set (and
    # its noisy labels) is the one results/cpu-benchmark trained on.
    x_tr, y_tr, x_val, y_val = carve_validation(torch.from_numpy(x_tr), torch.from_numpy(y_tr), val_fraction,
                                                split_seed)
    mean, std = float(x_tr.numpy().mean() / 255), float(x_tr.numpy().std() / 255)
    return tensor_bundle(
        x_tr, y_tr, torch.from_numpy(x_te), torch.from_numpy(y_te),
        num_classes=10, mean=(mean,), std=(std,), val_images=x_val, val_labels=y_val, **loader_kwargs(kwargs),
    )
