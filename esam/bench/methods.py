"""Which methods the bench runs: options of the optimizer config group, plus named variants.

``methods=[sgd,sam,esam]`` names ``conf/optimizer/<name>.yaml`` options, composed exactly as
``python -m esam.train optimizer=<name>`` composes them (their schema rejects a typo). A variant
is an option with other settings, kept under its own name::

    '+variants.esam_b04={optimizer:esam,beta:0.4}' 'methods=[sgd,esam,esam_b04]'
    '+variants.sam_adamw={optimizer:sam,base:adamw}'     # base: a conf/optimizer/base option
    '+common.lr=0.1'                                       # merged onto every method

Nothing here builds a model: a bad method list fails before any data is made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import esam.config  # noqa: F401  (registers the optimizer schemas)
from esam.config import BenchMode
from esam.errors import UserError
from esam.optim import get_method, optimizer_kwargs
from esam.recipes import CONF, optimizer_options


@dataclass(frozen=True)
class MethodSpec:
    """One row of the bench: its name, its optimizer config and what the registry says of it."""

    name: str                  # bench name: an optimizer option or a variant
    spec: dict[str, Any]       # the composed optimizer config, as conf/optimizer/<option>.yaml gives it
    method: str                # registry key (optimizer.name)
    kwargs: dict[str, Any]     # constructor kwargs (esam.optim.optimizer_kwargs)

    @property
    def hparams(self) -> dict[str, Any]:
        """The method's own hyper-parameters (the registry's keys), defaults filled in."""
        info = get_method(self.method)
        return {k: self.kwargs.get(k, v) for k, v in info.hparams.items()}

    def hparam(self, key: str) -> float:
        value = self.hparams.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan

    @property
    def expected_cost(self) -> float:
        """Forward/backward units per sample per step, from the registry's cost model."""
        return get_method(self.method).expected_cost(**self.kwargs)


def registered_options() -> list[str]:
    """Optimizer options whose method is registered: what ``methods=`` can list for 'every method'."""
    from esam.optim import METHODS

    return [o for o in optimizer_options() if _compose_option(o, None).name in METHODS]


def _compose_option(option: str, base: str | None) -> DictConfig:
    # +sam=ours: the SAM terms the SAM-based methods read (${sam.rho}, ...), at the constructors' defaults.
    overrides = [f"+optimizer={option}", "+sam=ours"] + ([f"optimizer/base={base}"] if base else [])
    # Inside `python -m esam.bench` Hydra is initialised on conf/; in tests and scripts it is not.
    if GlobalHydra.instance().is_initialized():
        return compose(overrides=overrides).optimizer
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(overrides=overrides).optimizer


def compose_method(name: str, option: str, settings: dict[str, Any], where: str) -> MethodSpec:
    """The optimizer config ``option`` with ``settings`` merged on (``base`` may name a base option)."""
    if option not in optimizer_options():
        raise UserError(f"{where}: {option!r} is not an optimizer option; allowed: "
                        f"{', '.join(optimizer_options())} (or a key of variants)")
    settings = dict(settings)
    base = settings.pop("base", None)
    try:
        cfg = _compose_option(option, base if isinstance(base, str) else None)
        if isinstance(base, dict):
            settings["base"] = base
        cfg = OmegaConf.merge(cfg, settings)
    except OmegaConfBaseException as e:
        key = getattr(e, "key", None) or str(e).splitlines()[0]
        allowed = ", ".join(k for k in _compose_option(option, None) if k not in ("name", "label"))
        raise UserError(f"{where}: {key!r} does not fit optimizer {option}; its keys: {allowed}") from None
    except Exception as e:  # Hydra: an unknown base option
        raise UserError(f"{where}: {str(e).splitlines()[0]}") from None
    spec = OmegaConf.to_container(cfg, resolve=True)
    method, kwargs = optimizer_kwargs(spec)
    get_method(method)  # an option naming an unregistered method fails here, in one sentence
    return MethodSpec(name, spec, method, kwargs)


def resolve_method(name: str, cfg: DictConfig, extra: dict[str, Any] | None = None) -> MethodSpec:
    """A bench method by name: a variant (``variants.<name>``) or an optimizer option."""
    variants = OmegaConf.to_container(cfg.variants, resolve=True)
    common = OmegaConf.to_container(cfg.common, resolve=True)
    if name in variants:
        settings = dict(variants[name])
        option = settings.pop("optimizer", None)
        if option is None:
            raise UserError(f"variants.{name} has no 'optimizer' key naming a conf/optimizer option, "
                            f"e.g. '+variants.{name}={{optimizer:esam,beta:0.4}}'")
        where = f"variants.{name}"
    else:
        option, settings, where = name, {}, "methods"
    return compose_method(name, str(option), {**common, **settings, **(extra or {})}, where)


def method_specs(cfg: DictConfig) -> list[MethodSpec]:
    """Every method this run measures, baseline included, in table order."""
    if BenchMode(cfg.mode) == BenchMode.methods:
        if not cfg.methods:
            raise UserError("methods is empty; list some of: " + ", ".join(optimizer_options()))
        if len(set(cfg.methods)) != len(cfg.methods):
            raise UserError(f"methods={list(cfg.methods)} lists a method twice")
        if cfg.baseline not in cfg.methods:
            raise UserError(f"baseline={cfg.baseline!r} must be one of methods={list(cfg.methods)}")
        return [resolve_method(str(m), cfg) for m in cfg.methods]
    specs = [resolve_method(cfg.baseline, cfg)]
    for b in cfg.grid.betas:
        for g in cfg.grid.gammas:
            if not (0 < b <= 1 and 0 < g <= 1):
                raise UserError(f"grid.betas and grid.gammas must lie in (0, 1], got beta={b} gamma={g}")
            point = resolve_method(cfg.grid.method, cfg, {"beta": b, "gamma": g})
            specs.append(MethodSpec(f"{cfg.grid.method}_b{b:g}_g{g:g}", point.spec, point.method, point.kwargs))
    return specs
