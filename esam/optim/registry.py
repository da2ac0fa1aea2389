"""One registry of methods: name -> class, cost in units, logged statistics; one visible list.

The trainer, the bench and the compute budget read this; none of them asks which class an
optimizer is. A method's hyper-parameters are its constructor's keyword-only parameters (with
their defaults): :attr:`MethodInfo.hparams` reads them from the signature, and the Hydra schema
(``esam.config``) and ``docs/methods.md`` are generated from them, so the constructor is the one
place a default is written. Adding a method = its module, one entry in
:func:`_register_default_methods`, its tests (``tests/test_registry.py`` runs the shared
contracts over every registered method) and, only if its defaults need one, a
``conf/optimizer/<name>.yaml``.

Cost units (forward = 1, backward = 2: 1 for the input gradients + 1 for the weight
gradients), per sample of the batch per step: SGD = 3, SAM = 6. ``cost_units(**hparams)`` is
the expected cost a method declares; ``opt.last_cost`` is what its last step actually ran.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from esam.errors import UserError
from esam.optim.base import resolve_base_optimizer
from esam.optim.esam import ESAM, esam_cost
from esam.optim.gsam import GSAM
from esam.optim.ksam import KSAM
from esam.optim.looksam import LookSAM, looksam_cost
from esam.optim.msam import MSAM
from esam.optim.saf import MESA, SAF
from esam.optim.sam import SAM
from esam.optim.sgd import BaseOnly
from esam.optim.switching import AESAM, RST, SWITCH_STATS, LateSAM, aesam_cost, latesam_cost, rst_cost
from esam.registry import Registry, keyword_names, refuse_unknown_keys

SGD_UNITS = 3.0  # one forward (1) + one backward (2) per sample

# Passed by the harness (the model for BN/DDP, the run's seed), never chosen in a config.
PLUMBING = ("model", "seed")


def method_hparams(cls: type) -> dict[str, Any]:
    """The method's own keyword-only constructor parameters and their defaults, in order: its
    knobs. Read from ``cls.__init__`` alone, never from a parent class: a knob a class does not
    declare is not one it takes."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k not in PLUMBING}


@dataclass(frozen=True)
class MethodInfo:
    """What the harness needs to know about a method that its class cannot say."""

    name: str                                   # registry key = ``optimizer.name``
    cls: type                                   # a SharpnessAwareOptimizer subclass
    paper: str                                  # citation of the update it implements
    cost_units: Callable[..., float]            # expected units per sample per step, from hparams
    stats: dict[str, str] = field(default_factory=dict)    # last_stats key -> what it measures
    description: str = ""
    # Keys that never change the update, each with the reason (the contract test checks the rest).
    inert: dict[str, str] = field(default_factory=dict)

    @property
    def hparams(self) -> dict[str, Any]:
        """The method's own keywords and their defaults, from the constructor's signature."""
        return method_hparams(self.cls)

    def expected_cost(self, **hparams: Any) -> float:
        """Units per sample per step at these hyper-parameters (the method's defaults fill the rest)."""
        own = self.hparams
        known = {k: v for k, v in hparams.items() if k in own}
        return float(self.cost_units(**{**own, **known}))

    def relative_cost(self, **hparams: Any) -> float:
        """Cost of a step relative to SGD's (SAM = 2.0)."""
        return self.expected_cost(**hparams) / SGD_UNITS


METHODS: Registry = Registry("method")


def register_method(info: MethodInfo) -> MethodInfo:
    return METHODS.add(info.name, info)


def get_method(name: str) -> MethodInfo:
    return METHODS.lookup(name)


def allowed_keys(info: MethodInfo, base: Any) -> set[str] | None:
    """What a config may set: ``base_optimizer``, the method's own keywords and its base optimizer's;
    None when the base is unknown (the class then says so in its own sentence)."""
    try:
        base_cls, _ = resolve_base_optimizer(base)
    except ValueError:
        return None
    base_keys = keyword_names(base_cls.__init__, skip=("params",)) or set()
    return {"base_optimizer"} | set(info.hparams) | base_keys


def build_optimizer(name: str, params: Iterable[torch.Tensor], **kwargs: Any):
    """``build_optimizer('esam', model.parameters(), base_optimizer='sgd', lr=0.05, rho=0.05, ...)``.

    A key the method does not take (its own or its base optimizer's) or a bad value is a
    :class:`UserError` of one sentence naming the method and the keys it does take."""
    info = get_method(name)
    allowed = allowed_keys(info, kwargs.get("base_optimizer", "sgd"))
    if allowed is not None:
        refuse_unknown_keys(f"optimizer {name}", "optimizer.", set(kwargs) - set(PLUMBING), allowed)
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


