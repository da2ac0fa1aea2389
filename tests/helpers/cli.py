"""Compose a config the way the CLI does, run the CLI in a subprocess."""
from __future__ import annotations

import contextlib
import io
import logging
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


@contextlib.contextmanager
def _logging_restored():
    """Hydra configures logging for its run (root level INFO, console and train.log handlers);
    put every logger back as it was, so later tests see the process they expect."""
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    saved = [(lg, lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers]
    try:
        yield
    finally:
        for lg, level, handlers, propagate, disabled in saved:
            for h in lg.handlers:
                if h not in handlers:
                    h.close()
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate, lg.disabled = propagate, disabled


def run_cli_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """What :func:`run_cli` returns for ``python -m esam.train args``, from the CLI's own entry
    point called in this process (Hydra and all), without an interpreter start-up. For what
    happens before and after a run (composition errors, one-sentence errors, exit codes); the
    process itself is covered by the tests that use :func:`run_cli`."""
    from esam.train import main, resume_into_its_folder

    out, err = io.StringIO(), io.StringIO()
    argv, full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = ["esam.train", *resume_into_its_folder(list(args))]  # as esam/train.py's __main__ does
    os.environ["HYDRA_FULL_ERROR"] = "0"
    code = 0
    try:
        with _logging_restored(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = argv
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR")
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    return subprocess.CompletedProcess(["esam.train", *args], code, out.getvalue(), err.getvalue())
