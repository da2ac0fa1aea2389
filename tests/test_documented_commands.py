"""Every command written in README.md and docs/*.md runs, read from the files themselves.

A doc that drifts from the code fails here. Each command is exercised the way a user runs it,
shrunk to seconds: ``python -m esam.train`` composes the exact arguments and trains their first
step (``trainer=debug``, ``dataset.fake`` where the data is not on this machine, a stand-in model
for the paper's large ones, the first job of a multirun), ``python -m esam.bench`` runs on a tiny
model, ``python -m esam.report`` and ``python -m esam.demo`` run on a tiny run folder,
``make <target>`` expands (``make -n``) to commands that are exercised the same way, and
the scripts run. The few commands that need a GPU or a login name the test that covers them.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob

from esam.train import CONFIG_DIR, added_key_problem
from helpers import REPO
from helpers.smoke import train_first_steps

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
STARTS = ("python -m esam", "python3 -m esam", "make ", "python scripts/", "bash scripts/")
# Placeholders the docs write, and what a test puts there.
FILL = {"<dataset>_<model>_<method>": "cifar10_resnet18_sam", "<method>": "looksam",
        "<run folders or multirun dirs>": "{runs}", "results/x": "{out}"}
# Commands a CPU test cannot run as written, and the test that covers what they do.
COVERED_ELSEWHERE = {
    "bash scripts/gpu_check.sh": "tests/test_gpu_check.py",      # needs a GPU; its --dry-run runs there
    "make gpu-check": "tests/test_gpu_check.py",
    "python scripts/gpu_wheels.py": "tests/test_gpu_check.py",   # builds the wheel folder (slow, once)
    "make gpu-wheels": "tests/test_gpu_check.py",
    "make test": "tests/",                                       # what is running now
    "make test-fast": "tests/",
    "make leaderboard": "tests/test_leaderboard.py",             # 468 runs; a tiny board end to end there
    "python scripts/compile_check.py": "tests/test_documented_commands.py",  # below, on 2 steps
}
BENCH_TINY = ["model=resnet_digits", "dataset.image_size=8", "dataset.num_train=32", "dataset.num_test=8",
              "dataset.batch_size=8", "device=cpu", "precision=fp32", "steps=1", "repeats=1", "warmup_steps=1",
              "phase_steps=0", "num_batches=1", "num_threads=1", "flop_steps=1", "max_busy_repeats=0"]


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every command line in the docs: bash blocks and inline code."""
    found: list[tuple[str, str]] = []
    for path in DOCS:
        text = path.read_text()
        for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
            for line in block.splitlines():
                line = line.split("  #")[0].split(" # ")[0].strip().removeprefix("$ ")
                if line.startswith(STARTS):
                    found.append((path.name, line))
        for code in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
            if code.startswith(STARTS):
                found.append((path.name, code.strip()))
    seen, out = set(), []
    for where, cmd in found:
        if cmd not in seen:
            seen.add(cmd)
            out.append((where, cmd))
    return out


COMMANDS = documented_commands()


def test_the_docs_hold_the_commands_this_file_knows():
    """The parser finds the README's two first commands and the main job (a parser that finds
    nothing would pass every test below)."""
    cmds = [c for _, c in COMMANDS]
    assert cmds[:2] == ["make demo", "make test"] and len(cmds) > 25
    assert any(c.startswith("python -m esam.train") for c in cmds)


# -- exercising each kind of command -------------------------------------------------------------
def first_values(args: list[str]) -> list[str]:
    """Each sweep override as its first value (globs resolved against the config group, as
    Hydra's sweeper does); inside an initialised Hydra."""
    parser, loader = OverridesParser.create(), GlobalHydra.instance().config_loader()
    job = []
    for text in args:
        o = parser.parse_override(text)
        if o.is_sweep_override():
            if isinstance(o.value(), Glob):
                values = o.value().filter(loader.get_group_options(o.key_or_group))
            else:
                values = list(o.sweep_string_iterator())
            text = f"{o.get_key_element()}={values[0]}"
        job.append(text)
    return job


def compose_train(args: list[str]):
    """(config, overrides) of the command, or of a multirun's first job: the first value of each
    sweep, the command's and then the sweep file's (hydra.sweeper.params)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        job = first_values(args)
        cfg = compose("train", overrides=job, return_hydra_config=True)
        sweeps = dict(cfg.hydra.sweeper.get("params") or {})
        if sweeps:
            given = {a.lstrip("+~").partition("=")[0] for a in job}
            job += first_values([f"{k}={v}" for k, v in sweeps.items() if k not in given])
            cfg = compose("train", overrides=job, return_hydra_config=True)
        return cfg, job


def exercise_train(args: list[str], tmp_path: Path) -> None:
    multirun = any(a in ("-m", "--multirun") for a in args)
    args = [a for a in args if a not in ("-m", "--multirun")]
    if "--cfg" in args:
        i = args.index("--cfg")
        args = args[:i] + args[i + 2:]
        cfg, _ = compose_train(args)
        assert cfg.optimizer.name and cfg.dataset.name
        return
    cfg, job = compose_train(args)
    assert multirun or job == args, "a sweep needs -m"
    job = [a for a in job if not a.startswith(("hydra/", "hydra.", "+hydra"))]
    assert added_key_problem(cfg, job) is None
    _, trainer, summary = train_first_steps(job, tmp_path / "run", extra=("trainer.checkpoint_every=0",))
    assert trainer.global_step == 1 and summary["test_acc_final"] >= 0.0


def exercise_bench(args: list[str], tmp_path: Path) -> None:
    from esam.bench.runner import run

    conf = str(REPO / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("bench", overrides=[*args, *BENCH_TINY, f"results_dir={tmp_path}"])
    lines: list[str] = []
    res = run(cfg, log=lines.append)
    assert len(res["table"]) >= 1 and res["files"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """One finished tiny run, for the report's commands."""
    out = tmp_path_factory.mktemp("runs")
    exercise_train(["optimizer=sam"], out)
    return out / "run"


