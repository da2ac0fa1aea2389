"""Reliability: a stopped and resumed run equals an unstopped one, signals leave a usable
checkpoint, divergence stops cleanly, bad input is one sentence, files are never half-written.

Bitwise checks run in fp32 on one CPU thread (same kernels in every piece). Stops are real
signals sent to this process from inside a step or an evaluation, so the trainer's own
handlers do the work; a guard handler makes sure a stray signal cannot kill pytest.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, compose_cfg, run_cli, run_cli_in_process
from esam.errors import UserError
from esam.runtime import atomic_torch_save, atomic_write_json, atomic_write_text, load_checkpoint
from esam.engine import NonFiniteLossError, Trainer

EPOCHS, STEPS = 4, 4  # steps per epoch
TINY = ["dataset=digits", "model=resnet_digits", "dataset.batch_size=32",
        f"trainer.limit_train_batches={STEPS}", "trainer.limit_test_batches=1",
        "trainer.precision=fp32", "trainer.progress=false", "trainer.device=cpu",
        "trainer.num_threads=1", "trainer.timing_warmup_steps=1", "logger=none"]
METHOD = {"sgd": [], "sam": ["optimizer=sam"], "esam": ["optimizer=esam"]}
TIMING = {"epoch_time_s", "train_img_per_s", "epoch_img_per_s", "step_ms", "timed_seconds", "wall_time_s"}
RESULT_FIELDS = ("train_loss", "train_acc", "test_loss", "test_acc", "test_acc5")
TRACEBACK = "Traceback (most recent call last)"


# -- helpers --------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def guard_signals_and_threads():
    """Stand-in handlers for the stop signals (the trainer chains to them: record which), and
    torch's thread count restored after the trainer set it to 1."""
    seen: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: seen.append(signum))
                for s in (signal.SIGTERM, signal.SIGUSR1)}
    threads = torch.get_num_threads()
    yield seen
    for s, h in previous.items():
        signal.signal(s, h)
    torch.set_num_threads(threads)


def overrides(method: str, *extra: str) -> list[str]:
    return [*TINY, *METHOD[method], f"trainer.epochs={EPOCHS}", *extra]


def fit(run_dir: Path, ovr: list[str], hook=None) -> tuple[Trainer, int | dict]:
    """Train in-process; returns (trainer, summary) or (trainer, exit code) if it stopped."""
    trainer, result, _ = fit_text(run_dir, ovr, hook)
    return trainer, result


def fit_text(run_dir: Path, ovr: list[str], hook=None) -> tuple[Trainer, int | dict, str]:
    """:func:`fit`, plus what the run printed."""
    trainer = Trainer(compose_cfg(ovr), run_dir)
    if hook is not None:
        hook(trainer)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            return trainer, trainer.fit(), out.getvalue()
        except SystemExit as e:
            return trainer, e.code, out.getvalue()


def signal_after_step(n: int, sig: signal.Signals):
    """Hook: send ``sig`` to this process right after optimizer step ``n`` (1-based, this piece)."""
    def hook(trainer: Trainer) -> None:
        step, count = trainer.optimizer.step, [0]

        def counted(*args, **kwargs):
            out = step(*args, **kwargs)
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), sig)
            return out

        trainer.optimizer.step = counted
    return hook


