"""StopSignals: the first stop signal is recorded, handed on once to the handler that was there
before, and the old handlers come back afterwards."""
from __future__ import annotations

import os
import signal

import pytest

from esam.engine.signals import STOP_SIGNALS, StopSignals


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


def test_submitit_signal_is_a_stop_signal():
    assert {"SIGTERM", "SIGUSR1"} == set(STOP_SIGNALS)
