"""The one name -> thing registry the methods, models and datasets share, and its error sentences.

No Hydra, no torch: ``esam.optim``, ``esam.models`` and ``esam.data`` all build on it.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, TypeVar

from esam.errors import UserError

T = TypeVar("T")


class Registry(dict):
    """``name -> item``; ``add`` refuses a second item under one name, ``lookup`` an unknown name
    with one sentence naming the registered ones (``unknown model 'resnt18'; allowed: ...``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind  # "method", "model", "dataset": the word the error sentence uses

    def add(self, name: str, item: T) -> T:
        if name in self and self[name] is not item:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self[name] = item
        return item

    def lookup(self, name: str) -> Any:
        if name not in self:
            raise UserError(f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self))}")
        return self[name]


def keyword_names(fn: Callable, skip: Iterable[str] = ()) -> set[str] | None:
    """The keywords ``fn`` accepts, or None when it takes ``**kwargs`` (anything goes)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return {k for k, p in params.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and k not in set(skip) | {"self"}}


def refuse_unknown_keys(what: str, prefix: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """One sentence for keys a builder does not take, e.g. ``optimizer sam: unknown key rhoo
    (optimizer.rhoo); allowed: adaptive, bn_stats, ...``."""
    allowed = set(allowed)
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise UserError(f"{what}: unknown key {', '.join(unknown)} ({prefix}{unknown[0]}); "
                        f"allowed: {', '.join(sorted(allowed)) or 'none'}")
