"""The cluster path on one machine: hydra/launcher=local runs jobs through submitit's pickling,
signals and requeue exactly as Slurm would, so a pre-empted job is shown to continue in the same
run folder, and a multi-task job to train as DDP ranks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esam.runtime import env_from_submitit
from helpers import FAST, REPO, run_cli

CPU = [*FAST, "trainer.num_threads=1"]


def job_folders(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow  # the launcher and a process per job
def test_local_launcher_runs_a_sweep_into_the_sweep_folder(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "hydra/launcher=local", "optimizer=sgd,esam", "trainer=debug", *CPU,
                    f"hydra.sweep.dir={sweep}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_folders(sweep)
    assert [p.name for p in jobs] == ["0-digits-resnet_digits-sgd-seed0", "1-digits-resnet_digits-esam-seed0"]
    for job, method in zip(jobs, ("sgd", "esam")):
        s = json.loads((job / "summary.json").read_text())
        assert (s["optimizer"], s["epochs"], s["pieces"]) == (method, 1, 1)
        # Under submitit, resume=null became auto (a requeued job must continue); the first piece starts fresh.
        assert s["config"]["trainer"]["resume"] == "auto"
    assert any((sweep / ".submitit").iterdir())


def _task_pid(sweep: Path) -> int | None:
    """The submitit task process (python -m submitit.core._submit <sweep>/.submitit/...)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in cmd and str(sweep) in cmd:
            return int(proc.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the task process through /proc")
def test_preempted_job_is_requeued_into_the_same_folder_and_continues(tmp_path):
    sweep, epochs = tmp_path / "sweep", 25
    env = {**os.environ, "WANDB_MODE": "disabled"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "esam.train", "-m", "hydra/launcher=local", "optimizer=sgd", *CPU,
         f"trainer.epochs={epochs}", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = sweep / "0-digits-resnet_digits-sgd-seed0" / "metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.2)
        pid = _task_pid(sweep)
        assert pid is not None and len(metrics.read_text().splitlines()) < epochs, "the job ended before the signal"
        os.kill(pid, signal.SIGUSR1)  # what Slurm sends signal_delay_s before the limit / on pre-emption
        out, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, out[-3000:]
    job = job_folders(sweep)
    assert [p.name for p in job] == ["0-digits-resnet_digits-sgd-seed0"]  # no second folder
    s = json.loads((job[0] / "summary.json").read_text())
    assert s["pieces"] == 2 and s["epochs"] == epochs
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == list(range(1, epochs + 1))
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_0_log.*"))
    assert "checkpoint saved" in logs and "Requeued job" in logs and "resumed from" in logs


@pytest.mark.slow
@pytest.mark.ddp
def test_multi_task_job_trains_as_ddp_ranks(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", "trainer=debug", *CPU,
                    f"hydra.sweep.dir={sweep}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job, = job_folders(sweep)
    s = json.loads((job / "summary.json").read_text())
    assert s["world_size"] == 2
    assert len((job / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 writes, once


def test_submitit_tasks_become_torch_distributed_ranks(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "x")  # recorded, so the teardown removes what the call sets
        monkeypatch.delenv(key)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    for key, value in {"SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
                       "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NODEID": "0",
                       "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}.items():
        monkeypatch.setenv(key, value)
    env_from_submitit()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("1", "1", "2")
    assert os.environ["MASTER_ADDR"] and 20000 <= int(os.environ["MASTER_PORT"]) < 40000


def test_submitit_asks_for_the_signal_the_trainer_checkpoints_on():
    import esam.train  # noqa: F401  (sets the default before any launcher imports submitit)
    from esam.engine import STOP_SIGNALS

    assert "SIG" + os.environ["SUBMITIT_PREEMPT_SIGNAL"] in STOP_SIGNALS
