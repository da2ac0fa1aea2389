"""The runnable benchmark end to end: configs compose, a tiny train writes its files, seeds repeat."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from esam.train import CONFIG_DIR, run
from helpers import FAST, compose_cfg, run_cli

GROUPS = ["dataset", "model", "optimizer", "trainer", "logger"]

EPOCH_FIELDS = {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_acc5",
                "epoch_time_s", "train_img_per_s", "step_ms"}
SUMMARY_FIELDS = {"test_acc_final", "test_acc_best", "best_epoch", "train_time_s", "img_per_s", "step_ms",
                  "num_params", "device", "torch_version", "git_commit", "seed", "config",
                  "dataset", "model", "optimizer"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    node = cfg[group]
    assert node is not None
    # Schema-backed: every option carries the schema's keys.
    key = {"dataset": "batch_size", "model": "channels_last", "optimizer": "lr",
           "trainer": "epochs", "logger": "project"}[group]
    assert key in node


@pytest.mark.parametrize("override,words", [
    ("trainer.epoch=3", "epoch"),                 # typo of a key
    ("dataset.batch_sise=3", "batch_sise"),
    ("trainer.epochs=abc", "epochs"),            # wrong type
    ("trainer.precision=fp8", "precision"),      # not an allowed value
    ("optimizer.rho=0.1", "rho"),                # sgd has no rho: schema per optimizer
])
def test_bad_override_fails_at_compose_time_naming_the_key(override, words):
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)) as info:
        compose_cfg([override])
    text = str(info.value) + str(getattr(info.value, "__cause__", ""))
    assert words in text


def test_unknown_option_message_lists_nothing_but_fails():
    with pytest.raises(Exception) as info:
        compose_cfg(["optimizer=foo"])
    assert "optimizer" in str(info.value) and "foo" in str(info.value)


def _tiny(tmp_path: Path, *extra: str) -> tuple[dict, list[dict]]:
    cfg = compose_cfg(["trainer.epochs=2", *FAST, *extra])
    summary = run(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["test_acc_final"] == summary["test_acc_final"]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return on_disk, metrics


def test_tiny_digits_run_writes_metrics_and_summary(tmp_path):
    summary, metrics = _tiny(tmp_path)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert EPOCH_FIELDS <= set(m), EPOCH_FIELDS - set(m)
        assert 0 <= m["test_acc"] <= 100 and m["test_acc5"] >= m["test_acc"]
        assert m["train_img_per_s"] > 0
    assert SUMMARY_FIELDS <= set(summary), SUMMARY_FIELDS - set(summary)
    assert summary["test_acc_final"] > 50.0  # chance is 10%
    assert summary["test_acc_best"] == max(m["test_acc"] for m in metrics)
    assert summary["num_params"] == 77290
    assert summary["config"]["optimizer"]["name"] == "sgd"
    assert summary["seed"] == 0 and summary["device"] == "cpu"
    # cosine per epoch from 0.05: epoch 1 at the base lr, epoch 2 at half of it
    assert metrics[0]["lr"] == pytest.approx(0.05) and metrics[1]["lr"] == pytest.approx(0.025)
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


@pytest.mark.parametrize("method", ["sgd", "esam"])
def test_same_seed_same_final_metrics(tmp_path, method):
    extra = (f"optimizer={method}", "trainer.limit_train_batches=6")
    a, ma = _tiny(tmp_path / "a", *extra)
    b, mb = _tiny(tmp_path / "b", *extra)
    keys = ["train_loss", "train_acc", "test_loss", "test_acc", "test_acc5"]
    assert [[m[k] for k in keys] for m in ma] == [[m[k] for k in keys] for m in mb]
    c, mc = _tiny(tmp_path / "c", *extra, "seed=1")
    assert [m["train_loss"] for m in mc] != [m["train_loss"] for m in ma]


def test_esam_logs_its_selection_and_sharpness(tmp_path):
    _, metrics = _tiny(tmp_path, "optimizer=esam", "optimizer.beta=0.5", "optimizer.gamma=0.5",
                       "trainer.limit_train_batches=6", "dataset.batch_size=64")
    m = metrics[-1]
    assert m["method_sample_frac"] == pytest.approx(0.5)
    assert 0 < m["method_param_frac"] < 1
    assert "method_sharpness" in m


@pytest.mark.slow  # starts a Python process: in `make test`, not `make test-fast`
def test_cli_runs_and_reports_run_folder(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["trainer=debug", "trainer.precision=fp32", f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(out) in proc.stdout
    assert (out / ".hydra" / "config.yaml").is_file()  # the resolved config Hydra saved
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


@pytest.mark.slow  # starts a Python process: in `make test`, not `make test-fast`
def test_missing_dataset_is_one_clear_sentence(tmp_path):
    proc = run_cli(["dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false",
                    "model=resnet18", "trainer=debug", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 2
    assert "error: cifar10 not found in" in proc.stderr
    assert str(tmp_path / "cifar-10-batches-py") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run").exists()  # no empty run folder left behind


def test_resume_of_a_run_folder_makes_it_the_run_folder(tmp_path):
    from esam.train import resume_into_its_folder

    run_dir = tmp_path / "old run"
    run_dir.mkdir()
    args = ["optimizer=sam", f"trainer.resume={run_dir}"]
    assert resume_into_its_folder(args) == [*args, f"hydra.run.dir={run_dir}"]
    for unchanged in (["trainer.resume=auto"], [f"trainer.resume={run_dir}/checkpoints/last.pt"],
                      [*args, "hydra.run.dir=elsewhere"], ["-m", *args]):
        assert resume_into_its_folder(unchanged) == unchanged


def test_a_failed_run_removes_only_an_unused_folder(tmp_path):
    from esam.train import remove_if_unused

    unused = tmp_path / "unused"
    (unused / ".hydra").mkdir(parents=True)
    (unused / "checkpoints").mkdir()
    (unused / "train.log").write_text("")
    remove_if_unused(unused)
    assert not unused.exists()
    for name in ("checkpoints/last.pt", "metrics.jsonl", "notes.txt"):
        used = tmp_path / name.replace("/", "_")
        (used / "checkpoints").mkdir(parents=True)
        (used / name).write_text("x")
        remove_if_unused(used)
        assert (used / name).is_file()
