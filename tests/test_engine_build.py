"""build_run: every part of a run from its config, with its planned length, without a subprocess."""
from __future__ import annotations

import pytest
import torch

from helpers import compose_cfg
from esam.engine.build import build_run, configure_backends
from esam.engine.schedule import lr_factor
from esam.errors import UserError
from esam.optim import get_method

TINY = ["dataset=digits", "dataset.batch_size=32", "trainer.limit_train_batches=4", "trainer.precision=fp32",
        "trainer.device=cpu", "trainer.num_threads=1", "trainer.progress=false"]


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_build_run_gives_the_parts_and_the_plan(tmp_path):
    run = build_run(compose_cfg([*TINY, "optimizer=esam", "trainer.epochs=3"]), tmp_path)
    assert isinstance(run.optimizer, get_method("esam").cls)  # from the registry
    assert run.optimizer.model is run.ddp_model is run.model  # no DDP in one process
    assert run.device == torch.device("cpu") and run.precision == "fp32"
    assert run.steps_per_epoch == 4 and run.planned_epochs == 3.0 and run.budget is None
    assert run.epoch_units == 3 * 4 * 32  # one SGD epoch of 4 batches of 32
    assert run.step_units == pytest.approx(1 + 1.6 + 1 + 3 * 0.5)  # ESAM(beta=0.6, gamma=0.5)
    assert (tmp_path / "checkpoints").is_dir()
    assert run.num_params == 77290


@pytest.mark.parametrize("method,epochs", [("sgd", 3.0), ("sam", 1.5)])
def test_a_budget_plans_the_run_and_its_schedule(tmp_path, method, epochs):
    run = build_run(compose_cfg([*TINY, f"optimizer={method}", "trainer.budget=3",
                                 "trainer.schedule_per=step"]), tmp_path)
    assert run.budget == 3.0 and run.planned_epochs == pytest.approx(epochs)
    # The cosine ends where the budget is planned to end, not at trainer.epochs (10).
    factor = run.scheduler.lr_lambdas[0]
    for step in (0, 3, 5, 6, 12):
        assert factor(step) == pytest.approx(lr_factor(step, steps_per_epoch=4, epochs=epochs, per="step"))
    assert factor(int(epochs * 4)) == pytest.approx(0.0, abs=1e-12)


def test_the_whole_set_is_the_unit_without_a_batch_limit(tmp_path):
    run = build_run(compose_cfg([*TINY, "trainer.limit_train_batches=0", "dataset.batch_size=128"]), tmp_path)
    assert run.steps_per_epoch == 12 and run.epoch_units == 3 * 1437  # 11 x 128 + 29


@pytest.mark.parametrize("override,words", [
    ("trainer.budget=0", "trainer.budget must be > 0"),
    ("trainer.budget=-1", "trainer.budget must be > 0"),
    ("trainer.check_every=0", "trainer.check_every must be >= 1"),
    ("trainer.epochs=0", "trainer.epochs must be >= 1"),
])
def test_bad_trainer_values_are_one_sentence(tmp_path, override, words):
    with pytest.raises(UserError, match=words):
        build_run(compose_cfg([*TINY, override]), tmp_path)


def test_tf32_on_the_cpu_is_plain_fp32_without_autocast(tmp_path):
    run = build_run(compose_cfg([*TINY, "trainer.precision=tf32"]), tmp_path)
    assert run.precision == "fp32"
    with run.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_backend_flags_follow_the_precision():
    keep = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        configure_backends(torch.device("cuda"), "tf32")
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
        configure_backends(torch.device("cuda"), "fp32")  # IEEE fp32: no TF32 in matmuls or convolutions
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.benchmark = False
        configure_backends(torch.device("cpu"), "tf32")  # nothing to set on the CPU
        assert not torch.backends.cudnn.benchmark
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = keep
