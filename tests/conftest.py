"""Fixtures and session hooks. What tests share as code lives in tests/helpers/ (import it as
``helpers``); no test module imports another."""
from __future__ import annotations

import os

import pytest

from helpers.cli import compose_cfg
from helpers.ddp import two_ranks

# Tests never touch the network or a wandb account.
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the two DDP ranks as soon as a test that needs them is selected: they import torch
    while the tests before it run, instead of when it starts."""
    if not session.config.option.collectonly and any(item.get_closest_marker("ddp") for item in session.items):
        two_ranks().start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    two_ranks().close()


@pytest.fixture
def compose_train():
    return compose_cfg


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> str:
    """A tiny ImageNet folder (helpers/imagenet.py): 3 classes, 5 train and 2 val JPEGs each."""
    from helpers.imagenet import write_imagenet

    return write_imagenet(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny float64 tensors: extra intra-op threads only fight over a busy CPU. Modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
