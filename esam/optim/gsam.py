"""GSAM (Zhuang et al., ICLR 2022): SAM plus an ascent along the part of the plain gradient
orthogonal to the SAM gradient, which shrinks the surrogate gap; rho follows the lr."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from esam.optim.base import Closure, all_reduce_mean, global_dot, reduce_by_hand
from esam.optim.sam import SAM, BNStats, mean_sharpness


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

    ``m`` (m-sharpness) and ``bn_stats`` as in :class:`SAM`, and chunked the way the authors' DDP
    code is per rank: each chunk of m samples has its own g_c, e_c = rho_t g_c/||g_c||, g_s,c and
    its own decomposition d_c = g_s,c - alpha g_perp,c; the update is the mean of the d_c.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: str | type | torch.optim.Optimizer = "sgd",
        *,
        rho: float = 0.04,
        rho_min: float = 0.02,
        alpha: float = 0.01,
        lr_min: float = 0.0,
        adaptive: bool = False,
        m: int | None = None,
        bn_stats: BNStats = "first",
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
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, m=m, bn_stats=bn_stats, eps=eps,
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

    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        rho_t = self._schedule_rho()
        by_hand = reduce_by_hand(self.model)
        chunks = self.chunks(closure)
        n = len(chunks)
        parts, total, params = [], None, []
        for c, subset in enumerate(chunks):
            losses_w = self.first_pass(closure, subset, grad_scaler=grad_scaler, update_bn=c == 0)
            if c == 0:
                params = [p for p in self._trainable() if p.grad is not None]
            with torch.no_grad():  # keep g: perturb turns .grad into e
                for p in params:
                    buf = self._g.get(p)
                    if buf is None or buf.shape != p.shape or buf.device != p.device:
                        buf = self._g[p] = torch.empty_like(p)
                    if p.grad is None:
                        buf.zero_()
                    else:
                        buf.copy_(p.grad)
            part = self.ascent_pass(closure, losses_w, subset, participants=params, grad_scaler=grad_scaler,
                                    update_bn=c == 0, sync=not by_hand)
            parts.append(part)
            if part.overflow:  # fp16 overflow: the step is skipped
                self.zero_grad()
                self._phase("end")
                return torch.cat([q.losses_w for q in parts])
            self._phase("decompose")
            d = self._decompose(params)  # this chunk's g_s - alpha g_perp, in .grad
            if n > 1:
                with torch.no_grad():
                    if total is None:
                        total = [t * (1.0 / n) for t in d]
                    else:
                        torch._foreach_add_(total, d, alpha=1.0 / n)
        if total is not None:
            for p, t in zip(params, total):
                p.grad = t
        if by_hand:
            with torch.no_grad():
                all_reduce_mean([p.grad for p in params])
        self._base_step(grad_scaler)
        self._phase("end")
        self.last_stats = {"sharpness": mean_sharpness(parts), "rho": rho_t}
        self.last_cost = 6.0
        return parts[0].losses_w if n == 1 else torch.cat([q.losses_w for q in parts])

    @torch.no_grad()
    def _decompose(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """g_s - alpha * g_perp in .grad (g_s there, g in self._g); returns the .grad tensors."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        g, g_s = [self._g[p] for p in params], [p.grad for p in params]
        # Under a GradScaler g and g_s carry the same scale, so the result carries it too.
        coef = global_dot(g, g_s) / (global_dot(g_s, g_s) + self.eps)
        for gi, gs in zip(g, g_s):
            gi.sub_(gs * coef.to(gs.device))   # g_perp, in g's buffer
            gs.sub_(gi, alpha=self.alpha)      # g_s - alpha * g_perp
        return g_s