def exercise_report(args: list[str], tmp_path: Path, runs: Path) -> None:
    from esam.report.cli import main

    args = [a.replace("{runs}", str(runs)).replace("{out}", str(tmp_path / "out")) for a in args]
    if "--wandb" in args:  # no login here: one sentence and exit 2 (the read path: tests/test_loggers.py)
        with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as err:
            main([a.replace("[--push]", "") for a in args if a != "[--push]"])
        assert e.value.code == 2 and len(err.getvalue().strip().splitlines()) == 1
        return
    # The command's run folders are this test's run; --out goes to tmp_path (a doc may name results/).
    rest, i = [], 0
    while i < len(args):
        if args[i] == "--out":
            i += 2
            continue
        if not args[i].startswith("-"):
            i += 1
            continue
        rest.append(args[i])
        i += 1
    args = [str(runs), *rest, "--out", str(tmp_path / "out")]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main([*args, "--no-plots"])
    assert "sam" in out.getvalue().lower()


def exercise_demo(args: list[str], tmp_path: Path, monkeypatch) -> None:
    from esam.demo import main

    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main([*args, "trainer.epochs=1", "trainer.limit_train_batches=2", "trainer.limit_test_batches=1"])
    assert "sgd" in out.getvalue().lower() and "esam" in out.getvalue().lower()


def run_script(args: list[str], tmp_path: Path) -> None:
    script = args[0]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if script == "scripts/methods_table.py":
        out = tmp_path / "methods.md"
        subprocess.run([sys.executable, script, "--output", str(out)], cwd=REPO, check=True, env=env,
                       capture_output=True, timeout=120)
        assert out.read_text() == (REPO / "docs" / "methods.md").read_text()  # the committed table is current
    elif script == "scripts/model_table.py":
        out = tmp_path / "models.md"
        subprocess.run([sys.executable, script, "--output", str(out)], cwd=REPO, check=True, env=env,
                       capture_output=True, timeout=300)
        made = out.read_text().replace(str(out), "results/models.md")
        assert made == (REPO / "results" / "models.md").read_text()  # the committed table is current
    elif script == "scripts/compile_check.py":  # torch.compile's build takes minutes: 2 eager steps
        done = subprocess.run([sys.executable, script, "--help"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and "--steps" in done.stdout
    else:
        pytest.fail(f"no exerciser for the documented script {script}")


def make_lines(args: list[str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    done = subprocess.run(["make", "--no-print-directory", "-n", "-o", "install", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if line.strip()]


def exercise(cmd: str, tmp_path: Path, runs_factory, monkeypatch) -> None:
    for key, value in FILL.items():
        cmd = cmd.replace(key, value)
    cmd = re.sub(r"\s*\[--push\]", "", cmd)
    words = shlex.split(cmd)
    if words[0] in ("python", "python3", ".venv/bin/python", "$(PYTHON)") and words[1] == "-m":
        module, args = words[2], words[3:]
        if module == "esam.train":
            return exercise_train(args, tmp_path)
        if module == "esam.bench":
            return exercise_bench(args, tmp_path)
        if module == "esam.report":
            return exercise_report(args, tmp_path, runs_factory())
        if module == "esam.demo":
            return exercise_demo(args, tmp_path, monkeypatch)
        if module == "esam.bench.pipeline":
            return None  # make bench-trainer: tests/test_trainer_bench.py runs it
        if module == "pytest":
            return None
        pytest.fail(f"no exerciser for python -m {module}")
    if words[0] in ("python", "python3", ".venv/bin/python"):
        return run_script(words[1:], tmp_path)
    if words[0] == "make":
        if words[1:] == ["help"]:
            out = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True,
                                 text=True, timeout=60).stdout
            assert "cifar10-%" in out and "test" in out
            return None
        ran = 0
        for line in make_lines(words[1:]):
            line = line.replace(".venv/bin/python", "python")
            if line.startswith(("python -m esam", "python scripts/")):
                exercise(line, tmp_path, runs_factory, monkeypatch)
                ran += 1
        assert ran, f"{cmd} expands to no command this test can exercise: {make_lines(words[1:])}"
        return None
    pytest.fail(f"no exerciser for {cmd!r}")


def covered_elsewhere(cmd: str) -> str | None:
    return next((test for start, test in COVERED_ELSEWHERE.items() if cmd == start or cmd.startswith(start + " ")),
                None)


@pytest.mark.parametrize("where,cmd", COMMANDS, ids=[c for _, c in COMMANDS])
def test_documented_command_runs(where, cmd, tmp_path, request, monkeypatch):
    test = covered_elsewhere(cmd)
    if test is not None:
        assert (REPO / test).exists(), f"{cmd} ({where}) is said to be covered by {test}"
        return
    exercise(cmd, tmp_path, lambda: request.getfixturevalue("run_folder"), monkeypatch)
