"""Pre-emption: SIGTERM / SIGUSR1 set a flag; the trainer saves, then hands the signal on.

Slurm (through submitit) sends SIGUSR1 before a time limit or on pre-emption, and a plain
``kill`` or a scheduler sends SIGTERM. The handler only records the signal: the trainer
finishes its step, writes a checkpoint, then calls :meth:`StopSignals.chain` so the handler
that was there before (submitit's requeue) still runs, after the checkpoint exists.
"""
from __future__ import annotations

import signal
from typing import Any, Callable

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class StopSignals:
    """Installs handlers for :data:`STOP_SIGNALS` that record the first one received."""

    def __init__(self, names: tuple[str, ...] = STOP_SIGNALS) -> None:
        self.names = tuple(n for n in names if hasattr(signal, n))
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _record(self, signum: int, frame: Any) -> None:
        # Keep the first: under Slurm pre-emption USR1 (requeue) may be followed by SIGTERM,
        # and it is USR1's handler (submitit's requeue) that must be chained after saving.
        if self.received is None:
            self.received = signal.Signals(signum).name

    def install(self) -> "StopSignals":
        for name in self.names:
            sig = getattr(signal, name)
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
        """Hand the signal we stopped on (only that one) to the handler it had before ours."""
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
        """What a process killed by the signal would return (128 + signal number)."""
        return 128 + getattr(signal, self.received) if self.received else 0
