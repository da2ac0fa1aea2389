"""``loader.batches(epoch, start, with_indices=True)``: each batch's dataset indices (SAF's memory
is indexed by them), for the in-memory TensorLoader and the ImageNet FolderLoader; off by default."""
from __future__ import annotations

import os

import pytest
import torch

from esam.data.tensor_loader import Augment, TensorLoader
from helpers.imagenet import build, identities

N = 23  # not a multiple of the batch: the last batch is short


def tensor_loader(**kw) -> TensorLoader:
    # Image i is filled with the value i: its index can be read back from its pixels.
    images = torch.arange(N, dtype=torch.uint8).view(N, 1, 1, 1).expand(N, 1, 4, 4).contiguous()
    labels = torch.arange(N) % 3
    args = dict(batch_size=4, mean=(0.0,), std=(1 / 255,), train=True, seed=5)
    return TensorLoader(images, labels, **{**args, **kw})


def test_tensor_loader_indices_name_the_rows_of_each_batch():
    loader = tensor_loader()
    for epoch in (0, 1):
        seen = []
        for x, y, ids in loader.batches(epoch, with_indices=True):
            assert ids.dtype == torch.int64 and ids.device == x.device and ids.shape == y.shape
            assert torch.equal(x[:, 0, 0, 0].round().long(), ids)   # the pixels say which image
            assert torch.equal(y, ids % 3)
            seen += ids.tolist()
        assert sorted(seen) == list(range(N))  # every sample once per epoch


def test_indices_are_opt_in_and_change_nothing_else():
    loader = tensor_loader(augment=Augment(crop_padding=1, flip=True, cutout=2))
    plain = list(loader.batches(3, 2))
    assert all(len(b) == 2 for b in plain)  # the default is what every consumer gets today
    with_ids = list(loader.batches(3, 2, with_indices=True))
    assert len(plain) == len(with_ids)
    for (x, y), (x2, y2, ids) in zip(plain, with_ids):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # A resumed epoch gives the same indices as the tail of the whole epoch.
    whole = [ids for _, _, ids in loader.batches(3, with_indices=True)]
    for a, b in zip(whole[2:], [ids for *_, ids in with_ids]):
        assert torch.equal(a, b)


def test_ranks_indices_split_the_epoch():
    shares = [[i for *_, ids in tensor_loader(rank=r, world_size=2).batches(1, with_indices=True)
               for i in ids.tolist()] for r in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert len(shares[0]) == len(shares[1]) == N // 2


def _identity(folder, i: int) -> tuple[int, int]:
    path, label = folder.samples[i]
    return label, int(os.path.basename(path).split("_")[1].split(".")[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_loader_indices_name_the_images_of_each_batch(imagenet_root, workers):  # noqa: F811
    train = build(imagenet_root, num_workers=workers).train
    folder = train.dataset.folder
    for start in (0, 2):
        batches = list(train.batches(1, start, with_indices=True))
        assert len(batches) == len(train) - start
        for x, y, ids in batches:
            assert ids.dtype == torch.int64 and ids.shape == y.shape
            assert identities(x) == [_identity(folder, i) for i in ids.tolist()]
            assert y.tolist() == [folder.samples[i][1] for i in ids.tolist()]
    plain = list(train.batches(1))
    assert all(len(b) == 2 for b in plain)
    for (x, y), (x2, y2, _) in zip(plain, train.batches(1, with_indices=True)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
