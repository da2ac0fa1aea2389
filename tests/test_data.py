"""CIFAR through torchvision's real loaders (files written in the real on-disk format),
the device-resident batch augmentation, digits and synthetic."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from esam.data import build_data
from esam.data.cifar import STATS
from esam.errors import UserError

N_PER_BATCH = 20


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar(root: Path, name: str, monkeypatch, rng: np.random.Generator) -> dict:
    """Write cifar-10-batches-py/ (or cifar-100-python/) pickles as the real archives hold them,
    and point torchvision's checksum lists at these files so its own integrity check passes."""
    expected = {}
    if name == "cifar10":
        folder, cls, label_key = root / "cifar-10-batches-py", torchvision.datasets.CIFAR10, "labels"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta = ["test_batch"], ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
        classes = 10
    else:
        folder, cls, label_key = root / "cifar-100-python", torchvision.datasets.CIFAR100, "fine_labels"
        train_files, test_files = ["train"], ["test"]
        meta = ("meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
        classes = 100
    folder.mkdir(parents=True)
    for split, files in (("train", train_files), ("test", test_files)):
        images, labels = [], []
        for fname in files:
            data = rng.integers(0, 256, (N_PER_BATCH, 3 * 32 * 32), dtype=np.uint8)
            lab = rng.integers(0, classes, N_PER_BATCH).tolist()
            _pickle(folder / fname, {"data": data, label_key: lab, "batch_label": fname})
            images.append(data.reshape(-1, 3, 32, 32))
            labels += lab
        expected[split] = (np.concatenate(images), np.array(labels))
    _pickle(folder / meta[0], meta[1])
    monkeypatch.setattr(cls, "train_list", [[f, _md5(folder / f)] for f in train_files])
    monkeypatch.setattr(cls, "test_list", [[f, _md5(folder / f)] for f in test_files])
    monkeypatch.setattr(cls, "meta", {"filename": meta[0], "key": list(meta[1])[0], "md5": _md5(folder / meta[0])})
    return expected


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_real_format_through_torchvision(tmp_path, monkeypatch, name):
    expected = write_cifar(tmp_path, name, monkeypatch, np.random.default_rng(0))
    n_train = len(expected["train"][1])
    data = build_data(name, root=str(tmp_path), download=False, batch_size=n_train, test_batch_size=1000)
    assert data.num_classes == (10 if name == "cifar10" else 100)
    assert (data.num_train, data.num_test, data.in_channels, data.image_size) == (n_train, N_PER_BATCH, 3, 32)
    # No augmentation: a test batch is exactly the normalised files, in file order.
    x, y = next(data.test.batches(0))
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in STATS[name])
    want = (torch.from_numpy(expected["test"][0]).float() / 255 - mean) / std
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, torch.from_numpy(expected["test"][1]))
    # Train batches are a permutation of the files' samples.
    x, y = next(data.train.batches(0))
    assert x.shape == (n_train, 3, 32, 32)
    assert sorted(y.tolist()) == sorted(expected["train"][1].tolist())


def test_cifar_augmentation_crop_flip_cutout(tmp_path, monkeypatch):
    expected = write_cifar(tmp_path, "cifar10", monkeypatch, np.random.default_rng(1))
    kw = dict(root=str(tmp_path), download=False, batch_size=100, test_batch_size=100, seed=3)
    plain = build_data("cifar10", **kw)
    aug = build_data("cifar10", augment={"crop_padding": 4, "flip": True, "cutout": 16}, **kw)
    mean, std = (torch.tensor(s).view(3, 1, 1) for s in STATS["cifar10"])
    images = torch.from_numpy(expected["train"][0])
    pad_value = (0 - mean) / std  # zero-padded pixels, normalised
    order = plain.train._local_indices(0)
    x, _ = next(aug.train.batches(0))
    matched_crops, flipped, cut = 0, 0, 0
    for i in range(x.shape[0]):
        src = (images[order[i]].float() / 255 - mean) / std
        padded = torch.nn.functional.pad(src - pad_value, (4, 4, 4, 4)) + pad_value
        cutout_zero = (x[i] == 0).all(0)
        cut += int(cutout_zero.any())
        # Some shift (and maybe a flip) of the padded image must reproduce every non-cut pixel.
        found = False
        for dy in range(9):
            for dx in range(9):
                crop = padded[:, dy:dy + 32, dx:dx + 32]
                for f, cand in ((0, crop), (1, crop.flip(2))):
                    if torch.allclose(x[i][:, ~cutout_zero], cand[:, ~cutout_zero], atol=1e-5):
                        found, flipped = True, flipped + f
                        break
                if found:
                    break
            if found:
                break
        matched_crops += found
        assert cutout_zero.sum() <= 16 * 16
    assert matched_crops == x.shape[0]
    assert 20 < flipped < 80  # about half flipped
    assert cut == x.shape[0]  # the centre is always inside the image, so some pixels are cut
    # Deterministic per (seed, epoch, batch); a new epoch draws anew.
    assert torch.equal(x, next(aug.train.batches(0))[0])
    assert not torch.equal(x, next(aug.train.batches(1))[0])


def test_missing_cifar_is_a_clear_user_error(tmp_path):
    with pytest.raises(UserError, match=r"cifar100 not found in .*cifar-100-python and dataset.download=false"):
        build_data("cifar100", root=str(tmp_path), download=False, batch_size=8, test_batch_size=8)


