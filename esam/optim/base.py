"""The one interface every method shares: a wrapper around a base torch optimizer.

``opt.step(closure)`` runs every forward/backward the method needs through
``closure(indices=None) -> per-sample losses`` and returns the first-pass
per-sample losses, detached. SGD calls the closure once, SAM twice, ESAM three
times (the middle call under ``no_grad``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch
from torch import nn

Closure = Callable[..., torch.Tensor]
PhaseHook = Callable[[str], None]

BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}


def resolve_base_optimizer(base: str | type) -> type[torch.optim.Optimizer]:
    """Map a name ('sgd', 'adamw', ...) or an Optimizer subclass to the class."""
    if isinstance(base, str):
        if base.lower() not in BASE_OPTIMIZERS:
            raise ValueError(
                f"unknown base optimizer {base!r}; allowed: {sorted(BASE_OPTIMIZERS)} "
                "or a torch.optim.Optimizer subclass"
            )
        return BASE_OPTIMIZERS[base.lower()]
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        return base
    raise ValueError(
        f"base optimizer must be a torch.optim.Optimizer subclass or one of "
        f"{sorted(BASE_OPTIMIZERS)}, got {base!r}"
    )


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """Shares the base optimizer's param groups, so schedulers and param groups act on both.

    Subclasses implement :meth:`step`. Optional extras, all off by default:
    ``model`` lets the method keep BatchNorm running statistics to the first pass
    and skip DDP's gradient all-reduce in the first backward; ``grad_scaler`` in
    ``step`` handles fp16; ``seed`` seeds ``self.generator`` for methods that draw
    random numbers; ``phase_hook`` is called with a phase name at each
    phase boundary so a benchmark can time the phases (it is never called by
    default, so the step stays free of host syncs).
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: str | type = "sgd",
        *,
        model: nn.Module | None = None,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        base_cls = resolve_base_optimizer(base_optimizer)
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        self.base_optimizer = base_cls(params, **base_kwargs)
        # torch.optim.Optimizer.__init__ would build its own groups; we share the base's
        # so that an LR scheduler stepping this wrapper changes what the base uses.
        super().__init__(self.base_optimizer.param_groups, self.base_optimizer.defaults)
        self.param_groups = self.base_optimizer.param_groups
        self.model = model
        # For methods that draw random numbers (ESAM's SWP): seeded from the run's seed so
        # runs are reproducible, on the CPU so a draw never waits on the device.
        self.generator = torch.Generator()
        self.generator.manual_seed(torch.initial_seed() if seed is None else int(seed))
        self.phase_hook: PhaseHook | None = None
        # Device tensors (no .item()) describing the last step; the trainer averages them.
        self.last_stats: dict[str, torch.Tensor] = {}

    # -- shared machinery -------------------------------------------------------
    def _phase(self, name: str) -> None:
        if self.phase_hook is not None:
            self.phase_hook(name)

    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _first_pass_context(self) -> contextlib.AbstractContextManager:
        """DDP: the first backward stays local (per-rank perturbation, as in the paper's code)."""
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if callable(no_sync) else contextlib.nullcontext()

    @contextlib.contextmanager
    def _frozen_bn_stats(self):
        """Passes after the first use batch statistics but leave running stats untouched."""
        if self.model is None:
            yield
            return
        bns = [m for m in self.model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        for m in bns:
            m.track_running_stats = False  # train mode + no tracking = batch stats, no update
        try:
            yield
        finally:
            for m in bns:
                m.track_running_stats = True

    @staticmethod
    def _backward(loss: torch.Tensor, grad_scaler) -> None:
        (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()

    def _base_step(self, grad_scaler) -> None:
        self._phase("base_update")
        if grad_scaler is not None:
            grad_scaler.step(self.base_optimizer)
            grad_scaler.update()
        else:
            self.base_optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # -- state: the base optimizer's state plus whatever the method adds ---------
    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base_optimizer.state_dict(), "extra": self.extra_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict["base"])
        # The base rebuilds its group list on load; share the new one again.
        self.param_groups = self.base_optimizer.param_groups
        self.load_extra_state(state_dict.get("extra", {}))

    @property
    def state(self):  # momentum buffers etc. live in the base optimizer
        return self.base_optimizer.state

    @state.setter
    def state(self, value) -> None:  # torch.optim.Optimizer.__init__ assigns it once
        pass

    def step(self, closure: Closure, *, grad_scaler=None):  # pragma: no cover - abstract
        raise NotImplementedError


class SGD(SharpnessAwareOptimizer):
    """The base optimizer alone, behind the same ``step(closure)`` interface (one pass)."""

    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        self.zero_grad()
        self._phase("first_pass")
        losses = closure()
        self._backward(losses.mean(), grad_scaler)
        self._base_step(grad_scaler)
        self._phase("end")
        self.last_stats = {}
        return losses.detach()
