"""ImageNet folder loading through the real ImageFolder pipeline, on tiny generated JPEGs (helpers/imagenet.py)."""
from __future__ import annotations

import os

import pytest
import torch

from esam.data.imagenet import MEAN, STD
from esam.errors import UserError
from helpers.imagenet import TRAIN_PER_CLASS, VAL_PER_CLASS, build, identities, write_image

def epoch_batches(loader, epoch: int = 0, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.batches(epoch, start))


def test_bundle_shapes_labels_and_normalisation(imagenet_root):
    data = build(imagenet_root)
    assert (data.num_classes, data.in_channels, data.image_size) == (3, 3, 32)
    assert (data.num_train, data.num_test) == (15, 6)
    assert (len(data.train), len(data.test)) == (4, 2)  # ceil(15/4), ceil(6/4)

    val = epoch_batches(data.test)
    images = torch.cat([x for x, _ in val])
    labels = torch.cat([y for _, y in val])
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    # Validation is in folder order and every label matches the image it came with.
    assert identities(images) == [(label, i) for label in range(3) for i in range(VAL_PER_CLASS)]
    assert labels.tolist() == [label for label, _ in identities(images)]
    # Normalised with ImageNet's statistics: a uniform red of 30 maps to (30/255 - 0.485) / 0.229.
    red = images[0, 0].mean().item()
    assert red == pytest.approx((30 / 255 - MEAN[0]) / STD[0], abs=0.03)

    train = epoch_batches(data.train)
    assert [x.shape[0] for x, _ in train] == [4, 4, 4, 3]
    seen = [ident for x, _ in train for ident in identities(x)]
    assert sorted(seen) == [(label, i) for label in range(3) for i in range(TRAIN_PER_CLASS)]
    assert all(y.tolist() == [label for label, _ in identities(x)] for x, y in train)


def test_drop_last_and_channels_last(imagenet_root):
    data = build(imagenet_root, drop_last=True, channels_last=True)
    batches = epoch_batches(data.train)
    assert len(data.train) == len(batches) == 3
    assert all(x.shape == (4, 3, 32, 32) for x, _ in batches)
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)


def test_order_and_augmentation_are_determined_by_seed_and_epoch(imagenet_root):
    first, again = build(imagenet_root).train, build(imagenet_root).train
    for epoch in (0, 1):
        for (x1, y1), (x2, y2) in zip(epoch_batches(first, epoch), epoch_batches(again, epoch), strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)

    order = lambda loader, epoch: [i for x, _ in epoch_batches(loader, epoch) for i in identities(x)]  # noqa: E731
    assert order(first, 0) != order(first, 1)
    assert order(first, 0) != order(build(imagenet_root, seed=1).train, 0)

    # The crops and flips are redrawn each epoch: the same image is augmented differently.
    def by_identity(epoch: int) -> dict:
        return {i: x for xs, _ in epoch_batches(first, epoch) for i, x in zip(identities(xs), xs)}

    epoch0, epoch1 = by_identity(0), by_identity(1)
    assert sum(not torch.equal(epoch0[i], epoch1[i]) for i in epoch0) >= len(epoch0) - 1


def test_loading_leaves_the_global_random_stream_alone(imagenet_root):
    loader = build(imagenet_root).train
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    epoch_batches(loader)
    assert torch.equal(torch.rand(3), expected)  # dropout etc. draw the same with or without data


def test_resume_at_start_yields_the_rest_of_the_epoch(imagenet_root):
    loader = build(imagenet_root).train
    full = epoch_batches(loader, epoch=3)
    rest = epoch_batches(loader, epoch=3, start=2)
    assert len(rest) == len(full) - 2
    for (x1, y1), (x2, y2) in zip(full[2:], rest, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert epoch_batches(loader, epoch=3, start=len(loader)) == []


def test_worker_processes_give_the_same_batches(imagenet_root):
    in_process = epoch_batches(build(imagenet_root).train, epoch=1)
    in_workers = epoch_batches(build(imagenet_root, num_workers=2).train, epoch=1)
    for (x1, y1), (x2, y2) in zip(in_process, in_workers, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_ranks_split_each_epoch_into_disjoint_equal_shares(imagenet_root):
    ranks = [build(imagenet_root, world_size=2, rank=r).train for r in (0, 1)]
    shares = [[i for x, _ in epoch_batches(loader, 1) for i in identities(x)] for loader in ranks]
    assert all(loader.local_batch == 2 and len(loader) == 4 for loader in ranks)  # 7 samples each
    assert len(shares[0]) == len(shares[1]) == 7
    assert not set(shares[0]) & set(shares[1])
    # Together the ranks see what one process would, in the same interleaved order.
    single = [i for x, _ in epoch_batches(build(imagenet_root).train, 1) for i in identities(x)]
    assert [i for pair in zip(*shares) for i in pair] == single[:14]


def test_missing_folders_name_the_place_and_the_layout(tmp_path):
    with pytest.raises(UserError, match="no train or val folder in .*lay it out as <root>/train/<class>"):
        build(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "train" / "n01")
    with pytest.raises(UserError, match=f"no val folder in {tmp_path}"):
        build(str(tmp_path))


def test_malformed_folders_are_a_user_error(tmp_path, imagenet_root):
    # Images directly in train/ (no class folders).
    for split in ("train", "val"):
        os.makedirs(tmp_path / "flat" / split)
        write_image(str(tmp_path / "flat" / split / "a.JPEG"), 0, 0, (32, 32))
    with pytest.raises(UserError, match="flat/train is malformed"):
        build(str(tmp_path / "flat"))
    # Class folders without any image.
    for split in ("train", "val"):
        os.makedirs(tmp_path / "empty" / split / "n01")
    with pytest.raises(UserError, match="empty/train is malformed"):
        build(str(tmp_path / "empty"))
    # val/ with a class train/ does not have.
    os.symlink(os.path.join(imagenet_root, "train"), tmp_path / "train")
    os.makedirs(tmp_path / "val" / "n99")
    write_image(str(tmp_path / "val" / "n99" / "a.JPEG"), 0, 0, (32, 32))
    with pytest.raises(UserError, match=r"only in val: \['n99'\]"):
        build(str(tmp_path))


def test_bad_settings_are_user_errors(imagenet_root):
    with pytest.raises(UserError, match="crop_padding"):
        build(imagenet_root, augment={"crop_padding": 4, "flip": True, "cutout": 0})
    with pytest.raises(UserError, match="batch_size=16 must be between 1 and the training set size"):
        build(imagenet_root, batch_size=16)
    with pytest.raises(UserError, match="batch_size=3 must divide evenly over the 2 processes"):
        build(imagenet_root, batch_size=3, world_size=2)