def test_digits_split_is_fixed_and_stratified():
    a = build_data("digits", batch_size=32, test_batch_size=1000, seed=0)
    b = build_data("digits", batch_size=32, test_batch_size=1000, seed=5)  # run seed must not move the split
    assert (a.num_train, a.num_test, a.image_size, a.in_channels) == (1437, 360, 8, 1)
    xa, ya = next(a.test.batches(0))
    xb, yb = next(b.test.batches(0))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.bincount(ya, minlength=10).min() >= 35  # stratified: every class ~36 times


def test_loader_resumes_at_any_batch_and_shards_over_ranks():
    kw = dict(num_train=96, num_test=16, batch_size=16, test_batch_size=16, seed=2,
              augment={"crop_padding": 4, "flip": True, "cutout": 8})
    full = list(build_data("synthetic", **kw).train.batches(3))
    tail = list(build_data("synthetic", **kw).train.batches(3, start=4))
    assert len(full) == 6 and len(tail) == 2
    for (xf, yf), (xt, yt) in zip(full[4:], tail):
        assert torch.equal(xf, xt) and torch.equal(yf, yt)
    ranks = [build_data("synthetic", **kw, rank=r, world_size=2).train for r in (0, 1)]
    assert len(ranks[0]) == len(full)  # same number of steps, half the samples each
    labels = [torch.cat([y for _, y in loader.batches(3)]) for loader in ranks]
    assert labels[0].shape[0] == labels[1].shape[0] == 48
    idx = [loader._local_indices(3) for loader in ranks]
    assert set(idx[0].tolist()).isdisjoint(idx[1].tolist())


@pytest.mark.parametrize("bs", [0, 100000])
def test_batch_size_outside_the_dataset_is_rejected(bs):
    with pytest.raises(UserError, match="batch_size"):
        build_data("digits", batch_size=bs, test_batch_size=100)


def test_channels_last_batches():
    data = build_data("synthetic", num_train=32, num_test=8, batch_size=8, test_batch_size=8, channels_last=True)
    x, _ = next(data.train.batches(0))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_cutout_prob_cuts_that_fraction_of_images():
    kw = dict(num_train=1000, num_test=8, batch_size=1000, test_batch_size=8, seed=0)
    half = build_data("synthetic", augment={"cutout": 16, "cutout_prob": 0.5}, **kw)
    every = build_data("synthetic", augment={"cutout": 16}, **kw)
    cut = lambda loader: (next(loader.batches(0))[0] == 0).flatten(1).any(1).float().mean().item()  # noqa: E731
    assert cut(every.train) == 1.0
    assert 0.4 < cut(half.train) < 0.6


def _digits_labels(**kw) -> tuple[torch.Tensor, torch.Tensor]:
    """All training and test labels of a digits build, in dataset order."""
    data = build_data("digits", batch_size=32, test_batch_size=1000, **kw)
    return data.train.labels.cpu(), next(data.test.batches(0))[1].cpu()


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_digits_label_noise_flips_exactly_that_fraction_of_training_labels(rate):
    clean_train, clean_test = _digits_labels()
    noisy_train, noisy_test = _digits_labels(label_noise=rate)
    flipped = noisy_train != clean_train
    assert flipped.sum().item() == round(rate * 1437)  # exactly, and every chosen label changed
    assert torch.equal(noisy_test, clean_test)  # test labels stay clean
    assert noisy_train.min() >= 0 and noisy_train.max() <= 9
    # Symmetric: the new labels spread over all the other classes, not one neighbour.
    assert len(set((noisy_train[flipped] - clean_train[flipped]).remainder(10).tolist())) == 9


def test_digits_label_noise_is_one_set_for_every_run_seed():
    a, _ = _digits_labels(label_noise=0.2, seed=0)
    b, _ = _digits_labels(label_noise=0.2, seed=7)  # the run seed must not move the noise
    assert torch.equal(a, b)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_digits_label_noise_outside_0_1_is_a_user_error(rate):
    with pytest.raises(UserError, match=r"dataset.label_noise=.* must be a fraction in \[0, 1\)"):
        build_data("digits", batch_size=32, test_batch_size=100, label_noise=rate)


@pytest.mark.parametrize("sweep", ["cpu_benchmark", "cpu_benchmark_sgd_tuned", "cpu_benchmark_budget"])
def test_cpu_benchmark_sweeps_compose_for_every_method_they_list(sweep):
    """Each job of `make reproduce-cpu` composes: the noisy task, and the searched rho / SGD lr."""
    from hydra import compose, initialize_config_dir

    from esam.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        params = compose("train", overrides=[f"+sweep={sweep}"], return_hydra_config=True).hydra.sweeper.params
        assert params.seed == "0,1,2,3,4"
        for method in params.optimizer.split(","):
            cfg = compose("train", overrides=[f"+sweep={sweep}", f"optimizer={method}"])
            assert (cfg.dataset.label_noise, cfg.trainer.epochs, cfg.experiment_name) == (0.4, 30, "cpu_benchmark")
            if sweep in ("cpu_benchmark", "cpu_benchmark_budget"):  # one sam.rho for every SAM radius
                assert cfg.optimizer.lr == 0.05 and cfg.optimizer.get("rho", 0.5) == (3.0 if method == "msam" else 0.5)
            if sweep == "cpu_benchmark_budget":
                assert params["trainer.budget"] == "10,20,40"
            if sweep == "cpu_benchmark_sgd_tuned":
                assert (cfg.optimizer.lr, cfg.optimizer.label) == (0.005, "sgd_lr0.005")
