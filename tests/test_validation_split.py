"""The validation split (dataset.val_fraction) and pair-flip label noise: what the leaderboard
selects on, carved from the training data, never from the test set."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from esam.data import build_data, carve_validation
from esam.data.bundle import VAL_SEED_OFFSET
from esam.data.digits import flip_labels
from esam.errors import UserError


def test_carve_validation_holds_out_exactly_that_share_disjointly_and_deterministically():
    x = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    y = torch.arange(100) % 10
    xt, yt, xv, yv = carve_validation(x, y, 0.25, seed=3)
    assert (len(xt), len(xv)) == (75, 25)
    ids_t, ids_v = set(xt.flatten().tolist()), set(xv.flatten().tolist())
    assert not ids_t & ids_v and len(ids_t | ids_v) == 100       # a partition of the training set
    assert torch.equal(yv, xv.flatten().long() % 10)              # labels travel with their images
    expected = torch.randperm(100, generator=torch.Generator().manual_seed(3 + VAL_SEED_OFFSET))[:25].sort().values
    assert xv.flatten().tolist() == expected.tolist()
    assert torch.equal(carve_validation(x, y, 0.25, seed=3)[2], xv)  # the same draw every time


def test_val_fraction_outside_0_1_is_a_user_error():
    with pytest.raises(UserError, match=r"dataset.val_fraction=1.0 must be a fraction in \[0, 1\)"):
        build_data("digits", batch_size=32, test_batch_size=100, val_fraction=1.0)


def test_digits_validation_comes_from_the_training_set_with_its_noisy_labels():
    full = build_data("digits", batch_size=32, test_batch_size=2000, label_noise=0.4)
    split = build_data("digits", batch_size=32, test_batch_size=2000, label_noise=0.4, val_fraction=0.2)
    assert (split.num_train, split.num_val, split.num_test) == (1437 - 287, 287, 360)
    assert full.val is None and full.num_val == 0
    # Every training + validation image is one of the full training set's, with the same (noisy) label;
    # the test set is untouched.
    key = lambda imgs, labels: {(bytes(i.flatten().tolist()), int(l)) for i, l in zip(imgs, labels)}  # noqa: E731
    whole = key(full.train.images, full.train.labels)
    assert key(split.train.images, split.train.labels) | key(split.val.images, split.val.labels) == whole
    assert torch.equal(next(split.test.batches(0))[1], next(full.test.batches(0))[1])


def test_digits_without_val_fraction_is_the_training_set_it_was():
    """val_fraction=0 keeps results/cpu-benchmark's data: same images, labels and normalisation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    imgs = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    x_tr, _, y_tr, _ = train_test_split(imgs, d.target, test_size=0.2, random_state=0, stratify=d.target)
    data = build_data("digits", batch_size=32, test_batch_size=100)
    assert torch.equal(data.train.images, torch.from_numpy(x_tr)) and torch.equal(data.train.labels, torch.from_numpy(y_tr))
    assert data.train.mean.flatten().item() == pytest.approx(float(x_tr.mean()), rel=1e-6)


def test_pair_noise_moves_exactly_that_share_of_labels_to_the_next_class():
    labels = np.repeat(np.arange(10), 50)
    noisy = flip_labels(labels, 0.4, 10, seed=5, noise_type="pair")
    moved = noisy != labels
    assert moved.sum() == 200
    assert np.all(noisy[moved] == (labels[moved] + 1) % 10)


def test_unknown_noise_type_is_a_user_error():
    with pytest.raises(UserError, match="dataset.noise_type='uniform' is not one of symmetric, pair"):
        flip_labels(np.arange(10), 0.2, 10, seed=0, noise_type="uniform")


def test_trainer_logs_validation_metrics_beside_test(tmp_path, compose_train):
    """val_acc is the accuracy of the model on the validation split (checked by hand after training)."""
    from esam.engine import Trainer

    cfg = compose_train(["dataset=digits", "dataset.val_fraction=0.2", "model=mlp", "trainer.epochs=1",
                         "trainer.progress=false", "trainer.precision=fp32", "trainer.checkpoint_every=0"])
    trainer = Trainer(cfg, tmp_path)
    summary = trainer.fit()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_acc", "val_loss", "test_acc"} <= set(line)
    assert summary["val_acc_final"] == line["val_acc"]
    val = trainer.run.data.val
    x, y = next(val.batches(0))
    assert len(y) == 287  # one batch: the whole split
    with torch.no_grad():
        acc = 100.0 * (trainer.model.eval()(x).argmax(1) == y).double().mean().item()
    assert line["val_acc"] == pytest.approx(acc)
