"""GSAM (Zhuang et al., ICLR 2022): SAM plus an ascent along the part of the plain gradient
orthogonal to the SAM gradient, which shrinks the surrogate gap; rho follows the lr."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist

from esam.optim.base import Closure, global_dot
from esam.optim.registry import MethodInfo, register_method
from esam.optim.sam import SAM


class GSAM(SAM):
    """g at w, e = rho_t g/||g||, g_s at w + e, then the base step on

        g_s - alpha * g_perp,   g_perp = g - (<g, g_s> / ||g_s||^2) g_s

    (the paper's Algorithm 1, theta_{t+1} = theta_t - lr (g_s - alpha g_perp): descend on the
    perturbed loss, ascend along the part of the loss gradient orthogonal to g_s, which lowers
    the surrogate gap L(w+e) - L(w) without changing L(w+e) to first order; the same sign as
    juntang-zhuang/GSAM's ``gradient_decompose``, which adds ``vertical`` with ``alpha=-alpha``).

    rho_t = rho_min + (rho - rho_min) * (lr_t - lr_min) / (lr_max - lr_min) per param group,
    with lr_t the group's lr at this step, lr_max its lr when the optimizer was built (the
    peak of the schedule) and ``rho`` the paper's rho_max; rho_t = rho if lr_max <= lr_min
    (as the authors' ProportionScheduler). Cost 6 units, as SAM; memory: one extra copy of the
    gradients (g, kept while e takes its place in .grad).

    DDP (as the authors' code): both backward passes stay local, each rank decomposes its own
    gradients, and the final direction is averaged over the ranks by one all-reduce.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: str | type = "sgd",
        *,
        rho: float = 0.04,
        rho_min: float = 0.02,
        alpha: float = 0.01,
        lr_min: float = 0.0,
        adaptive: bool = False,
        eps: float = 1e-12,
        model: torch.nn.Module | None = None,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not rho >= 0.0:
            raise ValueError(f"rho must be >= 0 (the radius at the peak lr), got rho={rho}")
        if not 0.0 <= rho_min <= rho:
            raise ValueError(f"rho_min must be in [0, rho={rho}], got rho_min={rho_min}")
        if not alpha >= 0.0:
            raise ValueError(f"alpha must be >= 0, got alpha={alpha}")
        if not lr_min >= 0.0:
            raise ValueError(f"lr_min must be >= 0, got lr_min={lr_min}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eps=eps,
                         model=model, seed=seed, **base_kwargs)
        self.alpha = float(alpha)
        # In the groups, so a checkpoint (the base's state_dict) carries them and a resumed
        # run schedules rho as the straight run; group["rho"] becomes rho_t each step.
        for group in self.param_groups:
            group.setdefault("rho_max", float(rho))
            group.setdefault("rho_min", float(rho_min))
            group.setdefault("lr_min", float(lr_min))
            group.setdefault("lr_max", float(group["lr"]))
        self._g: dict[torch.Tensor, torch.Tensor] = {}  # first-pass gradients, buffers reused

    def _schedule_rho(self) -> float:
        """group['rho'] <- rho_t for every group; returns the first group's rho_t."""
        for group in self.param_groups:
            group.setdefault("rho_max", group["rho"])
            group.setdefault("rho_min", group["rho"])
            group.setdefault("lr_min", 0.0)
            group.setdefault("lr_max", float(group["lr"]))  # a group added after construction
            lr, lr_min, lr_max = float(group["lr"]), group["lr_min"], group["lr_max"]
            rho_max, rho_min = group["rho_max"], group["rho_min"]
            if lr_max > lr_min:
                group["rho"] = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
            else:
                group["rho"] = rho_max
        return float(self.param_groups[0]["rho"])

    def _reduce_by_hand(self) -> bool:
        """True under DDP with more than one rank: the passes run under no_sync, we all-reduce."""
        return (callable(getattr(self.model, "no_sync", None)) and dist.is_available()
                and dist.is_initialized() and dist.get_world_size() > 1)

    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        self.zero_grad()
        rho_t = self._schedule_rho()
        by_hand = self._reduce_by_hand()
        self._phase("first_pass")
        with self._first_pass_context():
            losses_w = closure()
            self._backward(losses_w.mean(), grad_scaler)
        losses_w = losses_w.detach()
        params = [p for p in self._trainable() if p.grad is not None]
        with torch.no_grad():  # keep g: _perturb turns .grad into e
            for p in params:
                buf = self._g.get(p)
                if buf is None or buf.shape != p.shape or buf.device != p.device:
                    buf = self._g[p] = torch.empty_like(p.grad)
                buf.copy_(p.grad)

        part = self._ascent_pass(closure, losses_w, params, 0, None, grad_scaler, sync=not by_hand)
        if part.overflow:  # fp16 overflow: the step is skipped
            self.zero_grad()
            self._phase("end")
            return losses_w

        self._phase("decompose")
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            g, g_s = [self._g[p] for p in params], [p.grad for p in params]
            # Under a GradScaler g and g_s carry the same scale, so the result carries it too.
            coef = global_dot(g, g_s) / (global_dot(g_s, g_s) + self.eps)
            for gi, gs in zip(g, g_s):
                gi.sub_(gs * coef.to(gs.device))   # g_perp, in g's buffer
                gs.sub_(gi, alpha=self.alpha)      # g_s - alpha * g_perp
            if by_hand:
                _all_reduce_mean(g_s)
        self._base_step(grad_scaler)
        self._phase("end")
        self.last_stats = {"sharpness": part.sharpness, "rho": rho_t}
        self.last_cost = 6.0
        return losses_w


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` over the DDP ranks in one collective (flattened, then copied back)."""
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for t, f in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(f)


register_method(MethodInfo(
    name="gsam", cls=GSAM,
    paper="Zhuang et al., Surrogate Gap Minimization Improves Sharpness-Aware Training (GSAM, "
          "surrogate gap guided SAM), ICLR 2022 (arXiv 2203.08065)",
    cost_units=lambda **_: 6.0,
    hparams={"rho": 0.04, "rho_min": 0.02, "alpha": 0.01, "lr_min": 0.0, "adaptive": False},
    stats={"sharpness": "mean loss rise L(w+e) - L(w) over the batch",
           "rho": "the perturbation radius rho_t of this step (follows the lr)"},
    description="SAM's two passes; update g_s - alpha * (part of g orthogonal to g_s); "
                "rho scheduled with the lr between rho_min and rho",
))
