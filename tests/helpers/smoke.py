"""A config's first steps, trained in-process: how the recipe and documented-command tests run
a paper recipe on this CPU machine in seconds.

``trainer=debug`` stops after ``trainer.max_steps`` whatever the recipe's epochs (its batch, m,
precision and schedule stay); ``dataset.fake`` replaces a dataset that is not on this machine by
random images of its shape; paper models too large for CI's CPU become :class:`StandIn`, the same
builder interface (classes, channels, any image size, BatchNorm, so the recipe's BN rules apply).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from esam.engine import Trainer
from esam.models import MODELS, register_model
from helpers.cli import compose_cfg

STAND_IN = "smoke_stand_in"
SMALL_MODELS = {"resnet_digits", "mlp", STAND_IN}   # trained as they are
NOT_HERE = ("cifar10", "cifar100", "imagenet")     # datasets no test machine has on disk


class StandIn(nn.Module):
    """conv-BN-ReLU-pool-linear with a paper model's interface, at a thousandth of its cost."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(in_channels, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


if STAND_IN not in MODELS:
    register_model(STAND_IN)(StandIn)


def smoke_overrides(cfg: DictConfig, steps: int) -> list[str]:
    """What turns the run ``cfg`` into its first ``steps`` steps on this machine."""
    extra = ["trainer=debug", f"trainer.max_steps={steps}", "trainer.limit_test_batches=1",
             "trainer.num_threads=1", "trainer.progress=false"]
    if cfg.dataset.name in NOT_HERE:
        extra.append(f"dataset.fake={cfg.dataset.batch_size * steps}")
    if cfg.dataset.name == "imagenet":
        extra.append("dataset.image_size=32")  # 224 px at batch 256 is minutes per step on 2 cores
    return extra


def train_first_steps(overrides: list[str], run_dir: Path, *, steps: int = 1, stand_in: bool = True,
                      extra: tuple[str, ...] = ()):
    """(cfg, trainer, summary) of the first ``steps`` steps of ``python -m esam.train <overrides>``."""
    cfg = compose_cfg([*overrides, *smoke_overrides(compose_cfg(list(overrides)), steps), *extra])
    if stand_in and cfg.model.name not in SMALL_MODELS:  # the paper model's own args (alpha, ...) go too
        cfg.model.name, cfg.model.args = STAND_IN, {}
    trainer = Trainer(cfg, run_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        summary = trainer.fit()
    return cfg, trainer, summary
