"""The one interface every method shares: a wrapper around a base torch optimizer.

``opt.step(closure)`` runs every forward/backward the method needs through
``closure(indices=None) -> per-sample losses`` and returns the first-pass
per-sample losses, detached. SGD calls the closure once, SAM twice, ESAM three
times (the middle call under ``no_grad``).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable, Iterable, get_args

import torch
import torch.distributed as dist
from torch import nn

Closure = Callable[..., torch.Tensor]
PhaseHook = Callable[[str], None]

# timm-style names -> (class, defaults the name implies). Explicit kwargs override the defaults.
BASE_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9, "nesterov": False}),
    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
}


def resolve_base_optimizer(base: str | type) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """Map a name ('sgd', 'momentum', 'adamw', ...) or an Optimizer subclass to (class, implied kwargs)."""
    if isinstance(base, str):
        if base.lower() not in BASE_OPTIMIZERS:
            raise ValueError(
                f"unknown base optimizer {base!r}; allowed: {sorted(BASE_OPTIMIZERS)} "
                "or a torch.optim.Optimizer subclass"
            )
        cls, implied = BASE_OPTIMIZERS[base.lower()]
        return cls, dict(implied)
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        return base, {}
    raise ValueError(
        f"base optimizer must be a torch.optim.Optimizer subclass or one of "
        f"{sorted(BASE_OPTIMIZERS)}, got {base!r}"
    )


def check_choice(key: str, value: Any, choices: Any) -> str:
    """``value`` if it is one of the ``Literal[...]`` type ``choices`` (an Enum's value counts),
    else one ValueError naming the key and the allowed values. The constructor's annotation is the
    one place the choices are written: the Hydra schema's Enum is generated from it."""
    allowed = get_args(choices)
    value = getattr(value, "value", value)
    if value not in allowed:
        names = " or ".join(repr(a) for a in allowed) if len(allowed) == 2 else "one of " + ", ".join(map(repr, allowed))
        raise ValueError(f"{key} must be {names}, got {key}={value!r}")
    return value


# -- many tensors as one vector (the methods' norms, projections and updates) -------------
def global_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """<a, b> over all tensors as one vector (a 0-dim tensor on the first tensor's device)."""
    device = a[0].device
    return torch.stack([torch.vdot(x.flatten(), y.flatten()).to(device) for x, y in zip(a, b)]).sum()


def global_norm(ts: list[torch.Tensor]) -> torch.Tensor:
    """||ts|| over all tensors as one vector."""
    norms = torch._foreach_norm(ts)
    return torch.linalg.vector_norm(torch.stack([n.to(ts[0].device) for n in norms]))


def by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[int]]:
    """Indices of ``tensors`` grouped by device: foreach ops take one device at a time."""
    out: dict[torch.device, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        out[t.device].append(i)
    return out


def scaled_add_(dst: list[torch.Tensor], src: list[torch.Tensor], scale: torch.Tensor) -> None:
    """dst += scale * src, for a 0-dim device tensor ``scale`` (no host sync)."""
    for d, s in zip(dst, src):
        d.add_(s * scale.to(s.device))


def reduce_by_hand(model: nn.Module | None) -> bool:
    """True under DDP with more than one rank: passes run under no_sync, the method all-reduces."""
    return (callable(getattr(model, "no_sync", None)) and dist.is_available()
            and dist.is_initialized() and dist.get_world_size() > 1)


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` over the DDP ranks in one collective (flattened, then copied back)."""
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for t, f in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(f)


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """Shares the base optimizer's param groups, so schedulers and param groups act on both.

    Subclasses implement :meth:`step`. Optional extras, all off by default:
    ``model`` lets the method keep BatchNorm running statistics to the first pass
    and skip DDP's gradient all-reduce in the first backward; ``grad_scaler`` in
    ``step`` handles fp16; ``seed`` seeds ``self.generator`` for methods that draw
    random numbers; ``phase_hook`` is called with a phase name at each
    phase boundary so a benchmark can time the phases (it is never called by
    default, so the step stays free of host syncs).

    ``base_optimizer`` may also be an optimizer *instance*: the method then steps that one (its
    groups and state), which is how a switching rule holds an inner SAM/ESAM step on its own base.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: str | type | torch.optim.Optimizer = "sgd",
        *,
        model: nn.Module | None = None,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise ValueError(f"a shared base optimizer takes no base keywords, got {', '.join(sorted(base_kwargs))}")
            self.base_optimizer = base_optimizer
        else:
            base_cls, implied = resolve_base_optimizer(base_optimizer)
            params = list(params)
            if not params:
                raise ValueError("optimizer got an empty parameter list")
            self.base_optimizer = base_cls(params, **{**implied, **base_kwargs})
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
        # Forward/backward units per batch sample the last step ran (forward 1, backward 2;
        # SGD 3): a host float, known without a device sync; the compute budget adds them up.
        self.last_cost: float = 0.0

    # -- what the trainer tells every method, and asks of it ---------------------
    def set_progress(self, epochs_done: float, epochs_total: float) -> None:
        """Called by the trainer before each step: training progress in (fractional) epochs.

        Methods that decide per step (late-phase SAM, RST's schedule, AE-SAM's c_t, SAF's
        epoch-indexed memory) read ``self.epochs_done`` / ``self.epochs_total``; under a compute
        budget ``epochs_total`` is the run's own length in epochs, not a fixed count."""
        self.epochs_done, self.epochs_total = float(epochs_done), float(epochs_total)

    @property
    def progress(self) -> float:
        """Share of training done, in [0, 1] (0 before the trainer said anything)."""
        total = getattr(self, "epochs_total", 0.0)
        return min(1.0, max(0.0, getattr(self, "epochs_done", 0.0) / total)) if total > 0 else 0.0

    def evaluation_weights(self) -> contextlib.AbstractContextManager:
        """Context in which the model holds the weights to evaluate and to checkpoint.

        The identity for every method that leaves the model at its iterate; a method that stores
        perturbed weights between steps (MSAM) moves them back inside and restores on exit."""
        return contextlib.nullcontext()

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

    def _plain_step(self, closure: Closure, grad_scaler) -> torch.Tensor:
        """The base optimizer's step on one forward and one backward of the whole batch: SGD's
        step, and the cheap step of methods that take a sharpness-aware step only sometimes."""
        self.zero_grad()
        self._phase("first_pass")
        losses = closure()
        self._backward(losses.mean(), grad_scaler)
        self._base_step(grad_scaler)
        self._phase("end")
        return losses.detach()

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
