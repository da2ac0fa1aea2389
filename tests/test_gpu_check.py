"""scripts/gpu_check.sh: its CPU dry run does every step at tiny size and leaves the files a GPU
run would leave (the GPU run itself needs a GPU), here on a Python that has torch but not Hydra,
omegaconf, antlr4, submitit or wandb, as the lent GPU machines are, installing those from the
wheel folder scripts/gpu_wheels.py builds; bad invocations fail in one sentence."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
import torch
from packaging.requirements import Requirement

from helpers import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"
WHEELS = REPO / "scripts" / "gpu_wheels.py"

# The lent GPU machines' image (their package list), as far as the check imports: torch, timm,
# pandas, matplotlib and the rest with what they require, but none of LACKS.
MACHINE_HAS = ("torch", "torchvision", "numpy", "timm", "pandas", "matplotlib", "scikit-learn", "tqdm",
               "PyYAML", "pytest", "pytest-timeout", "packaging", "cloudpickle", "typing-extensions", "pip")
LACKS = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "hydra-submitit-launcher", "submitit", "wandb")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_check(*args: str, python: str = sys.executable, timeout: float = 900, env: dict | None = None):
    env = {**(env or os.environ), "WANDB_MODE": "disabled"}
    return subprocess.run(["bash", str(SCRIPT), "--python", python, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def with_requirements(names: tuple[str, ...]) -> dict[str, metadata.Distribution]:
    """The installed distributions ``names`` and everything they require (markers as here)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = canonical(todo.pop())
        if name in found:
            continue
        found[name] = dist = metadata.distribution(name)
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def machine_like_python(root: Path) -> Path:
    """A fresh venv whose only packages are MACHINE_HAS (links to this Python's copies, through
    one .pth): a GPU machine's Python without Hydra or wandb. Returns its interpreter."""
    dists = with_requirements(MACHINE_HAS)
    assert not set(dists) & {canonical(n) for n in LACKS}, sorted(set(dists) & set(LACKS))
    shared = root / "machine-site"
    shared.mkdir()
    for dist in dists.values():
        for top in {f.parts[0] for f in dist.files or () if f.parts[0] not in ("..", "__pycache__")}:
            if not top.endswith(".pth") and not (shared / top).exists():
                (shared / top).symlink_to(Path(dist.locate_file(top)))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site, = (venv / "lib").glob("python3*/site-packages")
    (site / "machine.pth").write_text(f"{shared}\n")
    return venv / "bin" / "python"


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


@pytest.mark.slow  # nine Python processes: 1-3 minutes on a busy 2-core CPU
def test_dry_run_without_hydra_installs_from_wheels_and_does_every_step(tmp_path):
    python = machine_like_python(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = "import importlib.util as u; print([m for m in ('hydra', 'omegaconf', 'antlr4', 'submitit', 'wandb', 'esam') if u.find_spec(m)])"
    has = subprocess.run([python, "-c", probe], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert has.stdout.strip() == "[]", has.stderr  # a machine as lent: torch, no Hydra, no wandb

    wheels = tmp_path / "wheels"  # offline: this Python's installed copies, at pyproject's pins
    made = subprocess.run([sys.executable, str(WHEELS), str(wheels), "--from-installed"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name.split("-")[0] for p in wheels.glob("*.whl")) == [
        "antlr4_python3_runtime", "hydra_core", "hydra_submitit_launcher", "omegaconf", "submitit"]

    out = tmp_path / "check"
    proc = gpu_check("--dry-run", "--methods", "sgd,esam", "--out", str(out), "--wheels", str(wheels),
                     python=str(python), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = pd.read_csv(out / "steps.tsv", sep="\t")
    assert list(steps.step) == ["install-deps", "tests", "bench-resnet18-bf16", "bench-resnet18-tf32",
                                "bench-wrn28_10-bf16", "pipeline", "train-sgd", "train-esam"]
    assert (steps.status == "ok").all()
    # Hydra and friends went into the venv; torch is still the machine's; wandb was never needed.
    where = subprocess.run([python, "-c", "import hydra, submitit, torch; print(hydra.__file__, submitit.__file__, torch.__file__)"],
                           env=env, capture_output=True, text=True, cwd=tmp_path)
    hydra_at, submitit_at, torch_at = map(Path, where.stdout.split())
    assert tmp_path / "venv" in hydra_at.parents and tmp_path / "venv" in submitit_at.parents
    assert torch_at.parent == tmp_path / "machine-site" / "torch" and (tmp_path / "machine-site" / "torch").is_symlink()
    assert "torch" not in (out / "logs" / "install-deps.log").read_text().split("Installing collected packages:")[-1]
    no_wandb = subprocess.run([python, "-c", "import wandb"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert no_wandb.returncode != 0

    env_json = json.loads((out / "env.json").read_text())
    assert env_json["dry_run"] and env_json["torch"] == torch.__version__ and "--dry-run" in env_json["command"]
    assert {"device_name", "driver", "cuda", "git_commit"} <= env_json.keys()
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


# A run with logger=none, and every entry point's import, in a fresh process: wandb stays unimported.
WANDB_FREE = """
import sys
from hydra import compose, initialize_config_dir
import esam.bench, esam.bench.pipeline, esam.demo, esam.report
from esam.train import CONFIG_DIR, run
with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
    cfg = compose("train", overrides=["logger=none", "trainer=debug", "trainer.limit_train_batches=1",
                                      "trainer.limit_test_batches=1", "trainer.precision=fp32", "trainer.num_threads=1"])
run(cfg, sys.argv[1])
print(sorted(m for m in sys.modules if m.split(".")[0] == "wandb"))
"""


def test_logger_none_never_imports_wandb(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", WANDB_FREE, str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run" / "summary.json").is_file()
