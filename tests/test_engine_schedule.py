"""The lr schedule and the run's planned length, as pure functions, against hand-computed values."""
from __future__ import annotations

import math

import pytest

from esam.engine.schedule import cosine_factor, lr_factor, planned_epochs


def test_cosine_factor_ends_and_clamps():
    assert cosine_factor(0.0) == 1.0 and cosine_factor(1.0) == pytest.approx(0.0, abs=1e-15)
    assert cosine_factor(0.5) == pytest.approx(0.5)
    assert cosine_factor(-1.0) == 1.0 and cosine_factor(2.0) == cosine_factor(1.0)


def test_per_epoch_cosine_is_constant_within_an_epoch():
    f = [lr_factor(s, steps_per_epoch=4, epochs=2) for s in range(8)]
    assert f == [1.0] * 4 + [pytest.approx(0.5)] * 4  # cos(pi/2): half the base lr in epoch 2


def test_per_step_cosine_moves_every_step():
    f = [lr_factor(s, steps_per_epoch=4, epochs=2, per="step") for s in range(9)]
    assert f == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(9)])


def test_linear_warmup_then_cosine():
    # per epoch, 2 warm-up epochs of 10: (t + 1) / 2 for t = 0, 1, then cosine over the other 8.
    f = [lr_factor(s * 3, steps_per_epoch=3, epochs=10, warmup_epochs=2) for s in range(4)]
    assert f == pytest.approx([0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 8))])
    # per step: (t + 1/steps_per_epoch) / warmup, reaching 1 at the warm-up's last step.
    g = [lr_factor(s, steps_per_epoch=4, epochs=3, warmup_epochs=1, per="step") for s in range(4)]
    assert g == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_constant_after_warmup():
    assert [lr_factor(s, steps_per_epoch=2, epochs=5, kind="constant") for s in range(10)] == [1.0] * 10


def test_warmup_as_long_as_the_run_keeps_a_one_epoch_span():
    # as before the refactor: cosine over max(1, epochs - warmup) epochs
    assert lr_factor(4, steps_per_epoch=2, epochs=2, warmup_epochs=2) == 1.0  # t = 2: cosine(0)
    assert lr_factor(6, steps_per_epoch=2, epochs=2, warmup_epochs=2) == pytest.approx(0.0, abs=1e-15)


def test_a_fractional_run_ends_its_cosine_at_its_own_end():
    """A budget run of 1.5 epochs (e.g. SAM at budget 3) reaches lr 0 at step 1.5 x steps_per_epoch."""
    assert lr_factor(15, steps_per_epoch=10, epochs=1.5, per="step") == pytest.approx(0.0, abs=1e-15)
    assert lr_factor(7, steps_per_epoch=10, epochs=1.5, per="step") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.7 / 1.5)))


@pytest.mark.parametrize("epochs,budget,cost,expected", [
    (10, None, 2.0, 10.0),   # no budget: trainer.epochs
    (10, 2.0, 1.0, 2.0),     # SGD at budget 2: 2 epochs
    (10, 2.0, 2.0, 1.0),     # SAM: half
    (10, 2.0, 1.7, 2.0 / 1.7),  # ESAM(0.6, 0.5): 5.1 units / 3
])
def test_planned_epochs(epochs, budget, cost, expected):
    assert planned_epochs(epochs, budget, cost) == pytest.approx(expected)
