"""What every dataset builder returns, and the helpers they share to build it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from esam.data.tensor_loader import Augment, TensorLoader
from esam.errors import UserError


@dataclass
class DataBundle:
    train: Any
    test: Any
    num_classes: int
    in_channels: int
    image_size: int
    num_train: int
    num_test: int
    val: Any = None              # a validation split carved from the training data (val_fraction > 0)
    num_val: int = 0


LOADER_KEYS = ("batch_size", "test_batch_size", "augment", "seed", "drop_last", "device",
               "channels_last", "rank", "world_size")


def loader_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The part of a dataset config the loaders use (builders take the rest)."""
    return {k: kwargs[k] for k in LOADER_KEYS if k in kwargs}


# The validation split is a property of the dataset, like the split seed's test set: one fixed
# draw (offset from the split seed, unrelated to the noise draw) for every method and run seed.
VAL_SEED_OFFSET = 2_000_029


def carve_validation(images: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, val images, val labels): exactly round(fraction * n) training
    samples, drawn uniformly by ``seed + VAL_SEED_OFFSET``, become the validation split. They keep
    the labels they have (noisy ones stay noisy: a user with noisy training labels has no clean
    ones to validate on). ``fraction`` 0 returns empty validation tensors."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"dataset.val_fraction={fraction} must be a fraction in [0, 1)")
    n_val = int(round(fraction * images.shape[0]))
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed + VAL_SEED_OFFSET))
    val, train = order[:n_val].sort().values, order[n_val:].sort().values
    return images[train], labels[train], images[val], labels[val]


def check_batch_sizes(batch_size: int, test_batch_size: int, num_train: int, num_test: int,
                      world_size: int = 1) -> int:
    """Fail early on a batch the data cannot fill; return the evaluation batch size to use."""
    if batch_size < 1 or batch_size > num_train:
        raise UserError(f"dataset.batch_size={batch_size} must be between 1 and the training set size ({num_train})")
    if batch_size % world_size:
        raise UserError(f"dataset.batch_size={batch_size} must divide evenly over the {world_size} processes")
    test_bs = min(test_batch_size, num_test)
    return max(world_size, test_bs - test_bs % world_size)  # divisible over the ranks


def tensor_bundle(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int,
    test_batch_size: int,
    augment: dict | Augment | None = None,
    seed: int = 0,
    drop_last: bool = False,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    val_images: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
) -> DataBundle:
    """Wrap in-memory uint8 tensors into train/test (and validation, if given and non-empty)
    :class:`TensorLoader` s."""
    if isinstance(augment, dict):
        augment = Augment(**augment)
    test_bs = check_batch_sizes(batch_size, test_batch_size, train_images.shape[0], test_images.shape[0],
                                world_size)
    common = dict(mean=mean, std=std, device=device, channels_last=channels_last,
                  rank=rank, world_size=world_size, seed=seed)
    test_bs = min(test_batch_size, test_images.shape[0])
    test_bs = max(world_size, test_bs - test_bs % world_size)  # divisible over the ranks
    train = TensorLoader(train_images, train_labels, batch_size=batch_size, train=True,
                         augment=augment, drop_last=drop_last, **common)
    test = TensorLoader(test_images, test_labels, batch_size=test_bs,
                        train=False, **common)
    val = None
    if val_images is not None and val_images.shape[0] > 0:
        val = TensorLoader(val_images, val_labels, batch_size=max(world_size, min(test_bs, val_images.shape[0])),
                           train=False, **common)
    return DataBundle(train, test, num_classes, train_images.shape[1], train_images.shape[-1],
                      train_images.shape[0], test_images.shape[0], val=val,
                      num_val=0 if val is None else val_images.shape[0])
