"""LookSAM (Liu et al., CVPR 2022): a full SAM step every k steps, SGD-cost steps in between
that reuse the part of the last SAM gradient orthogonal to the plain gradient."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from esam.optim.base import Closure, all_reduce_mean, global_dot, global_norm, reduce_by_hand, scaled_add_
from esam.optim.sam import SAM, BNStats


class LookSAM(SAM):
    """Every ``k``-th step (t % k == 0, t counted from 0) is a SAM step: g at w, g_s at w + e
    (e = rho g/||g||), update with g_s, and keep g_v = g_s - (<g, g_s>/||g||^2) g, the part of
    g_s orthogonal to g. Every other step runs ONE forward/backward for g and updates with
    g + alpha * (||g|| / ||g_v||) * g_v (the paper's Algorithm 1, norms over all tensors as
    one vector; some public versions project per tensor instead).

    Cost: 6 units on a SAM step, 3 on the others, 3 + 3/k on average. ``last_stats['sam_step']``
    is 1.0 on SAM steps, so the epoch mean is the share of sharpness-aware steps. Memory: one
    extra copy of the gradients (g_v, which holds g during a SAM step), kept in checkpoints.

    DDP: the first backward of a SAM step is all-reduced too (unlike SAM's local one), so g,
    e and hence g_v are the same on every rank and the cheap steps, whose gradient is the
    all-reduced g, stay in step across ranks; it costs one extra all-reduce every k steps.

    ``m`` (m-sharpness) and ``bn_stats`` act on the SAM steps as in :class:`SAM`: each chunk of m
    samples has its own first pass, perturbation e_c = rho g_c/||g_c|| and second pass, and
    g_s = the mean of the chunks' second-pass gradients. g_v is then built from the batch means,
    g = mean_c g_c and g_s, which is what B/m DDP ranks with per-rank perturbation compute once
    they share g (all-reduced by hand: g_v must be the same on every rank for the cheap steps).
    The cheap steps run on the whole batch, as SGD's step does.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: str | type | torch.optim.Optimizer = "sgd",
        *,
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        adaptive: bool = False,
        m: int | None = None,
        bn_stats: BNStats = "first",
        eps: float = 1e-12,
        model: torch.nn.Module | None = None,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1 (a SAM step every k steps), got k={k!r}")
        if not alpha >= 0.0:
            raise ValueError(f"alpha must be >= 0, got alpha={alpha}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, m=m, bn_stats=bn_stats, eps=eps,
                         model=model, seed=seed, **base_kwargs)
        self.k, self.alpha = k, float(alpha)
        self._t = 0  # steps taken; t % k == 0 is a SAM step
        # g_v per tensor (None until the first SAM step, or after an fp16-skipped one) and
        # ||g_v||, both carried from one SAM step to the next k - 1 steps.
        self._gv: dict[torch.Tensor, torch.Tensor] | None = None
        self._gv_norm: torch.Tensor | None = None

    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        sam_step = self._gv is None or self._t % self.k == 0
        losses = self._sam_step(closure, grad_scaler) if sam_step else self._reuse_step(closure, grad_scaler)
        self._t += 1
        self.last_stats = {"sam_step": 1.0 if sam_step else 0.0}
        self.last_cost = 6.0 if sam_step else 3.0
        return losses

    def _sam_step(self, closure: Closure, grad_scaler) -> torch.Tensor:
        chunks = self.chunks(closure)
        n = len(chunks)
        carry, losses, params, gv = None, [], [], {}
        for c, subset in enumerate(chunks):
            last = c == n - 1
            # The whole batch: g all-reduced under DDP (see the class docstring); chunks: local.
            losses_w = self.first_pass(closure, subset, grad_scaler=grad_scaler, update_bn=c == 0, sync=n == 1)
            losses.append(losses_w)
            if c == 0:
                # g is kept in the g_v buffers (reused every SAM step) before e overwrites .grad.
                params = [p for p in self._trainable() if p.grad is not None]
                gv = self._gv if self._gv is not None and all(p in self._gv for p in params) else {}
                self._gv = None  # invalid until this step completes
                for p in params:
                    buf = gv.get(p)
                    if buf is None or buf.shape != p.shape or buf.device != p.device:
                        buf = gv[p] = torch.empty_like(p.grad)
                    buf.copy_(p.grad) if n == 1 else buf.copy_(p.grad).div_(n)
            else:
                with torch.no_grad():
                    for p in params:
                        if p.grad is not None:
                            gv[p].add_(p.grad, alpha=1.0 / n)
            part = self.ascent_pass(closure, losses_w, subset, participants=params, grad_scaler=grad_scaler,
                                    update_bn=c == 0, scale=1.0 / n, carry=carry, sync=last)
            if part.overflow:
                self.zero_grad()  # fp16 overflow: the step is skipped, the next one is a SAM step
                self._phase("end")
                return torch.cat(losses) if n > 1 else losses_w
            carry = None if last else self.take_grads()
        losses_w = torch.cat(losses) if n > 1 else losses[0]
        if n > 1 and params and reduce_by_hand(self.model):
            all_reduce_mean([gv[p] for p in params])  # g, the mean of every rank's chunks

        if params:
            with torch.no_grad():
                # g_v = g_s - (<g, g_s> / ||g||^2) g, built in place in g's buffer. Under a
                # GradScaler g and g_s carry the same scale; only g_v's direction is used later.
                g = [gv[p] for p in params]
                g_s = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                coef = global_dot(g, g_s) / (global_dot(g, g) + self.eps)
                for buf, gs in zip(g, g_s):
                    buf.mul_(-coef.to(buf.device)).add_(gs)
                gv_norm = global_norm(g)
            if grad_scaler is None or bool(torch.isfinite(gv_norm)):  # fp16 only: one sync per k steps
                self._gv, self._gv_norm = gv, gv_norm
        self._base_step(grad_scaler)
        self._phase("end")
        return losses_w

    def _reuse_step(self, closure: Closure, grad_scaler) -> torch.Tensor:
        self.zero_grad()
        self._phase("first_pass")
        losses = closure()
        self._backward(losses.mean(), grad_scaler)
        self._phase("reuse")
        with torch.no_grad():
            params = [p for p in self._trainable() if p.grad is not None and p in self._gv]
            if params:
                grads = [p.grad for p in params]
                # g + alpha * ||g|| / ||g_v|| * g_v (||g|| over the tensors that have a g_v)
                scale = self.alpha * global_norm(grads) / (self._gv_norm.to(grads[0].device) + self.eps)
                scaled_add_(grads, [self._gv[p] for p in params], scale)
        self._base_step(grad_scaler)
        self._phase("end")
        return losses.detach()

    # -- state: the step counter and g_v, so that a resumed run continues bit for bit -----
    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        state["looksam_t"] = self._t
        if self._gv is not None:
            state["looksam_gv"] = [self._gv.get(p) for p in self._all_params()]
            state["looksam_gv_norm"] = self._gv_norm
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self._t = int(state.get("looksam_t", 0))
        self._gv, self._gv_norm = None, None
        if state.get("looksam_gv") is not None:
            params = self._all_params()
            # copies: the buffers are updated in place, the checkpoint must not change with them
            self._gv = {p: g.to(p.device, copy=True) for p, g in zip(params, state["looksam_gv"])
                        if g is not None}
            self._gv_norm = state["looksam_gv_norm"].to(params[0].device, copy=True)


def looksam_cost(k: int, **_: Any) -> float:
    """One SAM step (6 units) and k - 1 SGD-cost steps (3 units) per k steps."""
    return 3.0 + 3.0 / k

