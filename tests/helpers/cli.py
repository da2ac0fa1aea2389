"""Compose a config the way the CLI does, run the CLI in a subprocess."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

import esam.config  # noqa: F401  (registers the schemas)
from esam.train import CONFIG_DIR

REPO = Path(__file__).resolve().parents[2]

FAST = ["trainer.progress=false", "trainer.precision=fp32", "trainer.timing_warmup_steps=1"]


def compose_cfg(overrides: list[str], config_name: str = "train"):
    """The config `python -m esam.train <overrides>` would run (without Hydra's own keys)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def run_cli(args: list[str], cwd: Path | None = None, timeout: float = 600, module: str = "esam.train"):
    """Run ``python -m <module> args`` and return the CompletedProcess (text output)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A free localhost port for a gloo rendezvous (each DDP job needs its own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