# -- the methods, in one visible list (timm's _register_default_optimizers) ---------------------
def _register_default_methods() -> None:
    sam_stats = {"sharpness": "mean loss rise L(w+e) - L(w) over the batch"}
    for info in (
        MethodInfo(
            name="sgd", cls=BaseOnly,
            paper="the base optimizer alone (SGD with momentum in the paper's tables)",
            cost_units=lambda **_: 3.0,
            description="one forward and one backward, then the base optimizer's step"),
        MethodInfo(
            name="sam", cls=SAM,
            paper="Foret et al., Sharpness-Aware Minimization, ICLR 2021 (adaptive: Kwon et al., ASAM, ICML 2021)",
            cost_units=lambda **_: 6.0,
            stats={**sam_stats,
                   "sample_frac": "share of the batch in the second pass (1 for SAM)",
                   "param_frac": "share of tensors perturbed (1 for SAM)"},
            description="gradient at w, ascend to w+e (e = rho g/||g||), gradient there, restore w, base step"),
        MethodInfo(
            name="esam", cls=ESAM,
            paper="Du et al., Efficient Sharpness-aware Minimization for Improved Training of Neural "
                  "Networks, ICLR 2022 (arXiv 2110.03141)",
            cost_units=esam_cost,
            stats={**sam_stats,
                   "sample_frac": "share of the batch in the second pass (SDS)",
                   "param_frac": "share of tensors perturbed (SWP)"},
            description="SAM with Stochastic Weight Perturbation (beta) and Sharpness-sensitive Data Selection (gamma)"),
        MethodInfo(
            name="looksam", cls=LookSAM,
            paper="Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization, CVPR 2022 "
                  "(arXiv 2203.02714)",
            cost_units=looksam_cost,
            stats={"sam_step": "1 on the steps that ran SAM's two passes, 0 on the one-pass steps"},
            description="SAM every k steps; in between one forward/backward plus alpha*||g||/||g_v|| times "
                        "the stored part g_v of the SAM gradient orthogonal to g"),
        MethodInfo(
            name="gsam", cls=GSAM,
            paper="Zhuang et al., Surrogate Gap Minimization Improves Sharpness-Aware Training (GSAM, "
                  "surrogate gap guided SAM), ICLR 2022 (arXiv 2203.08065)",
            cost_units=lambda **_: 6.0,
            stats={**sam_stats, "rho": "the perturbation radius rho_t of this step (follows the lr)"},
            description="SAM's two passes; update g_s - alpha * (part of g orthogonal to g_s); "
                        "rho scheduled with the lr between rho_min and rho"),
        MethodInfo(
            name="ksam", cls=KSAM,
            paper="Ni et al., K-SAM: Sharpness-Aware Minimization at the Speed of SGD, 2022 (arXiv 2210.12864)",
            # from k_frac; with a fixed count k > 0 it depends on the batch (opt.last_cost is exact)
            cost_units=lambda k_frac, **_: 1.0 + 6.0 * k_frac,
            stats={"sharpness": "mean loss rise L(w+e) - L(w) over the k selected samples",
                   "sample_frac": "share of the batch in the two SAM passes (k/B)"},
            description="a no-grad forward ranks the batch by loss; SAM's two passes on the k highest-loss samples"),
        MethodInfo(
            name="latesam", cls=LateSAM,
            paper="Zhou et al., Sharpness-Aware Minimization Efficiently Selects Flatter Minima Late in "
                  "Training, ICLR 2025 (arXiv 2410.10373)",
            cost_units=latesam_cost, stats=SWITCH_STATS,
            description="plain base steps until a share `start` of training, then the inner SAM/ESAM step"),
        MethodInfo(
            name="rst", cls=RST,
            paper="Zhao, Zhang and Hu, Randomized Sharpness-Aware Training for Boosting Computational "
                  "Efficiency in Deep Learning, 2022 (arXiv 2203.09962; first titled SS-SAM)",
            cost_units=rst_cost, stats=SWITCH_STATS,
            description="each step a Bernoulli(p_t) draw picks the inner SAM/ESAM step or a plain base step"),
        MethodInfo(
            name="aesam", cls=AESAM,
            paper="Jiang, Yang, Zhang and Kwok, An Adaptive Policy to Employ Sharpness-Aware "
                  "Minimization, ICLR 2023 (arXiv 2304.14647)",
            cost_units=aesam_cost, stats=SWITCH_STATS,
            description="the inner SAM/ESAM step only where ||g||^2 >= mu + c_t sigma (EMAs of ||g||^2), "
                        "else the base step on g: cost adaptive (expected share 0.5 at the defaults)"),
        MethodInfo(
            name="msam", cls=MSAM,
            paper="Becker, Altrock and Risse, Momentum-SAM: Sharpness Aware Minimization without "
                  "Computational Overhead, 2024 (arXiv 2401.12033; code MarlonBecker/MSAM)",
            cost_units=lambda **_: 3.0,
            description="gradient at w - rho v/||v|| (v = the base optimizer's momentum), then the base step "
                        "from w; weights kept perturbed between steps, moved back for evaluation"),
        MethodInfo(
            name="saf", cls=SAF,
            paper="Du et al., Sharpness-Aware Training for Free, NeurIPS 2022 (arXiv 2205.14083), SAF",
            cost_units=lambda **_: 3.0,
            stats={"traj_loss": "tau^2 KL(past softmax || current softmax), batch mean (0 while off)",
                   "traj_share": "share of the batch with stored logits from lookback epochs ago (0 while off)"},
            description="SGD on CE + lam * trajectory KL to each sample's own logits from lookback epochs "
                        "earlier (per-sample memory indexed by dataset id)",
            inert={"num_samples": "sizes the memory up front (else it grows to the largest id): same update",
                   "memory_device": "where the memory lives (host or device): same values, same update"}),
        MethodInfo(
            name="mesa", cls=MESA,
            paper="Du et al., Sharpness-Aware Training for Free, NeurIPS 2022 (arXiv 2205.14083), MESA",
            # One extra forward (1 unit) once the trajectory loss is on (epoch > start); the run's mean
            # is a little under 4 because the first start + 1 epochs cost 3.
            cost_units=lambda **_: 4.0,
            stats={"traj_loss": "tau^2 KL(EMA model's softmax || current softmax), batch mean (0 while off)",
                   "traj_share": "1 on the steps with the trajectory loss on, 0 before (epoch mean: share)"},
            description="SGD on CE + lam * trajectory KL to the outputs of an EMA of the weights "
                        "(one extra no-grad forward per step)"),
    ):
        register_method(info)


_register_default_methods()
