"""MNIST-1D (Greydanus & Kobak, ICML 2024): 1-D signals of length 40, 10 classes, generated from
the `mnist1d` package's own ten templates (translation, scaling, shear, correlated and iid
noise), so nothing is downloaded. A task not derived from images of digits' pixels, small
enough for a CPU run in seconds, on which an MLP and a CNN differ clearly.

The package's ``get_dataset`` downloads a pickle by default; ``make_dataset`` is its generator,
called here with its default arguments (``get_dataset_args``: 5,000 samples, 4,000 train /
1,000 test, seed 42), which reproduces the published set.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from esam.data.bundle import DataBundle, carve_validation, loader_kwargs, tensor_bundle
from esam.data.registry import register_dataset
from esam.data.digits import NOISE_SEED_OFFSET, flip_labels

# The loaders hold uint8: the standardised signals (std 1) are stored as round(x * SCALE) + 128,
# a step of 1/32 std (the generator's own iid noise is 0.02 std), clipped at +-4 std.
SCALE = 32.0


@functools.lru_cache(maxsize=4)
def generate(num_samples: int = 5000, data_seed: int = 42) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) as the package generates them (~3 s; cached per process).
    The generator seeds NumPy's global state; it is put back so the run's own draws are untouched."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, data_seed
    state = np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def to_uint8(x: np.ndarray) -> torch.Tensor:
    """Float signals (N x 40) -> uint8 images N x 1 x 1 x 40 for the tensor loaders."""
    q = np.clip(np.round(x * SCALE) + 128.0, 0, 255).astype(np.uint8)
    return torch.from_numpy(q[:, None, None, :].copy())


@register_dataset("mnist1d")
def build_mnist1d(*, num_samples: int = 5000, data_seed: int = 42, label_noise: float = 0.0,
                  noise_type: str = "symmetric", val_fraction: float = 0.0, split_seed: int = 0,
                  **kwargs: Any) -> DataBundle:
    """The package's train/test split (80/20); ``label_noise`` flips that fraction of the training
    labels (test labels clean), then ``val_fraction`` of the training set becomes validation."""
    x_tr, y_tr, x_te, y_te = generate(num_samples, data_seed)
    y_tr = flip_labels(np.asarray(y_tr), label_noise, 10, split_seed + NOISE_SEED_OFFSET, noise_type)
    x_tr, y_tr, x_val, y_val = carve_validation(to_uint8(x_tr), torch.from_numpy(y_tr), val_fraction, split_seed)
    mean, std = float(x_tr.numpy().mean() / 255), float(x_tr.numpy().std() / 255)
    return tensor_bundle(
        x_tr, y_tr, to_uint8(x_te), torch.from_numpy(np.asarray(y_te)),
        num_classes=10, mean=(mean,), std=(std,), val_images=x_val, val_labels=y_val, **loader_kwargs(kwargs),
    )
