"""SAM (Foret et al., 2021) and its adaptive variant ASAM (Kwon et al., 2021)."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch

from esam.optim.base import Closure, SharpnessAwareOptimizer
from esam.optim.registry import MethodInfo, register_method


class SAM(SharpnessAwareOptimizer):
    """Two passes per step: gradient at w, ascend to w+e, gradient there, restore w, base step.

    e = rho * g / ||g||; with ``adaptive=True`` e = rho * w^2 g / || |w| g ||.
    ``rho`` and ``adaptive`` live in every param group, so a scheduler can change them.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: str | type = "sgd",
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        eps: float = 1e-12,
        model: torch.nn.Module | None = None,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not rho >= 0.0:
            raise ValueError(f"rho must be >= 0, got rho={rho}")
        super().__init__(params, base_optimizer, model=model, seed=seed, **base_kwargs)
        # In the defaults too, so that add_param_group() gives new groups rho and adaptive.
        for d in (self.defaults, self.base_optimizer.defaults):
            d.setdefault("rho", rho)
            d.setdefault("adaptive", adaptive)
        for group in self.param_groups:
            group.setdefault("rho", rho)
            group.setdefault("adaptive", adaptive)
        self.eps = eps
        # Copies of w at the perturbed tensors, reused every step: restoring by copy is
        # exact, while w + e - e is not in floating point.
        self._backup: dict[torch.Tensor, torch.Tensor] = {}

    # Hooks ESAM overrides -------------------------------------------------------
    def _draw_participants(self) -> list[torch.Tensor]:
        """Tensors that get a first-pass gradient and a perturbation (SAM: all)."""
        return self._trainable()

    def _perturbation_scale(self) -> float:
        return 1.0

    def _select(self, closure: Closure, losses_w: torch.Tensor):
        """Indices for the second pass (SAM: the whole batch) and the sharpness if known."""
        return None, None

    # The step -------------------------------------------------------------------
    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        self.zero_grad()
        participants = self._draw_participants()
        participating = set(participants)
        frozen = [p for p in self._trainable() if p not in participating]
        self._phase("first_pass")
        try:
            for p in frozen:  # no weight gradient is computed for them: the saving is real
                p.requires_grad_(False)
            with self._first_pass_context():
                losses_w = closure()
                self._backward(losses_w.mean(), grad_scaler)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        losses_w = losses_w.detach()

        self._phase("perturb")
        perturbed = self._perturb(participants, grad_scaler)
        if perturbed is None:  # fp16 overflow: the step is skipped
            self.zero_grad()
            self._phase("end")
            return losses_w
        self.zero_grad()

        with self._frozen_bn_stats():
            indices, sharpness = self._select(closure, losses_w)
            self._phase("second_pass")
            losses_e = closure() if indices is None else closure(indices)
            self._backward(losses_e.mean(), grad_scaler)
        if sharpness is None:
            sharpness = (losses_e.detach() - losses_w).mean()

        self._phase("restore")
        self._restore(perturbed)
        self._base_step(grad_scaler)
        self._phase("end")
        n = losses_w.shape[0]
        sample_frac = losses_e.shape[0] / n
        param_frac = len(participants) / max(1, len(participants) + len(frozen))
        self.last_stats = {"sharpness": sharpness, "sample_frac": sample_frac, "param_frac": param_frac}
        # first forward 1 + first backward (input grads 1, weight grads only where drawn) +
        # selection forward (if any) + second forward/backward on the kept samples.
        self.last_cost = 1.0 + 1.0 + param_frac + (1.0 if sample_frac < 1 else 0.0) + 3.0 * sample_frac
        return losses_w

    @torch.no_grad()
    def _perturb(self, params: list[torch.Tensor], grad_scaler) -> list[torch.Tensor] | None:
        """w <- w + e at those ``params`` that got a gradient; returns them, or None (and w
        untouched) if fp16 gradients overflowed."""
        taking_part = set(params)
        by_group = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None and p in taking_part]
            if ps:
                by_group.append((group, ps))
        if not by_group:
            return []
        grads_all = [p.grad for _, ps in by_group for p in ps]
        if grad_scaler is not None:
            # fp16: unscale before the norm, and skip the whole step on inf/nan.
            inv_scale = 1.0 / grad_scaler.get_scale()
            torch._foreach_mul_(grads_all, inv_scale)
        # e is built in place in .grad: the first-pass gradient is not needed afterwards.
        for group, ps in by_group:
            if group["adaptive"]:
                torch._foreach_mul_([p.grad for p in ps], torch._foreach_abs([p.detach() for p in ps]))
        norms = torch._foreach_norm(grads_all)
        device = norms[0].device
        grad_norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
        if grad_scaler is not None and not torch.isfinite(grad_norm).item():
            grad_scaler.update(grad_scaler.get_scale() * grad_scaler.get_backoff_factor())
            return None
        for group, ps in by_group:
            scale = group["rho"] / (self._perturbation_scale() * (grad_norm + self.eps))
            es = [p.grad for p in ps]
            if group["adaptive"]:
                torch._foreach_mul_(es, torch._foreach_abs([p.detach() for p in ps]))
            for dev, idx in _by_device(ps).items():
                torch._foreach_mul_([es[i] for i in idx], scale.to(dev))
            backups = [self._backup_for(p) for p in ps]
            torch._foreach_copy_(backups, ps)
            torch._foreach_add_(ps, es)
        return [p for _, ps in by_group for p in ps]

    @torch.no_grad()
    def _restore(self, perturbed: list[torch.Tensor]) -> None:
        # Exactly the tensors perturbed this step: a backup left from an earlier step
        # (a tensor unused this time, so no gradient) is stale and must not be copied back.
        if perturbed:
            torch._foreach_copy_(perturbed, [self._backup[p] for p in perturbed])

    def _backup_for(self, p: torch.Tensor) -> torch.Tensor:
        buf = self._backup.get(p)
        if buf is None or buf.shape != p.shape or buf.device != p.device:
            buf = self._backup[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return buf


def _by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[int]]:
    out: dict[torch.device, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        out[t.device].append(i)
    return out


register_method(MethodInfo(
    name="sam", cls=SAM,
    paper="Foret et al., Sharpness-Aware Minimization, ICLR 2021 (adaptive: Kwon et al., ASAM, ICML 2021)",
    cost_units=lambda **_: 6.0,
    hparams={"rho": 0.05, "adaptive": False},
    stats={"sharpness": "mean loss rise L(w+e) - L(w) over the batch"},
    description="gradient at w, ascend to w+e (e = rho g/||g||), gradient there, restore w, base step",
))
