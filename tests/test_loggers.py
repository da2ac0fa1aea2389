"""esam.loggers: wandb never stops a run (no API key, an init that fails or times out), and what
a run puts in its wandb summary, read back from the .wandb file an offline run wrote.

The real-wandb tests run in a subprocess with their own HOME, WANDB_DIR and config dir, no API key
(or a fake one) and WANDB_BASE_URL pointing at a closed local port: nothing can reach a server.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import esam.loggers as loggers
from esam.report.wandb_offline import read_wandb_file
from esam.loggers import (ACC_FINAL, COMPUTE_EXTRA_PCT, COMPUTE_SUMMARY_KEYS, COMPUTE_USED, WALL_TIME, WandbLogger,
                          compute_extra_pct, stat_key, summary_key, wandb_key)

REPO = Path(__file__).resolve().parent.parent


# -- reading what wandb wrote (esam.report.wandb_offline decodes the .wandb file) -------------------
def read_offline_run(run_dir: Path) -> dict:
    """{summary, history, config, group, ...} of the one offline run below ``run_dir``/wandb."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return read_wandb_file(files[0])


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose wandb has no account, no settings and no reachable server."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "NETRC": str(home / ".netrc"),
            "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_CONFIG_DIR": str(home / "wandb_config"),
            "WANDB_CACHE_DIR": str(home / "wandb_cache"), "WANDB_DATA_DIR": str(home / "wandb_data"),
            "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_ERROR_REPORTING": "false",
            "WANDB_DISABLE_GIT": "true", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}


def run_isolated(tmp_path: Path, code: str, run_dir: Path, **env: str) -> subprocess.CompletedProcess:
    """``code`` (with ``run_dir`` as sys.argv[1]) in a fresh Python with :func:`isolated_env`."""
    return subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=REPO, env={**isolated_env(tmp_path), **env},
                          capture_output=True, text=True, timeout=300)


LOG_A_RUN = """
import json, sys
from esam.loggers import WandbLogger
lg = WandbLogger(project="esam-test", entity=None, mode=None, name="digits-sam-seed0", group="equal_compute",
                 tags=["digits"], config={"optimizer": {"name": "sam", "rho": 0.05}, "trainer": {"budget": None}},
                 run_dir=sys.argv[1])
lg.log_epoch({"epoch": 1, "test_acc": 50.0, "train_loss": 1.5, "compute_used": 2.0, "wall_time_s": 1.25})
lg.log_epoch({"epoch": 2, "test_acc": 91.0, "train_loss": 0.5, "compute_used": 4.0, "wall_time_s": 3.5})
lg.log_summary({"test_acc_final": 91.0, "test_acc_best": 92.0, "compute_used": 4.0, "epochs": 2, "budget": None,
                "wall_time_s": 3.5, "optimizer": "sam", "config": {"not": "a scalar"}})
lg.finish()
print(json.dumps({"run_id": lg.run_id}))
"""


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


