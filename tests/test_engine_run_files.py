"""metrics.jsonl, summary.json and the console lines, without a training run."""
from __future__ import annotations

import json
import logging

from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from esam.engine.run_files import RunFiles, epoch_line, say, summarize, throughput

RECORD = {"epoch": 2, "lr": 0.025, "train_loss": 0.5, "train_acc": 90.0, "test_loss": 0.4, "test_acc": 91.0,
          "test_acc5": 99.0, "train_img_per_s": 1000.0, "epoch_time_s": 1.25, "compute_used": 1.5}


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_start_keeps_exactly_the_checkpoints_epochs_and_drops_an_old_summary(tmp_path):
    files = RunFiles(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "trunc')
    (tmp_path / "summary.json").write_text("{}")
    files.start([{"epoch": 1}])
    assert lines(tmp_path / "metrics.jsonl") == [{"epoch": 1}]
    assert not (tmp_path / "summary.json").exists()
    files.append({"epoch": 2})
    assert lines(tmp_path / "metrics.jsonl") == [{"epoch": 1}, {"epoch": 2}]
    files.write_summary({"status": "completed"})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "completed"}


def test_only_the_main_rank_writes(tmp_path):
    files = RunFiles(tmp_path, is_main=False)
    files.start([])
    files.append({"epoch": 1})
    files.write_summary({})
    assert list(tmp_path.iterdir()) == []


def test_epoch_line_says_the_numbers_and_the_budget():
    line = epoch_line(RECORD, 4)
    assert line.startswith("epoch   2/4  lr 0.0250") and "acc 91.00" in line and "1000 img/s" in line
    assert "compute" not in line
    assert epoch_line({**RECORD, "method_sharpness": 0.125}, 4).endswith("sharpness 0.1250")
    assert epoch_line(RECORD, 4, budget=2.0).endswith("compute 1.50/2 SGD epochs")


def test_say_prints_without_logging_and_logs_with_it(capsys, caplog):
    say("plain line")
    assert capsys.readouterr().out == "plain line\n"
    with caplog.at_level(logging.INFO, logger="esam"):
        say("logged line")
    assert "logged line" in caplog.messages and capsys.readouterr().out == ""


def test_an_epoch_or_run_inside_the_timing_warmup_says_why_it_has_no_img_per_s():
    line = epoch_line({**RECORD, "train_img_per_s": None}, 4)
    assert "nan" not in line
    assert "img/s n/a (epoch shorter than the timing warm-up, trainer.timing_warmup_steps)" in line
    assert throughput(None, "train img/s") == ("train img/s n/a (run shorter than the timing warm-up, "
                                               "trainer.timing_warmup_steps)")
    assert throughput(float("nan")).startswith("img/s n/a") and throughput(2012.4) == "2012 img/s"


def test_summary_has_the_hyperparameters_only_in_its_config(tmp_path):
    """No legacy top-level rho/beta/gamma: the resolved config says every setting once."""
    cfg = OmegaConf.create({"name": "r", "experiment_name": "e", "seed": 0,
                            "dataset": {"name": "digits", "batch_size": 8},
                            "model": {"label": "m", "channels_last": False},
                            "optimizer": {"name": "esam", "label": "esam", "rho": 0.05, "beta": 0.6, "gamma": 0.5}})
    run = SimpleNamespace(cfg=cfg, budget=None, num_params=10, device=torch.device("cpu"), precision="fp32",
                          dist=SimpleNamespace(world_size=1), run_dir=tmp_path)
    history = [{**RECORD, "epoch": 1, "timed_seconds": 0.0, "timed_steps": 0, "train_steps": 2, "train_img_per_s": None,
                "wall_time_s": 1.25}]
    s = summarize(run, history, train_time_s=1.5, pieces=1)
    assert not {"rho", "beta", "gamma"} & set(s)
    assert s["config"]["optimizer"] == {"name": "esam", "label": "esam", "rho": 0.05, "beta": 0.6, "gamma": 0.5}
    assert s["img_per_s"] is None and (s["method"], s["optimizer"], s["test_acc_best"]) == ("esam", "esam", 91.0)
