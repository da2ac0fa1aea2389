"""ImageNet (or any class-folder dataset) read from disk by torchvision's ImageFolder.

It does not fit in memory, so worker processes decode and crop JPEGs into uint8
tensors; the loader moves each batch to the device and normalises it there (a
quarter of float32's bytes cross the bus), as timm's PrefetchLoader does. Order and
augmentation are pure functions of (seed, epoch, sample), like TensorLoader's, so a
run resumed mid-epoch sees the same batches whatever ``num_workers`` is.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from esam.data.bundle import DataBundle, check_batch_sizes
from esam.data.registry import register_dataset
from esam.data.tensor_loader import Augment, ShardedEpochs, _generator
from esam.errors import UserError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LAYOUT = (
    "lay it out as <root>/train/<class>/<image>.JPEG and <root>/val/<class>/<image>.JPEG with the "
    "same class folders (the 1000 wnids; sort the validation images into them, e.g. with "
    "pytorch/examples' imagenet/extract_ILSVRC.sh) and pass dataset.root=<root>"
)


def train_transform(image_size: int, flip: bool = True) -> Callable:
    """Random-resized crop (scale 0.08-1) and horizontal flip, to a uint8 CHW tensor."""
    from torchvision import transforms as T

    steps = [T.RandomResizedCrop(image_size)] + ([T.RandomHorizontalFlip()] if flip else [])
    return T.Compose(steps + [T.PILToTensor()])


def eval_transform(image_size: int) -> Callable:
    """Resize the short side to image_size * 256/224, centre crop, to a uint8 CHW tensor."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), T.PILToTensor()])


class SeededFolder(Dataset):
    """An ImageFolder indexed by ``(index, rng_seed)``: the transform's random draws come from that seed."""

    def __init__(self, folder: Any, transform: Callable) -> None:
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, rng_seed = key
        path, label = self.folder.samples[index]
        image = self.folder.loader(path)
        # torchvision's transforms draw from the global RNG; forking it leaves the training
        # process's own stream (dropout, ...) untouched when num_workers=0.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng_seed)
            return self.transform(image), label


class FolderLoader(ShardedEpochs):
    """Batches of normalised float images from a :class:`SeededFolder`, with TensorLoader's protocol.

    ``batch_size`` is the global batch; each of ``world_size`` ranks takes
    ``batch_size // world_size`` samples of a shared permutation (DistributedSampler-like).
    """

    def __init__(
        self,
        dataset: SeededFolder,
        *,
        batch_size: int,
        train: bool,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        mean: tuple[float, ...] = MEAN,
        std: tuple[float, ...] = STD,
    ) -> None:
        self._init_sharding(len(dataset), batch_size=batch_size, train=train, seed=seed, drop_last=drop_last,
                            device=device, channels_last=channels_last, rank=rank, world_size=world_size,
                            mean=mean, std=std)
        self.dataset, self.num_workers = dataset, num_workers
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory

    def batches(self, epoch: int = 0, start: int = 0, *, with_indices: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield (images, labels) on the device, from batch ``start`` of ``epoch``; with
        ``with_indices``, (images, labels, dataset indices) (int64, on the device; SAF needs them)."""
        if start >= len(self):
            return
        order = self._local_indices(epoch) if with_indices else None
        loader = DataLoader(
            self.dataset, batch_sampler=self._batch_keys(epoch, start), num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Its own generator for the workers' base seed, which would otherwise be drawn
            # from (and advance) the global stream that dropout and the model init use.
            generator=_generator(self.seed, epoch, 3),
        )
        # The DataLoader yields the batches in _batch_keys' order, whatever num_workers is.
        for b, (images, labels) in enumerate(loader, start):
            x = self._normalise(images.to(self.device, non_blocking=True))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels.to(self.device, torch.int64, non_blocking=True)
            if order is None:
                yield x, y
            else:
                ids = order[b * self.local_batch : (b + 1) * self.local_batch]
                yield x, y, ids.to(self.device, non_blocking=True)

    def _batch_keys(self, epoch: int, start: int) -> Iterator[list[tuple[int, int]]]:
        # Lazily: an ImageNet epoch has 1.28M keys. Each sample's augmentation seed depends
        # only on (seed, epoch, sample), not on rank, batch size or worker count.
        order = self._local_indices(epoch).tolist()
        for b in range(start, len(self)):
            chunk = order[b * self.local_batch : (b + 1) * self.local_batch]
            yield [(i, _sample_seed(self.seed, epoch, i) if self.train else 0) for i in chunk]


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # hash() of a tuple of ints is stable across processes, as in tensor_loader._generator.
    return hash((seed, epoch, index, 2)) & 0x7FFF_FFFF_FFFF_FFFF


def load_folders(root: str) -> tuple[Any, Any]:
    """(train, val) ImageFolders under ``root``, or a UserError saying what is wrong and how to fix it."""
    from torchvision.datasets import ImageFolder

    where = os.path.abspath(root)
    missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(where, s))]
    if missing:
        raise UserError(
            f"ImageNet not found: no {' or '.join(missing)} folder in {where} "
            f"(it cannot be downloaded automatically); {LAYOUT}"
        )
    folders = []
    for split in ("train", "val"):
        try:
            folders.append(ImageFolder(os.path.join(where, split)))
        except FileNotFoundError as e:  # no class folders, or class folders without images
            raise UserError(f"ImageNet folder {os.path.join(where, split)} is malformed ({e}); {LAYOUT}") from None
    train, val = folders
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise UserError(
            f"ImageNet in {where}: train/ has {len(train.classes)} class folders and val/ has "
            f"{len(val.classes)}, which differ (only in train: {only_train}, only in val: {only_val}); {LAYOUT}"
        )
    return train, val


@register_dataset("imagenet")
def build_imagenet(
    *,
    root: str = "data/imagenet",
    batch_size: int = 256,
    test_batch_size: int = 512,
    image_size: int = 224,
    num_workers: int = 8,
    augment: dict | Augment | None = None,
    seed: int = 0,
    drop_last: bool = False,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool | None = None,
    **_: Any,
) -> DataBundle:
    """ImageNet from ``root``/train and ``root``/val class folders; train crops at ``image_size``."""
    if isinstance(augment, dict):
        augment = Augment(**augment)
    augment = augment or Augment(flip=True)
    if augment.crop_padding or augment.cutout:
        raise UserError(
            "dataset.augment.crop_padding and dataset.augment.cutout are CIFAR augmentations; "
            "for imagenet set them to 0 (it uses random-resized crops and dataset.augment.flip)"
        )
    train_folder, val_folder = load_folders(root)
    test_bs = check_batch_sizes(batch_size, test_batch_size, len(train_folder.samples),
                                len(val_folder.samples), world_size)
    common = dict(seed=seed, device=device, channels_last=channels_last, rank=rank,
                  world_size=world_size, num_workers=num_workers, pin_memory=pin_memory)
    train = FolderLoader(SeededFolder(train_folder, train_transform(image_size, augment.flip)),
                         batch_size=batch_size, train=True, drop_last=drop_last, **common)
    test = FolderLoader(SeededFolder(val_folder, eval_transform(image_size)),
                        batch_size=test_bs, train=False, **common)
    return DataBundle(train, test, num_classes=len(train_folder.classes), in_channels=3,
                      image_size=image_size, num_train=len(train_folder.samples),
                      num_test=len(val_folder.samples))