# -- no API key -----------------------------------------------------------------------------------
def test_no_api_key_logs_offline_with_one_warning_and_the_summary_reads_back(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = run_isolated(tmp_path, LOG_A_RUN, run_dir, WANDB_MODE="online")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "UsageError" not in proc.stderr
    warns = warnings_of(proc.stderr)
    assert len(warns) == 1, proc.stderr
    assert "no API key" in warns[0] and "`wandb login`" in warns[0] and "WANDB_MODE=offline" in warns[0]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["run_id"]

    got = read_offline_run(run_dir)
    s = got["summary"]
    # What a dashboard plots accuracy against compute with, under the names loggers.py exports.
    assert s[COMPUTE_USED] == 4.0 and s[ACC_FINAL] == 91.0 and s[WALL_TIME] == 3.5
    assert s[COMPUTE_EXTRA_PCT] == pytest.approx(100.0)  # 4 SGD-epochs for 2 epochs of data: SAM's 2x
    assert s["test/acc_best"] == 92.0 and s["optimizer"] == "sam" and "config" not in s
    assert [h["test/acc"] for h in got["history"]] == [50.0, 91.0]
    assert [h[COMPUTE_USED] for h in got["history"]] == [2.0, 4.0] and got["history"][1]["epoch"] == 2
    assert got["group"] == "equal_compute" and got["config"]["optimizer"] == {"name": "sam", "rho": 0.05}


def test_offline_mode_is_quiet(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = run_isolated(tmp_path, LOG_A_RUN, run_dir, WANDB_MODE="offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert warnings_of(proc.stderr) == []
    assert read_offline_run(run_dir)["summary"][COMPUTE_USED] == 4.0


# -- a key, but wandb cannot start online (no network, a timeout) ----------------------------------
FAILING_ONLINE = """
import sys, wandb
real_init, timeouts = wandb.init, []
def init(*args, mode=None, settings=None, **kwargs):
    timeouts.append(settings.init_timeout)
    if mode == "online":  # what wandb raises when the server does not answer within init_timeout
        raise wandb.errors.CommError(f"Run initialization has timed out after {settings.init_timeout} sec.")
    return real_init(*args, mode=mode, settings=settings, **kwargs)
wandb.init = init
""" + LOG_A_RUN + """
print("timeouts", timeouts)
"""


def test_online_init_failure_falls_back_to_offline_within_the_timeout(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = run_isolated(tmp_path, FAILING_ONLINE, run_dir, WANDB_MODE="online",
                        WANDB_API_KEY="x" * 40, WANDB_INIT_TIMEOUT="7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "timeouts [7.0, 7.0]" in proc.stdout  # the bounded wait, honoured online and offline
    warns = warnings_of(proc.stderr)
    assert len(warns) == 1, proc.stderr
    assert "timed out" in warns[0] and "WANDB_INIT_TIMEOUT" in warns[0] and "WANDB_MODE=offline" in warns[0]
    assert read_offline_run(run_dir)["summary"][ACC_FINAL] == 91.0


class FakeRun:
    id = "fake"

    def __init__(self, fail_log: bool = False):
        self.fail_log, self.logged, self.summary, self.finished = fail_log, [], {}, False

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, values):
        if self.fail_log:
            raise ConnectionError("network is unreachable")
        self.logged.append(values)

    def finish(self, exit_code=0):
        self.finished = True


def make_logger(**kw) -> WandbLogger:
    return WandbLogger(project="p", entity=None, name="n", group="g", tags=[], config={}, run_dir="/nonexistent", **kw)


def test_when_wandb_cannot_start_at_all_the_run_goes_on_without_it(monkeypatch, capsys):
    import wandb

    seen = []

    def init(*args, mode=None, settings=None, **kwargs):
        seen.append((mode, settings.init_timeout))
        raise OSError("read-only file system")

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(loggers, "has_api_key", lambda wandb: True)
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    lg = make_logger(mode="online")
    assert seen == [("online", loggers.DEFAULT_INIT_TIMEOUT_S), ("offline", loggers.DEFAULT_INIT_TIMEOUT_S)]
    assert lg.run is None and lg.run_id is None
    lg.log_epoch({"epoch": 1, "test_acc": 1.0})  # no-ops, no exception
    lg.log_summary({"test_acc_final": 1.0})
    lg.finish()
    warns = warnings_of(capsys.readouterr().err)
    assert len(warns) == 1 and "folder only" in warns[0] and "WANDB_MODE=disabled" in warns[0]


def test_a_wandb_failure_mid_run_warns_once_and_stops_mirroring(monkeypatch, capsys):
    import wandb

    run = FakeRun(fail_log=True)
    monkeypatch.setattr(wandb, "init", lambda *a, **k: run)
    lg = make_logger(mode="offline")
    lg.log_epoch({"epoch": 1, "test_acc": 1.0})
    lg.log_epoch({"epoch": 2, "test_acc": 2.0})
    lg.log_summary({"test_acc_final": 2.0})
    lg.finish()
    warns = warnings_of(capsys.readouterr().err)
    assert len(warns) == 1 and "ConnectionError" in warns[0] and "metrics.jsonl" in warns[0]
    assert run.summary == {} and not run.finished


def test_bad_mode_is_one_sentence():
    from esam.errors import UserError

    with pytest.raises(UserError, match="logger.mode='onlin' is not one of online, offline, disabled"):
        make_logger(mode="onlin")


# -- the keys -------------------------------------------------------------------------------------
def test_compute_overhead_vs_sgd_from_the_summary():
    assert compute_extra_pct({"compute_used": 20.0, "epochs": 10, "budget": None}) == pytest.approx(100.0)
    assert compute_extra_pct({"compute_used": 10.0, "epochs": 10}) == pytest.approx(0.0)  # SGD
    # A budget run may stop mid-epoch: only a fractional epochs_done tells how far it went.
    assert compute_extra_pct({"compute_used": 2.0, "epochs": 2, "epochs_done": 1.25, "budget": 2}) == pytest.approx(60.0)
    assert math.isnan(compute_extra_pct({"compute_used": 2.0, "epochs": 2, "budget": 2}))
    assert math.isnan(compute_extra_pct({"test_acc_final": 90.0, "epochs": 10}))  # older summaries


def test_method_statistics_have_one_namespace_in_files_and_wandb():
    """ESAM's sharpness and LookSAM's sam_step: method_<stat> in metrics.jsonl, method/<stat> in wandb."""
    assert stat_key("sharpness") == "method_sharpness" and wandb_key(stat_key("sharpness")) == "method/sharpness"
    assert wandb_key(stat_key("sam_step")) == "method/sam_step" and summary_key("method/sam_step") == "method_sam_step"
    assert wandb_key("method") == "method" and summary_key("method") == "method"  # the summary's method name


def test_summary_keys_round_trip():
    for ours in ("test_acc_final", "test_acc_best", "compute_used", "wall_time_s", "img_per_s", "budget"):
        assert summary_key(wandb_key(ours)) == ours
    assert {wandb_key(k) for k in ("compute_used", "wall_time_s", "test_acc_final", "budget")} <= set(COMPUTE_SUMMARY_KEYS)


def load_dashboard():
    spec = importlib.util.spec_from_file_location("wandb_dashboard", REPO / "scripts" / "wandb_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_panels_plot_the_keys_runs_log():
    """Every metric a dashboard panel reads is a name esam.loggers writes (or the report pushes)."""
    dash = load_dashboard()
    panels = [p for _, ps in dash.panel_spec() for p in ps]
    used = {k for p in panels for k in [*p.get("y", []), *p.get("metrics", []), p.get("x")] if k}
    written = {wandb_key(k) for k in ("test_acc", "test_acc_best", "test_acc_final", "train_loss", "img_per_s",
                                      "method_sharpness", "compute_used", "wall_time_s")}
    written |= {"epoch", COMPUTE_EXTRA_PCT, "perf/extra_vs_sgd_pct"}
    assert used <= written, used - written
    scatter = {(p["x"], p["y"][0]) for p in panels if p["kind"] == "scatter"}
    assert (COMPUTE_USED, ACC_FINAL) in scatter and (WALL_TIME, ACC_FINAL) in scatter


@pytest.mark.slow  # starts a Python process: in `make test`, not `make test-fast`
def test_a_training_run_without_a_wandb_login_completes_and_writes_its_folder(tmp_path):
    """`logger=wandb` with no API key: the run trains, writes metrics.jsonl and summary.json, and
    says once what to do; its wandb record is offline in the run folder."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "esam.train", "logger=wandb", "trainer=debug", "trainer.progress=false",
         "trainer.precision=fp32", "trainer.timing_warmup_steps=1", "trainer.num_threads=1", f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**isolated_env(tmp_path), "WANDB_MODE": "online"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    warns = warnings_of(proc.stderr)
    assert len(warns) == 1 and "`wandb login`" in warns[0], proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == summary["epochs"] >= 1
    offline = read_offline_run(run_dir)
    assert offline["summary"][ACC_FINAL] == summary["test_acc_final"] and offline["exit_code"] == 0

    # The report reads that offline run (no login) as the same row as the run folder's summary.json.
    from esam.report import load_runs, load_wandb

    folder_runs, folder_curves = load_runs([run_dir])
    wandb_runs, wandb_curves, kept = load_wandb(str(run_dir / "wandb"))
    assert len(kept) == 1 and kept[0].source.startswith(str(run_dir / "wandb" / "offline-run-"))
    same = ["experiment", "dataset", "data", "model", "hardware", "optimizer", "hparams", "batch_size", "epochs",
            "method", "seed", "test_acc_best", "test_acc_final", "img_per_s", "compute_used", "wall_time_s", "rho"]
    pd.testing.assert_frame_equal(wandb_runs[same], folder_runs[same])
    assert wandb_curves.test_acc.tolist() == folder_curves.test_acc.tolist() == [e["test_acc"] for e in epochs]
    proc = subprocess.run([sys.executable, "-m", "esam.report", "--wandb", str(tmp_path), "--out", str(tmp_path / "t"),
                           "--no-plots"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=isolated_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| default | digits | resnet_digits |" in (tmp_path / "t" / "table.md").read_text()
