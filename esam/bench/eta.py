"""How long the rest of a bench run takes, from the step times measured so far.

Each method's plain step is the median of its last few measured steps (warm-up, timed, phase
pass); a FLOP-counted step costs that times the overhead measured on the counted steps so far
(1 until one is measured; until a method has a plain step, its counted step stands in for one).
The bench multiplies these by the steps it still plans per method.
"""
from __future__ import annotations

import math
from collections import defaultdict, deque
from typing import Mapping

import numpy as np


class Eta:
    """Seconds left = sum over methods of (plain steps left x its step time + counted steps left
    x its step time x the counting overhead)."""

    def __init__(self, recent: int = 5) -> None:
        self._plain: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=recent))
        self._overhead: deque[float] = deque(maxlen=recent)  # counted step / plain step

    def plain(self, name: str, seconds: float) -> None:
        """A step without hooks or counters (warm-up, timed, phase pass) took ``seconds``."""
        self._plain[name].append(seconds)

    def counted(self, name: str, seconds: float) -> None:
        """A FLOP-counted step took ``seconds``."""
        step = self.step_s(name)
        if math.isnan(step):
            self._plain[name].append(seconds)
        elif step > 0:
            self._overhead.append(seconds / step)

    def step_s(self, name: str) -> float:
        """This method's plain step in seconds (NaN before any step of it was measured)."""
        seen = self._plain.get(name)
        return float(np.median(seen)) if seen else math.nan

    @property
    def overhead(self) -> float:
        return float(np.median(self._overhead)) if self._overhead else 1.0

    def seconds(self, plain: Mapping[str, float], counted: Mapping[str, float] | None = None) -> float:
        """Seconds for the steps still planned per method; NaN while a method with steps left is unmeasured."""
        total = 0.0
        for name, n in plain.items():
            total += n * self.step_s(name) if n else 0.0
        for name, n in (counted or {}).items():
            total += n * self.step_s(name) * self.overhead if n else 0.0
        return total


def duration(seconds: float) -> str:
    """'<1 s', '40 s', '3.2 min', '1.5 h'."""
    if seconds < 0.5:
        return "<1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def duration_span(low: float, high: float) -> str:
    """'40 s', '24-30 s', '50 s-2.5 min': one unit where both ends share it."""
    a, b = duration(low), duration(high)
    if a == b:
        return a
    (va, ua), (vb, ub) = a.split(" "), b.split(" ")
    return f"{va}-{vb} {ua}" if ua == ub else f"{a}-{b}"
