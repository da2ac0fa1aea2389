"""Kept so that ``from esam.trainer import Trainer`` works: the engine lives in :mod:`esam.engine`."""
from esam.engine import STOP_SIGNALS, NonFiniteLossError, Trainer, build_run  # noqa: F401
from esam.engine.checkpoint import RESUME_MUST_MATCH  # noqa: F401
from esam.engine.monitor import EpochAccumulator  # noqa: F401
from esam.engine.schedule import cosine_factor  # noqa: F401
