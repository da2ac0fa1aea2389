"""The recipe layer of the configs: what a recipe says once for every method, and a name for
every (recipe, method) cell.

- Group ``sam`` (conf/sam/): the SAM terms every SAM-based method reads from one place (its
  conf/optimizer file interpolates ``${sam.rho}`` ...): the radius and the authors'-code
  switches. ``sam=ours`` holds the constructors' own defaults (derived here from SAM's and
  ESAM's signatures, never restated); ``sam=authors`` is what dydjw9/Efficient_SAM ran, which
  the CIFAR recipes select. A recipe sets its radius once with ``sam: {rho: ...}``.
- ``experiment=<recipe>_<method>`` exists for every recipe in conf/recipe and every option in
  conf/optimizer: a file in conf/experiment where the cell says something the recipe and the
  method do not (ESAM's beta on WRN, late-phase SAM's schedule, MESA's EMA horizon), otherwise
  the recipe plus the method, stored here. So ``make cifar10-<method>`` runs every method and
  every experiment name older scripts use keeps working.
"""
from __future__ import annotations

import inspect
from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

CONF = Path(__file__).resolve().parent.parent / "conf"

# (key, type, the constructor whose default it is): what a recipe may set for every SAM-based method.
_TERMS = (("rho", float, "SAM"), ("m", Optional[int], "SAM"), ("bn_stats", str, "SAM"),
          ("eps", float, "SAM"), ("selection", str, "ESAM"))


def sam_terms_schema() -> type:
    """The ``sam`` group's schema, its defaults read from the constructors' signatures."""
    from esam import optim

    fields = []
    for key, typ, cls in _TERMS:
        default = inspect.signature(getattr(optim, cls)).parameters[key].default
        fields.append((key, typ, field(default=default)))
    return make_dataclass("SAMTermsConfig", fields)


def recipes() -> list[str]:
    """conf/recipe options that are a (dataset, model) recipe (not the shared cifar_paper part)."""
    return sorted(p.stem for p in (CONF / "recipe").glob("*.yaml") if p.stem != "cifar_paper")


def optimizer_options() -> list[str]:
    """The options of the optimizer config group (conf/optimizer/*.yaml)."""
    return sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))


def experiment_cells() -> dict[str, tuple[str, str]]:
    """Every ``<recipe>_<method>`` experiment name without its own file -> (recipe, method)."""
    files = {p.stem for p in (CONF / "experiment").glob("*.yaml")}
    return {f"{r}_{o}": (r, o) for r in recipes() for o in optimizer_options() if f"{r}_{o}" not in files}


def register_recipe_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="sam", name="sam_schema", node=sam_terms_schema())
    for name, (recipe, method) in experiment_cells().items():
        node: dict[str, Any] = {"defaults": [{"/recipe": recipe}, {"override /optimizer": method}]}
        cs.store(group="experiment", name=name, node=node, package="_global_")
