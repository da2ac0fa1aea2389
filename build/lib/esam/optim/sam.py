"""SAM (Foret et al., 2021) and its adaptive variant ASAM (Kwon et al., 2021)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from esam.optim.base import Closure, SharpnessAwareOptimizer, by_device, global_norm
from esam.optim.registry import MethodInfo, register_method


class SAM(SharpnessAwareOptimizer):
    """Two passes per step: gradient at w, ascend to w+e, gradient there, restore w, base step.

    e = rho * g / ||g||; with ``adaptive=True`` e = rho * w^2 g / || |w| g ||.
    ``rho`` and ``adaptive`` live in every param group, so a scheduler can change them.

    ``m`` (m-sharpness, Foret et al. section 4.1): split the batch into B/m contiguous chunks,
    each with its own first pass, perturbation and second pass at its own w+e; the update
    uses the mean of the chunks' second-pass gradients. That is what B/m DDP ranks of
    per-rank batch m compute (the first backward stays local), on one device. ``None`` = the
    whole batch. Needs ``closure.batch_size`` (set by :func:`esam.optim.make_closure`).
    ``bn_stats``: ``"first"`` = BatchNorm running statistics are updated by the first pass
    only (ours); ``"all"`` = by every forward, as in the authors' code. With chunks, only
    the first chunk touches them, as DDP keeps rank 0's buffers (broadcast_buffers).
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: str | type = "sgd",
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        m: int | None = None,
        bn_stats: str = "first",
        eps: float = 1e-12,
        model: torch.nn.Module | None = None,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not rho >= 0.0:
            raise ValueError(f"rho must be >= 0, got rho={rho}")
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"m must be a positive int or None (the whole batch), got m={m!r}")
        if bn_stats not in ("first", "all"):
            raise ValueError(f"bn_stats must be 'first' or 'all', got bn_stats={bn_stats!r}")
        super().__init__(params, base_optimizer, model=model, seed=seed, **base_kwargs)
        # In the defaults too, so that add_param_group() gives new groups rho and adaptive.
        for d in (self.defaults, self.base_optimizer.defaults):
            d.setdefault("rho", rho)
            d.setdefault("adaptive", adaptive)
        for group in self.param_groups:
            group.setdefault("rho", rho)
            group.setdefault("adaptive", adaptive)
        self.eps, self.m, self.bn_stats = eps, m, bn_stats
        # Copies of w at the perturbed tensors, reused every step: restoring by copy is
        # exact, while w + e - e is not in floating point.
        self._backup: dict[torch.Tensor, torch.Tensor] = {}

    # Hooks ESAM overrides -------------------------------------------------------
    def _draw_participants(self) -> list[torch.Tensor]:
        """Tensors that get a first-pass gradient and a perturbation (SAM: all)."""
        return self._trainable()

    def _perturbation_scale(self) -> float:
        return 1.0

    def _select(self, closure: Closure, losses_w: torch.Tensor, subset: torch.Tensor | None):
        """Indices (into the batch) for the second pass, or None for ``subset`` itself, and
        the sharpness if known (SAM: the whole subset, sharpness from the second pass)."""
        return None, None

    # The step -------------------------------------------------------------------
    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        chunks = self._chunks(closure)
        if chunks is None:  # the whole batch: one first pass, one second pass
            return self._finish([self._sharpness_pass(closure, None, grad_scaler, update_bn=True)],
                                grad_scaler)
        # m-sharpness: the second-pass gradients of the chunks are summed aside (``stash``),
        # so each chunk's first pass starts from empty .grad. Under DDP every backward but the
        # last is local and the last one all-reduces the sum, as gradient accumulation does.
        stash: list[torch.Tensor | None] | None = None
        parts: list[_Pass] = []
        for c, subset in enumerate(chunks):
            last = c == len(chunks) - 1
            part = self._sharpness_pass(closure, subset, grad_scaler, update_bn=c == 0,
                                        scale=1.0 / len(chunks), stash=stash, sync=last)
            parts.append(part)
            if part.overflow:
                break
            if not last:
                stash = [p.grad for p in self._trainable()]
                self.zero_grad()
        return self._finish(parts, grad_scaler)

    def _chunks(self, closure: Closure) -> list[torch.Tensor] | None:
        if self.m is None:
            return None
        n = getattr(closure, "batch_size", None)
        if n is None:
            raise ValueError("m-sharpness needs closure.batch_size (build the closure with "
                             "esam.optim.make_closure, or set the attribute)")
        if n % self.m:
            raise ValueError(f"m={self.m} must divide the batch of {n} samples (per process under DDP)")
        if n == self.m:
            return None  # one chunk is the whole batch: exactly the m=None step
        device = getattr(closure, "device", None)
        return list(torch.arange(n, device=device).split(self.m))

    def _sharpness_pass(self, closure: Closure, subset: torch.Tensor | None, grad_scaler, *,
                        update_bn: bool, scale: float = 1.0, stash=None, sync: bool = True):
        """First pass, perturbation and second pass on ``subset`` (None = the batch); the
        second-pass gradient (times ``scale``) is left in .grad, plus ``stash`` if given."""
        self.zero_grad()
        participants = self._draw_participants()
        participating = set(participants)
        frozen = [p for p in self._trainable() if p not in participating]
        self._phase("first_pass")
        try:
            for p in frozen:  # no weight gradient is computed for them: the saving is real
                p.requires_grad_(False)
            with self._first_pass_context(), self._bn_stats_context(update_bn):
                losses_w = closure(subset)
                self._backward(losses_w.mean(), grad_scaler)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return self._ascent_pass(closure, losses_w.detach(), participants, len(frozen), subset, grad_scaler,
                                 update_bn=update_bn, scale=scale, stash=stash, sync=sync)

    def _ascent_pass(self, closure: Closure, losses_w: torch.Tensor, participants: list[torch.Tensor],
                     n_frozen: int, subset: torch.Tensor | None, grad_scaler, *, update_bn: bool = True,
                     scale: float = 1.0, stash=None, sync: bool = True) -> "_Pass":
        """From the first-pass gradient in .grad: ascend to w+e at ``participants``, (select,) take
        the second pass there, restore w. Also the sharpness-aware half of AE-SAM's step."""
        self._phase("perturb")
        perturbed = self._perturb(participants, grad_scaler)
        if perturbed is None:  # fp16 overflow: the step is skipped
            return _Pass(losses_w, None, 0, losses_w.shape[0], 0.0, False, overflow=True)
        self.zero_grad()
        if stash is not None:  # the earlier chunks' second-pass gradients, summed
            for p, g in zip(self._trainable(), stash):
                p.grad = g
        later_bn = update_bn and self.bn_stats == "all"
        with self._bn_stats_context(later_bn):
            indices, sharpness = self._select(closure, losses_w, subset)
            if indices is None:
                indices = subset
            self._phase("second_pass")
            with contextlib.nullcontext() if sync else self._first_pass_context():
                losses_e = closure(indices)
                self._backward(losses_e.mean() * scale if scale != 1.0 else losses_e.mean(), grad_scaler)
        if sharpness is None:
            sharpness = (losses_e.detach() - losses_w).mean()
        self._phase("restore")
        self._restore(perturbed)
        return _Pass(losses_w, sharpness, losses_e.shape[0], losses_w.shape[0],
                     len(participants) / max(1, len(participants) + n_frozen),
                     self._selected_forward(losses_w.shape[0]))

    def _bn_stats_context(self, update: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if update else self._frozen_bn_stats()

    def _selected_forward(self, n: int) -> bool:
        """Whether this pass ran a selection forward (ESAM's SDS); for the cost count."""
        return False

    def _finish(self, parts: list["_Pass"], grad_scaler) -> torch.Tensor:
        """The base step on the gradient left in .grad, the step's stats and cost; returns the
        first-pass per-sample losses of the batch."""
        losses_w = parts[0].losses_w if len(parts) == 1 else torch.cat([p.losses_w for p in parts])
        if parts[-1].overflow:  # fp16: the step is skipped, as GradScaler skips an inf step
            self.zero_grad()
            self._phase("end")
            return losses_w
        self._base_step(grad_scaler)
        self._phase("end")
        n = sum(p.n for p in parts)
        sample_frac = sum(p.kept for p in parts) / n
        param_frac = sum(p.param_frac for p in parts) / len(parts)
        select_frac = sum(p.selected for p in parts) / len(parts)
        sharpness = parts[0].sharpness if len(parts) == 1 else torch.stack(
            [torch.as_tensor(p.sharpness) for p in parts]).mean()
        self.last_stats = {"sharpness": sharpness, "sample_frac": sample_frac, "param_frac": param_frac}
        # first forward 1 + first backward (input grads 1, weight grads only where drawn) +
        # selection forward (if any) + second forward/backward on the kept samples.
        self.last_cost = 1.0 + 1.0 + param_frac + select_frac + 3.0 * sample_frac
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
        grad_norm = global_norm(grads_all)
        if grad_scaler is not None and not torch.isfinite(grad_norm).item():
            grad_scaler.update(grad_scaler.get_scale() * grad_scaler.get_backoff_factor())
            return None
        for group, ps in by_group:
            scale = group["rho"] / (self._perturbation_scale() * (grad_norm + self.eps))
            es = [p.grad for p in ps]
            if group["adaptive"]:
                torch._foreach_mul_(es, torch._foreach_abs([p.detach() for p in ps]))
            for dev, idx in by_device(ps).items():
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


@dataclass
class _Pass:
    """What one pass (the batch, or one chunk of it) saw."""

    losses_w: torch.Tensor          # first-pass per-sample losses, detached
    sharpness: torch.Tensor | None  # mean loss rise under the perturbation
    kept: int                       # samples in the second pass
    n: int                          # samples in the first pass
    param_frac: float               # share of tensors perturbed
    selected: bool                  # whether a selection forward ran
    overflow: bool = False          # fp16 gradients overflowed: nothing was updated




register_method(MethodInfo(
    name="sam", cls=SAM,
    paper="Foret et al., Sharpness-Aware Minimization, ICLR 2021 (adaptive: Kwon et al., ASAM, ICML 2021)",
    cost_units=lambda **_: 6.0,
    hparams={"rho": 0.05, "adaptive": False, "m": None, "bn_stats": "first"},
    stats={"sharpness": "mean loss rise L(w+e) - L(w) over the batch",
           "sample_frac": "share of the batch in the second pass (1 for SAM)",
           "param_frac": "share of tensors perturbed (1 for SAM)"},
    description="gradient at w, ascend to w+e (e = rho g/||g||), gradient there, restore w, base step",
))
