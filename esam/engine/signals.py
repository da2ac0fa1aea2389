"""Stopping: SIGTERM / SIGUSR1 / SIGINT set a flag; the trainer saves, then hands the signal on.

Slurm (through submitit) sends SIGUSR1 before a time limit or on pre-emption, a plain ``kill``
or a scheduler sends SIGTERM, and Ctrl-C sends SIGINT. The handler only records the signal: the
trainer finishes its step, writes a checkpoint, prints the command that continues the run, then
calls :meth:`StopSignals.chain` so the handler that was there before (submitit's requeue) still
runs, after the checkpoint exists. A second Ctrl-C means "now": the process exits at once,
without a traceback and without saving (the last checkpoint written stays). One that comes
within :data:`SAME_CTRL_C_S` of the first is the same keypress: torchrun hands the terminal's
Ctrl-C on to its workers, which had it already.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Callable

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
SAME_CTRL_C_S = 1.0  # seconds; a person pressing twice takes longer, a forwarding process less

FIRST_CTRL_C = ("Ctrl-C: stopping after this step with a checkpoint and the command to continue "
                "(press Ctrl-C again to quit at once without saving)")
SECOND_CTRL_C = "Ctrl-C again: quitting now without saving (the last checkpoint written is kept)"


def _say(line: str) -> None:
    # os.write, not print: a handler runs between two bytecodes of the main thread, which may be
    # inside a print to the same stream (a re-entrant buffered write raises).
    try:
        os.write(sys.stderr.fileno(), f"\n{line}\n".encode())
    except (OSError, ValueError, AttributeError):
        pass


class StopSignals:
    """Installs handlers for :data:`STOP_SIGNALS` that record the first one received.

    ``announce``: whether a Ctrl-C is answered with a line saying what happens next (one DDP rank
    says it, not every one).
    """

    def __init__(self, names: tuple[str, ...] = STOP_SIGNALS, announce: bool = True) -> None:
        self.names = tuple(n for n in names if hasattr(signal, n))
        self.announce = announce
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._first_at = 0.0

    def _record(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received is not None:
            if self.received == "SIGINT" and time.monotonic() - self._first_at < SAME_CTRL_C_S:
                return
            if self.announce:
                _say(SECOND_CTRL_C)
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # mid-write in the main thread: what it held is lost, not the exit
                    pass
            os._exit(128 + signum)  # at once: no traceback, no half-hearted clean-up
        # Keep the first: under Slurm pre-emption USR1 (requeue) may be followed by SIGTERM,
        # and it is USR1's handler (submitit's requeue) that must be chained after saving.
        if self.received is None:
            self.received, self._first_at = name, time.monotonic()
            if name == "SIGINT" and self.announce:
                _say(FIRST_CTRL_C)

    def install(self) -> "StopSignals":
        for name in self.names:
            sig = getattr(signal, name)
            if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # started with Ctrl-C ignored (nohup, `cmd &` in a script): leave it so
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def chain(self) -> None:
        """Hand the signal we stopped on (only that one) to the handler it had before ours.
        Python's own Ctrl-C handler (raise KeyboardInterrupt) is not called: we have stopped."""
        if self.received is None:
            return
        sig = getattr(signal, self.received)
        handler: Callable | Any = self._previous.get(sig)
        if callable(handler) and handler is not signal.default_int_handler:
            try:
                handler(sig, None)
            except SystemExit:
                raise
            except Exception:  # a broken foreign handler must not lose our exit code
                pass

    @property
    def exit_code(self) -> int:
        """What a process killed by the signal would return (128 + signal number: 130 for Ctrl-C)."""
        return 128 + getattr(signal, self.received) if self.received else 0
