"""MSAM (Becker et al., 2024): SAM's perturbation taken from the momentum, at no extra pass.

With v_t the base optimizer's momentum (SGD's ``momentum_buffer``, Adam's ``exp_avg``) and
w_t the iterate, a step is

    g_t     = grad L(w_t - rho v_t / ||v_t||)    one forward and one backward
    w_{t+1} = base step from w_t on g_t           (which also gives v_{t+1})

As in the authors' code (MarlonBecker/MSAM, optimizer/msam.py), the model holds the perturbed
weights w~_t = w_t - c_t v_t (c_t = rho / (||v_t|| + eps)) between steps, so the next forward
needs no extra work: a step moves back (w~ + c_t v_t), takes the base step and perturbs again
along the new momentum. The weights to evaluate and to checkpoint are the moved-back ones:
:meth:`evaluation_weights` moves back and, on exit, copies the perturbed weights back exactly.

Deliberate difference: the authors add SGD's L2 weight decay at w~_t; here the base optimizer
steps from w_t, so its weight decay (L2 or AdamW's) acts at w_t, as in our SAM.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Iterable

import torch

from esam.optim.base import Closure, SharpnessAwareOptimizer, by_device, global_norm

# The base optimizer's state entry that is its momentum, by optimizer.
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


class MSAM(SharpnessAwareOptimizer):
    """One pass per step at w - rho v/||v||; ``rho`` lives in every param group.

    The norm ||v|| is over all tensors with a momentum buffer, across param groups. The
    first step has no momentum yet and runs at w_0 (the authors start from v_0 = 0).
    Checkpoints: :meth:`extra_state` holds the perturbed weights, and loading it copies them
    into the model, so load the model's state first and then the optimizer's (as the
    trainer does); the resumed run then equals the straight one bit for bit.

    BatchNorm running statistics are gathered at the perturbed weights; as the authors
    (MarlonBecker/MSAM main.py, after training) the engine recomputes them at w with one
    no-grad train-mode pass over the training set before the final test (esam/engine/hooks.py).
    """

    before_final_evaluation = ("recalibrate_bn",)  # read by the engine (trainer.before_final_eval)

    def __init__(
        self,
        params: Iterable,
        base_optimizer: str | type | torch.optim.Optimizer = "sgd",
        *,
        rho: float = 3.0,
        eps: float = 1e-12,
        model: torch.nn.Module | None = None,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not rho >= 0.0:
            raise ValueError(f"rho must be >= 0, got rho={rho}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got eps={eps}")
        super().__init__(params, base_optimizer, model=model, seed=seed, **base_kwargs)
        base = self.base_optimizer
        if isinstance(base, (torch.optim.SGD, torch.optim.RMSprop)):
            bad = [g.get("momentum", 0.0) for g in self.param_groups if not g.get("momentum", 0.0) > 0.0]
            if bad:
                raise ValueError(f"msam perturbs along the base optimizer's momentum: momentum must be > 0, "
                                 f"got momentum={bad[0]}")
        elif not isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
            raise ValueError(f"msam needs a base optimizer with a momentum buffer (sgd with momentum, "
                             f"rmsprop with momentum, adam, adamw), got {type(base).__name__}")
        for d in (self.defaults, base.defaults):
            d.setdefault("rho", rho)
        for group in self.param_groups:
            group.setdefault("rho", rho)
        self.eps = float(eps)
        # c per param group for the weights the model holds now (None: not perturbed yet).
        # Device tensors, so that stepping never waits on the device.
        self._scales: list[torch.Tensor | None] | None = None
        # While evaluation_weights() holds the moved-back weights: the perturbed ones.
        self._held: list[torch.Tensor] | None = None

    # -- the momentum and the perturbation ---------------------------------------------
    def _momentum(self, p: torch.Tensor) -> torch.Tensor | None:
        state = self.base_optimizer.state.get(p)
        if not state:
            return None
        for key in MOMENTUM_KEYS:
            if key in state and state[key] is not None:
                return state[key]
        return None

    def _perturbed(self) -> list[tuple[int, list[torch.Tensor], list[torch.Tensor]]]:
        """(group index, tensors, their momenta) for every tensor with a momentum buffer."""
        out = []
        for i, group in enumerate(self.param_groups):
            pairs = [(p, v) for p in group["params"] if (v := self._momentum(p)) is not None]
            if pairs:
                out.append((i, [p for p, _ in pairs], [v for _, v in pairs]))
        return out

    @torch.no_grad()
    def _shift(self, sign: float) -> None:
        """w <- w + sign * c v at every perturbed tensor (sign +1: move back, -1: perturb)."""
        for i, ps, vs in self._perturbed():
            c = self._scales[i]
            if c is None:
                continue
            # One op per device; p + sign * v * c exactly as p.addcmul_(v, c, value=sign) computes it.
            for dev, idx in by_device(ps).items():
                c_dev = c.to(dev)
                torch._foreach_addcmul_([ps[j] for j in idx], [vs[j] for j in idx], [c_dev] * len(idx),
                                        value=sign)

    @torch.no_grad()
    def _new_scales(self) -> None:
        """c = rho_g / (||v|| + eps) per group, ||v|| over all momentum buffers."""
        groups = self._perturbed()
        if not groups:
            self._scales = None
            return
        vs = [v for _, _, g_vs in groups for v in g_vs]
        norm = global_norm(vs)
        self._scales = [None] * len(self.param_groups)
        for i, _, _ in groups:
            self._scales[i] = self.param_groups[i]["rho"] / (norm + self.eps)

    # -- the step ----------------------------------------------------------------------------
    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        if self._held is not None:
            raise RuntimeError("msam: step() inside evaluation_weights(); step outside it")
        self.zero_grad()
        self._phase("first_pass")
        losses = closure()  # at w - c v: the weights the model holds (synced under DDP)
        self._backward(losses.mean(), grad_scaler)
        self._phase("restore")
        if self._scales is not None:
            self._shift(+1.0)  # back to w, as the authors' code does (an add, not a copy)
        self._base_step(grad_scaler)
        self._phase("perturb")
        self._new_scales()
        if self._scales is not None:
            self._shift(-1.0)  # the next step's forward point, w - rho v/||v||
        self._phase("end")
        self.last_stats = {}
        self.last_cost = 3.0
        return losses.detach()

    # -- evaluation and checkpoints ---------------------------------------------------------
    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """The model holds w (moved back) inside; the perturbed weights come back by copy on exit."""
        if self._held is not None or self._scales is None:  # nested, or nothing perturbed yet
            yield
            return
        tensors = [p for _, ps, _ in self._perturbed() for p in ps]
        with torch.no_grad():
            self._held = [p.detach().clone() for p in tensors]
            self._shift(+1.0)  # the same op as a step's move back: the same w, bit for bit
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(tensors, self._held)
            self._held = None

    def _indexed_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        if self._scales is None:
            return state
        index = {p: i for i, p in enumerate(self._indexed_params())}
        tensors = [p for _, ps, _ in self._perturbed() for p in ps]
        # Inside evaluation_weights the model holds w; w~ = w - c v is not exact in floating
        # point, so the perturbed weights themselves are saved.
        held = self._held if self._held is not None else [p.detach() for p in tensors]
        state["msam"] = {
            "scales": [None if c is None else c.detach().clone() for c in self._scales],
            "perturbed_weights": {index[p]: w.clone() for p, w in zip(tensors, held)},
        }
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        saved = state.get("msam")
        if saved is None:
            self._scales = None
            return
        params = self._indexed_params()
        with torch.no_grad():
            for i, w in saved["perturbed_weights"].items():
                params[int(i)].copy_(w)
        self._scales = [None if c is None else c.to(params[0].device) for c in saved["scales"]]

