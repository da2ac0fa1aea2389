"""A loader for datasets that fit in device memory (CIFAR, digits, synthetic).

Images are kept on the training device as uint8 and augmented a whole batch at a
time (random crop with zero padding, horizontal flip, Cutout), as in
KellerJordan/cifar10-airbench: on a 2-core CPU per-sample PIL transforms would
be the bottleneck, and on a GPU they starve it.

Order and augmentation are pure functions of (seed, epoch, batch index, rank),
so a run resumed mid-epoch sees exactly the batches it would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class Augment:
    crop_padding: int = 0  # random crop back to the input size after zero-padding by this much
    flip: bool = False     # random horizontal flip
    cutout: int = 0        # side of the square zeroed (after normalisation) at a random centre
    cutout_prob: float = 1.0  # chance per image (DeVries & Taylor: 1; davda54/sam's Cutout(): 0.5)


def _generator(*key: int) -> torch.Generator:
    # hash() of a tuple of ints is stable across processes (no hash randomisation for ints).
    return torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)


def shard_order(num_samples: int, *, epoch: int, seed: int, train: bool, rank: int = 0,
                world_size: int = 1) -> torch.Tensor:
    """Sample indices this rank visits in ``epoch``: a (seed, epoch) permutation for training,
    file order for evaluation; under DDP every rank takes every world_size-th of them."""
    order = torch.randperm(num_samples, generator=_generator(seed, epoch)) if train else torch.arange(num_samples)
    if world_size > 1:
        if train:  # equal shares so every rank runs the same number of steps
            order = order[: num_samples - num_samples % world_size]
        order = order[rank::world_size]
    return order


def count_batches(num_samples: int, *, local_batch: int, train: bool, drop_last: bool, rank: int = 0,
                  world_size: int = 1) -> int:
    """Batches per epoch on one rank, consistent with :func:`shard_order`."""
    if train:
        local = (num_samples - num_samples % world_size) // world_size
    else:
        local = len(range(rank, num_samples, world_size))
    return local // local_batch if drop_last else -(-local // local_batch)


class ShardedEpochs:
    """What every loader shares: its sharding settings, the order and length of an epoch
    (the same for every dataset, so all resume alike), and normalisation on the device."""

    def _init_sharding(self, num_samples: int, *, batch_size: int, train: bool, seed: int, drop_last: bool,
                       device: torch.device | str, channels_last: bool, rank: int, world_size: int,
                       mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must divide evenly over {world_size} processes")
        self.num_samples, self.train, self.seed = num_samples, train, seed
        self.batch_size, self.local_batch = batch_size, batch_size // world_size
        self.drop_last, self.channels_last = drop_last, channels_last
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images on the device -> float, per-channel normalised."""
        return (x.float() - self.mean) / self.std

    def __iter__(self):
        return self.batches(0)

    def _local_indices(self, epoch: int) -> torch.Tensor:
        return shard_order(self.num_samples, epoch=epoch, seed=self.seed, train=self.train,
                           rank=self.rank, world_size=self.world_size)

    def __len__(self) -> int:
        return count_batches(self.num_samples, local_batch=self.local_batch, train=self.train,
                             drop_last=self.drop_last, rank=self.rank, world_size=self.world_size)


class TensorLoader(ShardedEpochs):
    """Batches of normalised float images from uint8 NCHW ``images`` and int64 ``labels``.

    ``batch_size`` is the global batch; under DDP (``world_size`` > 1) each rank
    takes ``batch_size // world_size`` samples of a shared permutation.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool,
        augment: Augment | None = None,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("TensorLoader wants uint8 images shaped N x C x H x W")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > images.shape[0]:
            raise ValueError(
                f"batch_size={batch_size} is larger than the dataset ({images.shape[0]} samples)"
            )
        self._init_sharding(images.shape[0], batch_size=batch_size, train=train, seed=seed,
                            drop_last=drop_last, device=device, channels_last=channels_last, rank=rank,
                            world_size=world_size, mean=mean, std=std)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.augment = augment if (train and augment is not None) else Augment()
        pad = self.augment.crop_padding
        if pad:  # pad once; each batch then gathers its crops from this
            self.padded = torch.nn.functional.pad(self.images, (pad, pad, pad, pad))

    def batches(self, epoch: int = 0, start: int = 0, *, with_indices: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield (images, labels) on the device, from batch ``start`` of ``epoch``; with
        ``with_indices``, (images, labels, dataset indices) (int64, on the device; SAF needs them)."""
        order = self._local_indices(epoch)
        for b in range(start, len(self)):
            idx = order[b * self.local_batch : (b + 1) * self.local_batch].to(self.device)
            x, y = self._make_batch(idx, epoch, b), self.labels[idx]
            yield (x, y, idx) if with_indices else (x, y)

    def _make_batch(self, idx: torch.Tensor, epoch: int, b: int) -> torch.Tensor:
        aug, n = self.augment, idx.shape[0]
        g = _generator(self.seed, epoch, b, self.rank, 1)
        if aug.crop_padding:
            h, w = self.images.shape[2:]
            p = aug.crop_padding
            dy = torch.randint(0, 2 * p + 1, (n,), generator=g).to(self.device)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=g).to(self.device)
            rows = (dy[:, None] + torch.arange(h, device=self.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=self.device))[:, None, None, :]
            chans = torch.arange(self.images.shape[1], device=self.device)[None, :, None, None]
            x = self.padded[idx[:, None, None, None], chans, rows, cols]
        else:
            x = self.images[idx]
        if aug.flip:
            flip = (torch.rand(n, generator=g) < 0.5).to(self.device)[:, None, None, None]
            x = torch.where(flip, x.flip(3), x)
        x = self._normalise(x)
        if aug.cutout and aug.cutout_prob > 0:
            x = x * self._cutout_mask(n, x.shape[2], x.shape[3], aug.cutout, aug.cutout_prob, g)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _cutout_mask(self, n: int, h: int, w: int, size: int, prob: float, g: torch.Generator) -> torch.Tensor:
        # Centre anywhere in the image, square clipped at the border (DeVries & Taylor, 2017).
        cy = torch.randint(0, h, (n,), generator=g).to(self.device)[:, None, None]
        cx = torch.randint(0, w, (n,), generator=g).to(self.device)[:, None, None]
        ys = torch.arange(h, device=self.device)[None, :, None]
        xs = torch.arange(w, device=self.device)[None, None, :]
        lo, hi = -(size // 2), size - size // 2  # size 16: rows cy-8 .. cy+7
        inside = ((ys - cy) >= lo) & ((ys - cy) < hi) & ((xs - cx) >= lo) & ((xs - cx) < hi)
        if prob < 1:
            inside &= (torch.rand(n, generator=g) < prob).to(self.device)[:, None, None]
        return (~inside).unsqueeze(1).float()
