"""One registry of methods: name -> class, hyper-parameters, cost in units, logged statistics.

The trainer, the bench and the compute budget read this; none of them asks which class an
optimizer is. Adding a method = a module that calls :func:`register_method`, a
``conf/optimizer/<name>.yaml`` and its tests (``tests/test_registry.py`` runs the shared
contracts over every registered method).

Cost units (forward = 1, backward = 2: 1 for the input gradients + 1 for the weight
gradients), per sample of the batch per step: SGD = 3, SAM = 6. ``cost_units(**hparams)`` is
the expected cost a method declares; ``opt.last_cost`` is what its last step actually ran.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from esam.errors import UserError

SGD_UNITS = 3.0  # one forward (1) + one backward (2) per sample


@dataclass(frozen=True)
class MethodInfo:
    """What the harness needs to know about a method, besides its class."""

    name: str                                   # registry key = ``optimizer.name``
    cls: type                                   # a SharpnessAwareOptimizer subclass
    paper: str                                  # citation of the update it implements
    cost_units: Callable[..., float]            # expected units per sample per step, from hparams
    hparams: dict[str, Any] = field(default_factory=dict)  # the method's own kwargs and defaults
    stats: dict[str, str] = field(default_factory=dict)    # last_stats key -> what it measures
    description: str = ""

    def expected_cost(self, **hparams: Any) -> float:
        """Units per sample per step at these hyper-parameters (the method's defaults fill the rest)."""
        known = {k: v for k, v in hparams.items() if k in self.hparams}
        return float(self.cost_units(**{**self.hparams, **known}))

    def relative_cost(self, **hparams: Any) -> float:
        """Cost of a step relative to SGD's (SAM = 2.0)."""
        return self.expected_cost(**hparams) / SGD_UNITS


METHODS: dict[str, MethodInfo] = {}


def register_method(info: MethodInfo) -> MethodInfo:
    if info.name in METHODS and METHODS[info.name].cls is not info.cls:
        raise ValueError(f"method {info.name!r} is registered twice")
    METHODS[info.name] = info
    return info


def get_method(name: str) -> MethodInfo:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]


_PLUMBING = {"base_optimizer", "model", "seed"}  # passed by the harness, not chosen in a config


def _allowed_keys(info: MethodInfo, base: Any) -> set[str] | None:
    """The method's own keywords plus its base optimizer's (a misspelt key fails naming them);
    None when the base is unknown (the class then says so)."""
    import inspect

    from esam.optim.base import resolve_base_optimizer

    own: set[str] = set()
    for cls in info.cls.__mro__:  # a subclass passes **kwargs up: every level's keywords count
        if cls is torch.optim.Optimizer or "__init__" not in vars(cls):
            continue
        own |= {k for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and k not in ("self", "params")}
        if cls.__name__ == "SharpnessAwareOptimizer":
            break
    try:
        base_cls, _ = resolve_base_optimizer(base)
    except ValueError:
        return None
    base_keys = set(inspect.signature(base_cls.__init__).parameters) - {"self", "params"}
    return own | base_keys | set(info.hparams) | _PLUMBING



def build_optimizer(name: str, params: Iterable[torch.Tensor], **kwargs: Any):
    """``build_optimizer('esam', model.parameters(), base_optimizer='sgd', lr=0.05, rho=0.05, ...)``.

    A bad keyword or value is a :class:`UserError` naming the method."""
    info = get_method(name)
    allowed = _allowed_keys(info, kwargs.get("base_optimizer", "sgd"))
    unknown = sorted(set(kwargs) - allowed) if allowed is not None else []
    if unknown:
        raise UserError(f"optimizer {name}: unknown key {', '.join(unknown)} (optimizer.{unknown[0]}); "
                        f"allowed: {', '.join(sorted(allowed - _PLUMBING))}")
    try:
        return info.cls(params, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"optimizer {name}: {e}") from None


def optimizer_kwargs(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A plain dict as ``conf/optimizer/*.yaml`` holds it -> (method name, constructor kwargs).

    ``{"name": "esam", "label": ..., "lr": 0.05, "weight_decay": 1e-3, "base": {"name": "sgd",
    "momentum": 0.9}, "rho": 0.05, ...}`` -> ``("esam", {"base_optimizer": "sgd", "lr": 0.05,
    "weight_decay": 1e-3, "momentum": 0.9, "rho": 0.05, ...})``."""
    # Config enums (str subclasses) become their plain values.
    spec = {k: getattr(v, "value", v) for k, v in spec.items()}
    name = spec.pop("name")
    spec.pop("label", None)
    base = dict(spec.pop("base", None) or {"name": "sgd"})
    kwargs = {"base_optimizer": base.pop("name"), **base, **spec}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return name, kwargs


def build_from_spec(spec: dict[str, Any], params: Iterable[torch.Tensor], **extra: Any):
    """Build the optimizer a config dict describes; ``extra`` adds model=, seed= etc."""
    name, kwargs = optimizer_kwargs(spec)
    return build_optimizer(name, params, **kwargs, **extra)
