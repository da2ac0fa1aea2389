"""Every paper recipe trains its first steps through the real entry point's config and trainer.

The recipes' own batch, m-sharpness, BN rule, precision, schedule and method, on
``dataset.fake`` (random images of the dataset's shape) under ``trainer=debug`` (the first steps,
whatever the recipe's epochs). Paper models too large for CI's CPU run as a stand-in of the same
builder interface (tests/helpers/smoke.py: the recipe's BatchNorm rules still apply); ResNet-18,
the headline recipe, runs for real.
Before this file no test trained a recipe, and every SAM/ESAM CIFAR recipe crashed at step 1
(m-sharpness chunks gave the trainer one chunk's logits).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from esam.optim import SAM, ESAM, make_closure, METHODS
from esam.recipes import recipes
from esam.train import CONFIG_DIR
from helpers import compose_cfg
from helpers.smoke import train_first_steps

# Every experiment file, and every recipe with ESAM (m-sharpness, SDS and SWP at the recipe's batch);
# every method on the CIFAR-10 recipe is the next test, every other cell composes in test_experiments.
EXPERIMENTS = sorted({p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")}
                     | {f"{r}_esam" for r in recipes()})
OPTIONS = sorted(p.stem for p in (Path(CONFIG_DIR) / "optimizer").glob("*.yaml"))
STEPS = 1


def smoke(name_overrides: list[str], tmp_path: Path, *, stand_in: bool = True, steps: int = STEPS):
    """Train the config's first ``steps`` steps in-process; returns (cfg, trainer, summary)."""
    return train_first_steps(name_overrides, tmp_path, steps=steps, stand_in=stand_in)


def check_trained(cfg, trainer, summary, tmp_path: Path, steps: int = STEPS) -> None:
    assert trainer.global_step == steps
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["train_steps"] for r in lines) == steps
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"]) for r in lines)
    assert 0.0 <= lines[-1]["train_acc"] <= 100.0
    assert json.loads((tmp_path / "summary.json").read_text())["test_acc_final"] == summary["test_acc_final"]
    # The optimizer that ran is the one the recipe configured (m-sharpness included).
    opt = trainer.optimizer
    if "m" in cfg.optimizer:
        assert getattr(getattr(opt, "inner", opt), "m", None) == cfg.optimizer.m  # switching rules: their inner step


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_trains_its_first_steps(name, tmp_path):
    cfg, trainer, summary = smoke([f"experiment={name}"], tmp_path)
    check_trained(cfg, trainer, summary, tmp_path)


def test_the_headline_recipe_trains_with_its_real_model(tmp_path):
    """`make cifar10-esam`: ResNet-18, batch 128, m = 64, tf32 (fp32 on CPU), one real step."""
    cfg, trainer, summary = smoke(["experiment=cifar10_resnet18_esam"], tmp_path, stand_in=False, steps=1)
    assert (cfg.model.name, cfg.dataset.batch_size, cfg.optimizer.m) == ("resnet18", 128, 64)
    check_trained(cfg, trainer, summary, tmp_path, steps=1)


@pytest.mark.parametrize("option", OPTIONS)
def test_every_method_trains_on_the_cifar_recipe(option, tmp_path):
    """`make cifar10-<method>`: every conf/optimizer option on the paper's CIFAR-10 recipe."""
    cfg, trainer, summary = smoke([f"experiment=cifar10_resnet18_{option}"], tmp_path)
    assert cfg.optimizer.name in METHODS and cfg.experiment_name == "cifar10_resnet18"
    check_trained(cfg, trainer, summary, tmp_path)


def test_debug_trainer_wins_over_the_recipes_epochs(tmp_path):
    cfg = compose_cfg(["experiment=cifar10_resnet18_sam", "trainer=debug"])
    assert cfg.trainer.epochs == 200 and cfg.trainer.max_steps == 4  # the schedule is the recipe's
    cfg, trainer, summary = smoke(["experiment=cifar10_resnet18_sam"], tmp_path, steps=3)
    assert trainer.global_step == 3 and cfg.trainer.epochs == 200


# -- the crash itself, at the optimizer/closure level ------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


@pytest.mark.parametrize("make", [
    lambda p, m: SAM(p, "sgd", rho=0.1, m=4, lr=0.1, model=m),
    lambda p, m: ESAM(p, "sgd", rho=0.1, beta=1.0, gamma=0.5, m=4, lr=0.1, model=m),
], ids=["sam_m4", "esam_m4"])
def test_first_logits_cover_the_whole_batch_with_chunks(make):
    """With m-sharpness every chunk's own first pass (at w) fills its rows of first_logits."""
    model = _mlp()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    with torch.no_grad():
        at_w = model(x)
    opt = make(model.parameters(), model)
    closure = make_closure(model, x, y)
    losses = opt.step(closure)
    assert closure.first_logits.shape == (12, 3) and losses.shape == (12,)
    torch.testing.assert_close(closure.first_logits, at_w, rtol=0, atol=1e-12)
