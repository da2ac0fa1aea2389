"""StopSignals: the first stop signal is recorded, handed on once to the handler that was there
before, and the old handlers come back afterwards; Ctrl-C stops like SIGTERM, twice quits at once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from helpers import REPO
from esam.engine.signals import FIRST_CTRL_C, SECOND_CTRL_C, STOP_SIGNALS, StopSignals


@pytest.fixture
def previous():
    seen: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: seen.append(signum)) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield seen
    for s, h in old.items():
        signal.signal(s, h)


def test_records_the_first_signal_and_chains_only_it(previous):
    with StopSignals() as stops:
        assert stops.received is None and stops.exit_code == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # Slurm may follow USR1 with TERM: USR1 must win
        assert stops.received == "SIGUSR1"
        assert previous == []  # nothing handed on before the trainer has saved
        stops.chain()
        assert previous == [signal.SIGUSR1]
        assert stops.exit_code == 128 + signal.SIGUSR1


def test_restores_the_previous_handlers(previous):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    stops = StopSignals().install()
    assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
    stops.restore()
    assert {s: signal.getsignal(s) for s in before} == before


def test_chain_without_a_signal_or_with_default_handlers_does_nothing():
    stops = StopSignals()
    stops.chain()  # nothing received
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with StopSignals() as stops:
            stops.received = "SIGTERM"
            stops.chain()  # SIG_DFL is not callable: the process is not killed
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_broken_previous_handler_does_not_hide_the_stop(previous):
    def broken(signum, frame):
        raise RuntimeError("foreign handler bug")

    old = signal.signal(signal.SIGUSR1, broken)
    try:
        with StopSignals() as stops:
            os.kill(os.getpid(), signal.SIGUSR1)
            stops.chain()
            assert stops.exit_code == 128 + signal.SIGUSR1
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_submitit_signal_and_ctrl_c_are_stop_signals():
    assert {"SIGTERM", "SIGUSR1", "SIGINT"} == set(STOP_SIGNALS)


@pytest.fixture
def python_ctrl_c():
    """SIGINT as Python sets it up in a terminal (raise KeyboardInterrupt), whatever pytest inherited."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_ctrl_c_is_recorded_and_says_what_happens_next(python_ctrl_c, capfd):
    with StopSignals() as stops:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the trainer stops at its next step
        assert stops.received == "SIGINT" and stops.exit_code == 128 + signal.SIGINT == 130
        stops.chain()  # Python's own handler would raise KeyboardInterrupt: not handed on
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert capfd.readouterr().err.strip() == FIRST_CTRL_C


def test_a_quiet_rank_records_ctrl_c_without_a_word(python_ctrl_c, capfd):
    with StopSignals(announce=False) as stops:
        os.kill(os.getpid(), signal.SIGINT)
        assert stops.received == "SIGINT"
    assert capfd.readouterr().err == ""


def test_a_process_started_with_ctrl_c_ignored_keeps_ignoring_it():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `nohup` or `cmd &` in a script start it
    try:
        with StopSignals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


# Each child first sets SIGINT as Python does in a terminal: it may have inherited it ignored
# (pytest run in the background of a script), and a process started so keeps ignoring Ctrl-C.
TERMINAL = "import os, signal, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
# A "trainer" that never reaches a safe point: only a second Ctrl-C can end it.
NEVER_DONE = TERMINAL + """
from esam.engine.signals import StopSignals
with StopSignals():
    print("ready", flush=True)
    while True:
        time.sleep(0.01)
"""
# One press that arrives twice (torchrun hands the terminal's Ctrl-C on to workers that had it).
ONE_PRESS_TWICE = TERMINAL + """
from esam.engine.signals import StopSignals
with StopSignals() as stops:
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    print(stops.received, flush=True)
"""


def test_a_second_ctrl_c_quits_at_once_without_a_traceback():
    proc = subprocess.Popen([sys.executable, "-c", NEVER_DONE], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.communicate()
        proc.send_signal(signal.SIGINT)
        seen = []
        while FIRST_CTRL_C not in seen:  # the first is answered (and the process goes on)
            line = proc.stderr.readline()
            assert line, (seen, proc.communicate())
            seen.append(line.strip())
        assert proc.poll() is None
        # Again, until it has quit: one within SAME_CTRL_C_S of the first counts as the same press.
        for _ in range(400):
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == SECOND_CTRL_C and "Traceback" not in err


def test_one_ctrl_c_forwarded_twice_is_one_stop_not_a_quit():
    proc = subprocess.run([sys.executable, "-c", ONE_PRESS_TWICE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "SIGINT", proc.stderr
    assert proc.stderr.strip() == FIRST_CTRL_C
