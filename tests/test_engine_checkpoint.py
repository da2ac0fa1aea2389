"""Checkpoint state, the same-run check, and what trainer.resume means, without a subprocess."""
from __future__ import annotations

import shlex

import pytest
import torch

from helpers import compose_cfg
from esam.engine.build import build_run
from esam.engine.checkpoint import (Progress, check_same_run, checkpoint_state, restore, resolve_resume,
                                    resume_command)
from esam.engine.monitor import EpochAccumulator
from esam.errors import UserError

TINY = ["dataset=digits", "dataset.batch_size=32", "trainer.limit_train_batches=4", "trainer.precision=fp32",
        "trainer.device=cpu", "trainer.num_threads=1", "trainer.progress=false"]


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_resume_none_and_auto_without_a_checkpoint(tmp_path):
    for value in (None, "", "none"):
        assert resolve_resume(value, tmp_path) == (None, None)
    path, note = resolve_resume("auto", tmp_path)
    assert path is None
    # One line that says there was nothing, what happens instead, and how to continue another run.
    assert "\n" not in note and "no checkpoint" in note and str(tmp_path / "checkpoints") in note
    assert "starts at epoch 1" in note and "trainer.resume=<its run folder>" in note


def test_resume_auto_finds_this_folders_last_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"x")
    assert resolve_resume("auto", tmp_path) == (tmp_path / "checkpoints" / "last.pt", None)


def test_resume_a_run_folder_means_its_last_checkpoint(tmp_path):
    old = tmp_path / "old"
    with pytest.raises(UserError, match="no checkpoints/last.pt"):
        resolve_resume(str(tmp_path), tmp_path / "new")
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "last.pt").write_bytes(b"x")
    assert resolve_resume(str(old), tmp_path / "new") == (old / "checkpoints" / "last.pt", None)
    assert resolve_resume(str(tmp_path / "a.pt"), tmp_path) == (tmp_path / "a.pt", None)


def test_same_run_check_names_the_key_in_one_sentence():
    saved = {"dataset": {"name": "digits"}, "model": {"name": "resnet_digits", "args": {}}, "optimizer": {"name": "sgd"}}
    check_same_run(saved, saved)
    check_same_run(None, saved)  # an old checkpoint without its config
    with pytest.raises(UserError) as info:
        check_same_run(saved, {**saved, "optimizer": {"name": "sam"}})
    msg = str(info.value)
    assert "\n" not in msg and "optimizer.name='sgd'" in msg and "optimizer.name='sam'" in msg


def test_resume_command_repeats_the_runs_overrides(tmp_path):
    run_dir = tmp_path / "my run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        "- optimizer=esam\n- trainer.resume=auto\n- hydra.run.dir=/x\n- optimizer.lr=0.1\n")
    cmd = resume_command(run_dir)
    assert shlex.split(cmd) == ["python", "-m", "esam.train", "optimizer=esam", "optimizer.lr=0.1",
                                f"trainer.resume={run_dir}"]
    assert resume_command(run_dir, ["seed=3"]).endswith(shlex.quote(f"trainer.resume={run_dir}"))
    # Without Hydra's record (a run started from Python) it says what is missing.
    assert "<the overrides" in resume_command(tmp_path)


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_checkpoint_state_round_trips_into_a_fresh_run(tmp_path):
    cfg = compose_cfg([*TINY, "optimizer=esam"])
    a = build_run(cfg, tmp_path / "a")
    with torch.no_grad():
        next(a.model.parameters()).add_(1.0)
    a.scheduler.step()
    progress = Progress(epoch=1, step_in_epoch=2, global_step=6, history=[{"epoch": 1}], best_acc=50.0,
                        pieces=2, wandb_id="w1", compute_units=1234.5)
    acc = EpochAccumulator.zeros(a.device)
    acc.add_step(torch.tensor([0.5, 0.25]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), {})
    state = checkpoint_state(a, progress, acc, train_time_s=12.0)
    assert state["config"]["optimizer"]["name"] == "esam" and state["train_time_s"] == 12.0

    b = build_run(cfg, tmp_path / "b")
    back, back_acc = restore(b, state)
    assert back == Progress(epoch=1, step_in_epoch=2, global_step=6, history=[{"epoch": 1}], best_acc=50.0,
                            train_time_s=12.0, pieces=3, wandb_id="w1", compute_units=1234.5)
    assert float(back_acc.loss_sum) == 0.75 and back_acc.steps == 1
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert b.scheduler.last_epoch == a.scheduler.last_epoch == 1
    assert torch.equal(a.optimizer.generator.get_state(), b.optimizer.generator.get_state())


def test_restore_refuses_another_method(tmp_path):
    a = build_run(compose_cfg(TINY), tmp_path / "a")
    state = checkpoint_state(a, Progress(), None, 0.0)
    b = build_run(compose_cfg([*TINY, "optimizer=sam"]), tmp_path / "b")
    with pytest.raises(UserError, match="optimizer.name='sgd'"):
        restore(b, state)
