"""scripts/gpu_check.sh: its CPU dry run does every step at tiny size and leaves the files a GPU
run would leave (the GPU run itself needs a GPU); bad invocations fail in one sentence."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def gpu_check(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_header_holds_the_prepared_command_for_a_15_minute_budget():
    head = SCRIPT.read_text().split("set -uo pipefail")[0]
    assert "15-minute GPU budget" in head and "bash scripts/gpu_check.sh --quick --wheels wheels" in head
    assert "--dry-run" in head


@pytest.mark.slow  # starts a Python process: in `make test`, not `make test-fast`
def test_unknown_option_and_missing_gpu_fail_in_one_sentence():
    bad = gpu_check("--frobnicate", timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown option --frobnicate (see --help)"
    if not torch.cuda.is_available():
        proc = gpu_check("--out", "/nonexistent/never-made", timeout=120)
        assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr


@pytest.mark.slow  # eight Python processes: 1-3 minutes on a busy 2-core CPU
def test_dry_run_does_every_step_and_writes_one_folder(tmp_path):
    out = tmp_path / "check"
    proc = gpu_check("--dry-run", "--methods", "sgd,esam", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = pd.read_csv(out / "steps.tsv", sep="\t")
    assert list(steps.step) == ["tests", "bench-resnet18-bf16", "bench-resnet18-tf32", "bench-wrn28_10-bf16",
                                "pipeline", "train-sgd", "train-esam"]
    assert (steps.status == "ok").all()
    env = json.loads((out / "env.json").read_text())
    assert env["dry_run"] and env["torch"] == torch.__version__ and "--dry-run" in env["command"]
    assert {"device_name", "driver", "cuda", "git_commit"} <= env.keys()
    # The bench: three settings, the methods asked for plus the m-sharpness rows, with FLOPs.
    tables = sorted((out / "bench").glob("*.csv"))
    assert len(tables) == 3
    for t in tables:
        df = pd.read_csv(t)
        assert list(df.method) == ["sgd", "esam", "esam_m64"] and (df.gflops_step > 0).all()
    assert "### Trainer vs bench" in next((out / "pipeline").glob("*.md")).read_text()
    for m in ("sgd", "esam"):
        summary = json.loads((out / "train" / m / "summary.json").read_text())
        assert summary["epochs"] == 2 and summary["method"] == m
    text = (out / "summary.md").read_text()
    assert "| train-esam | ok |" in text and "## 2-epoch synthetic runs" in text
    assert (out / "logs" / "tests.log").read_text().count("skipped") >= 1  # no GPU here: skipped, not failed