def signal_after_epoch(k: int, sig: signal.Signals):
    """Hook: send ``sig`` during the evaluation of epoch ``k``: the stop comes at the epoch's end."""
    def hook(trainer: Trainer) -> None:
        evaluate, count = trainer.evaluate, [0]

        def counted():
            out = evaluate()
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), sig)
            return out

        trainer.evaluate = counted
    return hook


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def assert_same_optimizer(a, b) -> None:
    """Momentum buffers bitwise, lr/rho in the groups, and the SWP generator state."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["base"]["param_groups"] == sb["base"]["param_groups"]
    assert sa["base"]["state"].keys() == sb["base"]["state"].keys()
    for i in sa["base"]["state"]:
        assert_same_tensors(sa["base"]["state"][i], sb["base"]["state"][i], f"optimizer state {i}")
    assert torch.equal(a.generator.get_state(), b.generator.get_state()), "SWP generator state differs"


def leftovers(run_dir: Path) -> list[Path]:
    """Temp files of the atomic writers (".<name>.tmp<pid>") left in the run folder."""
    return [p for p in run_dir.rglob("*") if ".tmp" in p.name]


def finite_weights(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


_straight: dict[tuple, tuple[Trainer, list[dict], dict, Path]] = {}


@pytest.fixture
def straight(tmp_path_factory):
    """The unstopped run for (method, *extra overrides), trained once per test session."""
    def get(method: str, *extra: str):
        key = (method, *extra)
        if key not in _straight:
            run_dir = tmp_path_factory.mktemp(f"straight-{method}")
            trainer, summary = fit(run_dir, overrides(method, *extra))
            assert isinstance(summary, dict) and summary["pieces"] == 1
            _straight[key] = (trainer, metrics(run_dir), summary, run_dir)
        return _straight[key]
    return get


def assert_matches_straight(resumed: Trainer, run_dir: Path, ref: tuple) -> None:
    ref_trainer, ref_metrics, _, _ = ref
    rows = metrics(run_dir)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))  # no gaps, no duplicates
    assert without_timing(rows) == without_timing(ref_metrics)
    assert_same_tensors(resumed.model.state_dict(), ref_trainer.model.state_dict(), "final weights")
    assert_same_optimizer(resumed.optimizer, ref_trainer.optimizer)
    assert resumed.global_step == ref_trainer.global_step == EPOCHS * STEPS


# -- stop and resume ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sgd", "sam", "esam"])
def test_resume_between_epochs_equals_straight_run(tmp_path, straight, method, guard_signals_and_threads):
    ref = straight(method)
    _, code = fit(tmp_path, overrides(method), hook=signal_after_epoch(2, signal.SIGUSR1))
    assert code == 128 + signal.SIGUSR1
    assert guard_signals_and_threads == [signal.SIGUSR1]  # handed on (submitit requeues on it), once
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["pieces"]) == (2, 0, 1)
    assert [r["epoch"] for r in metrics(tmp_path)] == [1, 2]
    assert not (tmp_path / "summary.json").exists()
    # A crash between the metrics append and the checkpoint leaves an extra line: the
    # resumed run must rewrite the file from the checkpoint, not append after it.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**metrics(tmp_path)[-1], "epoch": 3}) + "\n{\"epoch\": 4, \"trunc")

    resumed, summary = fit(tmp_path, overrides(method, "trainer.resume=auto"))
    assert isinstance(summary, dict), summary
    assert_matches_straight(resumed, tmp_path, ref)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["pieces"] == summary["pieces"] == 2 and on_disk["epochs"] == EPOCHS
    assert on_disk["train_time_s"] >= ckpt["train_time_s"] > 0  # the first piece's time is carried
    assert on_disk["test_acc_final"] == ref[2]["test_acc_final"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("method,stop_step,resume,extra", [
    ("sgd", 6, "path", []),            # epoch 2, step 2; resumed in another folder
    ("sam", 8, "auto", []),            # after the last step of epoch 2, before its evaluation
    ("esam", 6, "auto", []),           # SWP generator and momentum mid-epoch
    ("esam", 11, "auto", ["trainer.schedule_per=step"]),  # lr changes every step
])
def test_resume_mid_epoch_equals_straight_run(tmp_path, straight, method, stop_step, resume, extra):
    ref = straight(method, *extra)
    first = tmp_path / "first"
    _, code = fit(first, overrides(method, *extra), hook=signal_after_step(stop_step, signal.SIGTERM))
    assert code == 128 + signal.SIGTERM
    ckpt = load_checkpoint(first / "checkpoints" / "last.pt")
    epoch, step = divmod(stop_step, STEPS)
    if step == 0:
        epoch, step = epoch - 1, STEPS
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (epoch, step, stop_step)
    assert len(metrics(first)) == epoch

    second = first if resume == "auto" else tmp_path / "second"
    target = "auto" if resume == "auto" else str(first / "checkpoints" / "last.pt")
    resumed, summary = fit(second, overrides(method, *extra, f"trainer.resume={target}"))
    assert isinstance(summary, dict) and summary["pieces"] == 2
    assert_matches_straight(resumed, second, ref)
    # The interrupted epoch still reports its whole epoch's steps.
    assert metrics(second)[epoch]["train_steps"] == STEPS


def test_stopping_twice_still_equals_straight_run(tmp_path, straight):
    """Three pieces: stopped mid-epoch 1, then mid-epoch 3; pieces counts all of them."""
    ref = straight("esam")
    _, code = fit(tmp_path, overrides("esam"), hook=signal_after_step(3, signal.SIGUSR1))
    assert code == 128 + signal.SIGUSR1
    _, code = fit(tmp_path, overrides("esam", "trainer.resume=auto"), hook=signal_after_step(6, signal.SIGTERM))
    assert code == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["global_step"] == 9
    resumed, summary = fit(tmp_path, overrides("esam", "trainer.resume=auto"))
    assert summary["pieces"] == 3
    assert_matches_straight(resumed, tmp_path, ref)


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, straight):
    ref = straight("sgd")
    trainer, summary, text = fit_text(tmp_path, overrides("sgd", "trainer.resume=auto"))
    assert summary["pieces"] == 1
    assert_matches_straight(trainer, tmp_path, ref)
    # ... and says so, in one line, before the first epoch's.
    first = text.splitlines()[0]
    assert first.startswith("trainer.resume=auto: no checkpoint in") and "starts at epoch 1" in first, text


@pytest.mark.parametrize("stop_step,words", [
    (5, "next is epoch 2/4 at step 2/4"),    # stopped after epoch 2's first step
    (4, "epoch 1/4 has run all its steps; next is its evaluation"),
])
def test_resume_line_says_what_happens_next(tmp_path, stop_step, words):
    fit(tmp_path, overrides("sgd"), hook=signal_after_step(stop_step, signal.SIGTERM))
    _, summary, text = fit_text(tmp_path, overrides("sgd", "trainer.resume=auto"))
    lines = text.splitlines()
    assert lines[0].startswith("resumed from") and lines[0].endswith(words), lines[0]
    epoch = 1 + stop_step // (STEPS + 1)
    assert lines[1].startswith(f"epoch {epoch:>3}/{EPOCHS}"), lines[1]  # the epoch it announced


def test_the_printed_resume_command_continues_the_run_in_its_folder(tmp_path, straight):
    """After a stop the run prints a command; pasted as it is, it continues in the same folder
    (train.log there gets the console lines) and ends where the unstopped run ends."""
    ref = straight("sgd")
    ovr = overrides("sgd")
    (tmp_path / ".hydra").mkdir()  # what `python -m esam.train` leaves in a run folder
    (tmp_path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in ovr))
    _, code, text = fit_text(tmp_path, ovr, hook=signal_after_step(6, signal.SIGTERM))
    assert code == 128 + signal.SIGTERM
    line, = [x for x in text.splitlines() if x.startswith("received SIGTERM")]
    command = shlex.split(line.split("to continue, run: ", 1)[1])
    assert command[:3] == ["python", "-m", "esam.train"] and command[-1] == f"trainer.resume={tmp_path}"

    done = run_cli_in_process(command[3:])  # its arguments through the CLI's entry point, here
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and str(tmp_path) in done.stdout
    assert without_timing(metrics(tmp_path)) == without_timing(ref[1])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pieces"] == 2 and summary["test_acc_final"] == ref[2]["test_acc_final"]
    log = (tmp_path / "train.log").read_text()
    assert "resumed from" in log and f"epoch   {EPOCHS}/{EPOCHS}" in log and "done: test acc" in log


def test_resume_mid_budget_equals_straight_run(tmp_path):
    """ESAM at budget 3 (about 7 steps: epoch 1 and most of epoch 2), stopped mid-epoch 2."""
    ovr = [*TINY, "optimizer=esam", "trainer.budget=3", f"trainer.epochs={EPOCHS}"]
    ref, ref_summary = fit(tmp_path / "straight", ovr)
    _, code = fit(tmp_path / "run", ovr, hook=signal_after_step(5, signal.SIGTERM))
    assert code == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["compute_units"] > 0
    resumed, summary = fit(tmp_path / "run", [*ovr, "trainer.resume=auto"])
    rows = metrics(tmp_path / "run")
    assert without_timing(rows) == without_timing(metrics(tmp_path / "straight"))
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["train_steps"] < STEPS  # a partial last epoch
    assert summary["compute_used"] == ref_summary["compute_used"] == pytest.approx(3.0, abs=0.25)
    assert summary["pieces"] == 2 and resumed.global_step == ref.global_step
    assert_same_tensors(resumed.model.state_dict(), ref.model.state_dict(), "final weights")
    assert_same_optimizer(resumed.optimizer, ref.optimizer)


def test_resume_of_a_finished_run_keeps_its_results(tmp_path, straight):
    """Re-running a finished run with resume=auto trains nothing and rewrites the same results."""
    ref = straight("sgd")
    fit(tmp_path, overrides("sgd"))
    before = metrics(tmp_path)
    trainer, summary = fit(tmp_path, overrides("sgd", "trainer.resume=auto"))
    assert metrics(tmp_path) == before and summary["test_acc_final"] == ref[2]["test_acc_final"]
    assert_same_tensors(trainer.model.state_dict(), ref[0].model.state_dict(), "weights")


# -- a different config cannot continue a checkpoint ---------------------------------------
@pytest.mark.parametrize("change,words", [
    (["model=resnet18"], ["model", "resnet_digits", "resnet18"]),
    (["optimizer=sam"], ["optimizer", "sgd", "sam"]),   # same state layout: would load silently
    (["dataset=synthetic", "dataset.in_channels=1", "dataset.image_size=8", "dataset.num_train=64",
      "dataset.num_test=32"], ["dataset", "digits", "synthetic"]),
])
def test_resume_with_a_different_config_is_a_clear_error(tmp_path, change, words):
    first = tmp_path / "first"
    fit(first, [*TINY, "trainer.epochs=1"])
    ckpt = first / "checkpoints" / "last.pt"
    with pytest.raises(UserError) as info:
        fit(tmp_path / "second", [*TINY, "trainer.epochs=2", *change, f"trainer.resume={ckpt}"])
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert not (tmp_path / "second" / "summary.json").exists()


# -- real signals to a real training process ------------------------------------------------
LONG = ["trainer.limit_train_batches=0", "dataset.batch_size=16", "trainer.epochs=3", "optimizer=esam"]


def _popen(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    args = [*TINY, *LONG, f"hydra.run.dir={run_dir}", *extra]
    # A child inherits an ignored SIGINT (pytest run in the background of a script), and a
    # process started so keeps ignoring Ctrl-C: give it the terminal's default.
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    return subprocess.Popen([sys.executable, "-m", "esam.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if ignored else None)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_signal_to_training_process_saves_and_resumes(tmp_path, sig):
    """SIGTERM (kill), SIGUSR1 (Slurm) and Ctrl-C (SIGINT, exit 130 like a shell's) alike."""
    proc = _popen(tmp_path)
    try:
        deadline = time.monotonic() + 180
        # best.pt is the last file written after epoch 1: from then on the 90 steps of epoch 2 run.
        while not (tmp_path / "checkpoints" / "best.pt").is_file():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training never logged epoch 1"
            time.sleep(0.02)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, (out, err)
    assert f"received {sig.name}" in out and TRACEBACK not in err
    if sig == signal.SIGINT:  # the first Ctrl-C is answered at once, and says how to quit sooner
        assert "Ctrl-C: stopping after this step with a checkpoint" in err and "KeyboardInterrupt" not in err
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert 1 <= ckpt["epoch"] < 3 and ckpt["step_in_epoch"] > 0 and finite_weights(ckpt["model"])
    assert len(metrics(tmp_path)) == ckpt["epoch"]
    assert not (tmp_path / "summary.json").exists() and leftovers(tmp_path) == []

    # The command the run printed, pasted as it is, continues in the same folder.
    line, = [x for x in out.splitlines() if x.startswith(f"received {sig.name}")]
    command = shlex.split(line.split("to continue, run: ", 1)[1])
    assert command[:3] == ["python", "-m", "esam.train"] and command[-1] == f"trainer.resume={tmp_path}"
    if sig == signal.SIGINT:
        return  # the same checkpoint and command as SIGTERM's: the resume itself is checked there
    done = run_cli(command[3:])
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    assert [r["epoch"] for r in metrics(tmp_path)] == [1, 2, 3]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pieces"] == 2 and summary["status"] == "completed"
    assert leftovers(tmp_path) == []


# -- divergence -----------------------------------------------------------------------------
def assert_diverged_cleanly(run_dir: Path, epochs_done: int) -> None:
    """last.pt is the last good state; no summary; metrics only of finished, finite epochs."""
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == epochs_done and finite_weights(ckpt["model"])
    assert not (run_dir / "summary.json").exists()
    rows = metrics(run_dir)
    assert [r["epoch"] for r in rows] == list(range(1, epochs_done + 1))
    assert all(math.isfinite(r[k]) for r in rows for k in RESULT_FIELDS)
    assert leftovers(run_dir) == []


@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.slow), "bf16"])  # fp32: a process
def test_divergence_via_cli_stops_with_epoch_and_step(tmp_path, precision):
    # fp32 as a real process (what a shell sees), bf16 through the same entry point in this process.
    cli = run_cli if precision == "fp32" else run_cli_in_process
    res = cli([*TINY, "optimizer.lr=1e20", "trainer.epochs=2", f"trainer.precision={precision}",
               f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and TRACEBACK not in res.stderr, res.stderr
    assert lines[0].startswith("error: non-finite training loss at epoch 1 step 2"), lines
    assert_diverged_cleanly(tmp_path, epochs_done=0)
    assert lines[0] in (tmp_path / "train.log").read_text()  # the log file says how the run ended


def test_divergence_in_a_later_epoch_keeps_the_previous_epoch(tmp_path):
    """Weights turned NaN before step 2 of epoch 2: last.pt is epoch 1's state, and an old
    summary.json of this folder (from a shorter finished run) does not survive."""
    fit(tmp_path, [*TINY, "trainer.epochs=1"])
    assert (tmp_path / "summary.json").exists()
    epoch1 = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]

    def poison(trainer: Trainer) -> None:
        step = trainer.optimizer.step

        def poisoned(*args, **kwargs):
            if trainer.global_step == STEPS + 1:
                with torch.no_grad():
                    next(trainer.model.parameters()).fill_(float("nan"))
            return step(*args, **kwargs)

        trainer.optimizer.step = poisoned

    with pytest.raises(NonFiniteLossError, match="epoch 2 step 2"):
        fit(tmp_path, [*TINY, "trainer.epochs=3", "trainer.resume=auto"], hook=poison)
    assert_diverged_cleanly(tmp_path, epochs_done=1)
    assert_same_tensors(load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"], epoch1, "last.pt")


def test_weights_that_break_after_a_finite_loss_are_not_saved(tmp_path):
    """lr=1e6 with one step per epoch: the training loss is still finite but the update
    wrecks the weights; the evaluation must catch it before metrics or checkpoint do."""
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        fit(tmp_path, [*TINY, "trainer.limit_train_batches=1", "optimizer.lr=1e6", "trainer.epochs=2"])
    assert_diverged_cleanly(tmp_path, epochs_done=0)


# -- bad input: one sentence, non-zero exit, no traceback, no summary -----------------------
def _corrupt(tmp_path: Path) -> str:
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(os.urandom(4096))
    return str(bad)


def _truncated(tmp_path: Path) -> str:
    fit(tmp_path / "src", [*TINY, "trainer.epochs=1"])
    data = (tmp_path / "src" / "checkpoints" / "last.pt").read_bytes()
    cut = tmp_path / "truncated.pt"
    cut.write_bytes(data[: len(data) // 2])
    return str(cut)


def _under_a_file(tmp_path: Path) -> str:
    (tmp_path / "a_file").write_text("not a folder")
    return f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"


BAD_INPUT = {
    # id: (overrides or a function of tmp_path giving one, words the message must hold, ours?)
    "unknown_option": (["optimizer=foo"], ["optimizer", "foo"], False),
    "wrong_type": (["trainer.epochs=abc"], ["trainer.epochs", "abc"], False),
    "unknown_key": (["trainer.epoch=3"], ["trainer.epoch"], False),
    "rho_negative": (["optimizer=sam", "optimizer.rho=-1"], ["rho", ">= 0"], True),
    "beta_zero": (["optimizer=esam", "optimizer.beta=0"], ["beta", "(0, 1]"], True),
    "gamma_above_one": (["optimizer=esam", "optimizer.gamma=1.5"], ["gamma", "(0, 1]"], True),
    "batch_zero": (["dataset.batch_size=0"], ["dataset.batch_size", "1437"], True),
    "batch_too_large": (["dataset.batch_size=100000"], ["dataset.batch_size", "1437"], True),
    "epochs_zero": (["trainer.epochs=0"], ["trainer.epochs", ">= 1"], True),
    "missing_dataset": (lambda t: ["dataset=cifar10", f"dataset.root={t / 'empty'}", "dataset.download=false"],
                        ["cifar10", "not found", "dataset.root=", "download"], True),
    "schema_as_option": (["optimizer=esam_schema"], ["optimizer=esam_schema", "schema", "choose one of", "sam, sgd"], True),
    "unwritable_output": (lambda t: [_under_a_file(t)], ["output folder", "a_file", "not a folder"], True),
    "corrupt_checkpoint": (lambda t: [f"trainer.resume={_corrupt(t)}"], ["garbage.pt", "corrupt"], True),
    "truncated_checkpoint": (lambda t: [f"trainer.resume={_truncated(t)}"], ["truncated.pt", "truncated"], True),
    "missing_checkpoint": (lambda t: [f"trainer.resume={t / 'nope.pt'}"], ["nope.pt", "does not exist"], True),
    "not_a_checkpoint": (lambda t: [f"trainer.resume={_foreign(t)}"], ["foreign.pt", "not an esam"], True),
}


def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path):
    """Not its run folder, nor the outputs/<experiment>/<name>/seed0/ that Hydra made for it."""
    res = run_cli([*TINY, "dataset=cifar10", f"dataset.root={tmp_path / 'data'}", "dataset.download=false"],
                  cwd=tmp_path, timeout=300)
    assert res.returncode == 2 and "dataset.root=" in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []


def _foreign(tmp_path: Path) -> str:
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, path)
    return str(path)


# Run as a real `python -m esam.train` process (the others call its entry point in this process):
# one of Hydra's own errors here; one of ours is test_train.py's missing dataset (also via the CLI).
IN_A_PROCESS = {"unknown_key"}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_sentence(tmp_path, case):
    make, words, ours = BAD_INPUT[case]
    ovr = make(tmp_path) if callable(make) else make
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.epochs=1", *ovr]
    if not any(a.startswith("hydra.run.dir=") for a in ovr):
        args.append(f"hydra.run.dir={run_dir}")
    res = run_cli(args, timeout=300) if case in IN_A_PROCESS else run_cli_in_process(args)
    assert res.returncode != 0
    assert TRACEBACK not in res.stderr, res.stderr
    assert all(w in res.stderr for w in words), res.stderr
    if ours:
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert not (run_dir / "summary.json").exists()
    assert not run_dir.exists() or leftovers(run_dir) == []
    if ours:  # a run that failed before training leaves no empty run folder behind
        assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


# -- atomic files ---------------------------------------------------------------------------
def test_a_finished_run_leaves_no_temp_files(tmp_path, straight):
    _, _, _, run_dir = straight("sgd")
    assert leftovers(run_dir) == []
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    json.loads((run_dir / "summary.json").read_text())  # complete JSON


@pytest.mark.parametrize("writer", ["text", "json", "torch"])
def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch, writer):
    """The old file stays whole, and no temp file is left, when a write fails half-way."""
    path = tmp_path / "out"
    atomic_write_text(path, "old")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if writer == "torch":  # the pickler fails after the file was opened
        write = lambda: atomic_torch_save({"f": lambda: 0}, path)  # noqa: E731
    else:  # the data is written, the rename fails
        monkeypatch.setattr(os, "replace", full_disk)
        write = {"text": lambda: atomic_write_text(path, "new" * 1000),
                 "json": lambda: atomic_write_json(path, {"new": 1})}[writer]
    with pytest.raises(Exception):
        write()
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_checkpoint_is_replaced_atomically_when_saving_fails(tmp_path, monkeypatch):
    """A save that dies half-way (disk full) leaves the previous last.pt loadable."""
    trainer, _ = fit(tmp_path, [*TINY, "trainer.epochs=1"])
    before = load_checkpoint(tmp_path / "checkpoints" / "last.pt")

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    monkeypatch.undo()
    after = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert after["global_step"] == before["global_step"]
    assert leftovers(tmp_path) == []
