"""Search spaces (conf/search_space/<method>.yaml) and the quasi-random trials drawn from them.

The trials are a scrambled Sobol sequence (scipy.stats.qmc, the generator Optuna's QMCSampler
wraps), seeded by the (workload, method) name, so the same suite always draws the same trials.
Why not Hydra's Optuna sweeper: its newest release (hydra-optuna-sweeper 1.3.0) requires
optuna < 3.0, and QMCSampler arrived in Optuna 3.0.
"""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from scipy.stats import qmc

from esam.errors import UserError

SPACE_DIR = Path(__file__).resolve().parents[2] / "conf" / "search_space"


@dataclass(frozen=True)
class Param:
    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def value(self, u: float) -> float | int:
        """The point ``u`` in [0, 1) of the unit interval mapped onto this knob's range (floats
        to 6 significant digits: the value the run's command line and the board show)."""
        return self._value(u) if self.integer else float(f"{self._value(u):.6g}")

    def _value(self, u: float) -> float | int:
        if self.integer:  # every integer of [low, high] gets an equal share of [0, 1)
            return int(min(self.high, math.floor(self.low + u * (self.high - self.low + 1))))
        if self.log:
            return float(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))
        return float(self.low + u * (self.high - self.low))


@dataclass(frozen=True)
class SearchSpace:
    method: str          # the board's name for it (the file's stem)
    optimizer: str       # the conf/optimizer option it tunes
    params: tuple[Param, ...]
    fixed: dict[str, Any]

    def draw(self, n: int, seed: int) -> list[dict[str, Any]]:
        """``n`` trials: the first ``n`` points of a scrambled Sobol sequence in len(params) dims."""
        if n < 1:
            raise UserError(f"trials={n} must be >= 1")
        sobol = qmc.Sobol(d=len(self.params), scramble=True, seed=seed)
        # Sobol's balance holds at powers of two; other n draw the first n points of the next one.
        points = sobol.random_base2(max(0, math.ceil(math.log2(n))))[:n]
        return [{p.name: p.value(float(u)) for p, u in zip(self.params, row)} for row in points]

    def overrides(self, hparams: dict[str, Any]) -> list[str]:
        """Hydra overrides of one trial: the optimizer, its fixed settings, the drawn values."""
        values = {**self.fixed, **hparams}
        return [f"optimizer={self.optimizer}", *(f"optimizer.{k}={format_value(v)}" for k, v in values.items())]


def format_value(v: Any) -> str:
    """A value as a Hydra override writes it (floats with 6 significant digits, so a folder's
    command line is short and a re-drawn trial gives the same string)."""
    if isinstance(v, bool) or v is None:
        return "null" if v is None else str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def stable_seed(*names: str) -> int:
    """A seed from names, equal in every process (``hash`` of a str is salted per process)."""
    return zlib.crc32("/".join(names).encode()) & 0x7FFF_FFFF


@functools.lru_cache(maxsize=None)
def load_space(method: str, space_dir: Path | str = SPACE_DIR) -> SearchSpace:
    path = Path(space_dir) / f"{method}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in Path(space_dir).glob("*.yaml"))
        raise UserError(f"method {method!r} has no search space {path}; declared: {', '.join(have)}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = set(raw) - {"optimizer", "params", "fixed"}
    if unknown:
        raise UserError(f"{path}: unknown key {sorted(unknown)[0]}; allowed: optimizer, params, fixed")
    params = []
    for name, spec in (raw.get("params") or {}).items():
        bad = set(spec) - {"low", "high", "log", "int"}
        if bad or "low" not in spec or "high" not in spec or not spec["low"] < spec["high"]:
            raise UserError(f"{path}: params.{name} must be {{low, high[, log][, int]}} with low < high, got {spec}")
        if spec.get("log") and spec["low"] <= 0:
            raise UserError(f"{path}: params.{name} has log: true, so low must be > 0, got {spec['low']}")
        params.append(Param(name, float(spec["low"]), float(spec["high"]), bool(spec.get("log", False)),
                            bool(spec.get("int", False))))
    if not params:
        raise UserError(f"{path}: params must declare at least one knob")
    return SearchSpace(method, raw.get("optimizer", method), tuple(params), dict(raw.get("fixed") or {}))


def trials_for(workload: str, method: str, n: int, space_dir: Path | str = SPACE_DIR) -> list[dict[str, Any]]:
    """The ``n`` trials ``method`` gets on ``workload``."""
    return load_space(method, space_dir).draw(n, stable_seed(workload, method))
