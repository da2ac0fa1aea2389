"""MNIST-1D from the mnist1d package's own generator: no download, the published split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from esam.data import build_data
from esam.data import mnist1d


@pytest.fixture(scope="module")
def data():
    return build_data("mnist1d", batch_size=64, test_batch_size=1000, val_fraction=0.2)


def test_mnist1d_needs_no_network(monkeypatch):
    import requests

    def refuse(*a, **k):
        raise AssertionError("mnist1d tried the network")

    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(requests, "request", refuse)
    x_tr, y_tr, x_te, y_te = mnist1d.generate(num_samples=500)  # not cached: generated here
    assert x_tr.shape == (400, 40) and x_te.shape == (100, 40)
    assert sorted(set(y_tr.tolist())) == list(range(10))


def test_mnist1d_generation_leaves_numpy_global_state_alone():
    np.random.seed(123)
    expected = np.random.rand(3)
    np.random.seed(123)
    mnist1d.generate(num_samples=300)
    assert np.array_equal(np.random.rand(3), expected)


def test_mnist1d_split_sizes_shapes_and_quantisation(data):
    assert (data.num_train, data.num_val, data.num_test) == (3200, 800, 1000)
    assert data.train.images.shape == (3200, 1, 1, 40) and data.train.images.dtype == torch.uint8
    assert (data.in_channels, data.num_classes) == (1, 10)
    # The uint8 signals are the generator's to within half a quantisation step (where not clipped).
    _, _, x_te, _ = mnist1d.generate()
    q = next(data.test.batches(0))[0].flatten(1)  # normalised on the device
    back = (q * data.test.std.flatten() + data.test.mean.flatten() - 128.0) / mnist1d.SCALE
    inside = np.abs(x_te) < 3.9
    assert np.abs(back.numpy() - x_te)[inside].max() <= 0.5 / mnist1d.SCALE + 1e-6
