"""SAM (Foret et al., 2021) and its adaptive variant ASAM (Kwon et al., 2021).

SAM's step is built from public blocks that every SAM-based method composes, in the spirit of
davda54/sam's ``first_step``/``second_step``:

- :meth:`SAM.chunks` the subsets that get their own perturbation (m-sharpness, ``m``);
- :meth:`SAM.first_pass` loss and gradient at w on one subset (local under DDP);
- :meth:`SAM.ascent_pass` from that gradient: perturb to w + e, the second pass there, restore w
  (:meth:`SAM.perturb`, :meth:`SAM.second_pass`, :meth:`SAM.restore` one by one);
- :meth:`SAM.finish` the base step on the gradient left in ``.grad``, and the step's stats.

BatchNorm running statistics (``bn_stats``) and the carrying of earlier chunks' gradients are
handled there, once; LookSAM, GSAM, K-SAM and the switching rules call these blocks.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch

from esam.optim.base import Closure, SharpnessAwareOptimizer, by_device, check_choice, global_norm

BNStats = Literal["first", "all"]  # "first": running stats from the first pass only; "all": every forward


def check_m(m: Any) -> int | None:
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"m must be a positive int or None (the whole batch), got m={m!r}")
    return m


class SAM(SharpnessAwareOptimizer):
    """Two passes per step: gradient at w, ascend to w+e, gradient there, restore w, base step.

    e = rho * g / ||g||; with ``adaptive=True`` e = rho * w^2 g / || |w| g ||.
    ``rho`` and ``adaptive`` live in every param group, so a scheduler can change them.

    ``m`` (m-sharpness, Foret et al. section 4.1): split the batch into B/m contiguous chunks,
    each with its own first pass, perturbation and second pass at its own w+e; the update
    uses the mean of the chunks' second-pass gradients. That is what B/m DDP ranks of
    per-rank batch m compute (the first backward stays local), on one device. ``None`` = the
    whole batch. Needs ``closure.batch_size`` (set by :func:`esam.optim.make_closure`). A batch
    m does not divide (an epoch's short last batch) is cut into ceil(B/m) near-equal chunks.
    ``bn_stats``: ``"first"`` = BatchNorm running statistics are updated by the first pass
    only (ours); ``"all"`` = by every forward, as in the authors' code. With chunks, only
    the first chunk touches them, as DDP keeps rank 0's buffers (broadcast_buffers).
    ``eps``: in rho / (||g|| + eps); davda54/sam 1e-12, the ESAM authors 1e-7.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: str | type | torch.optim.Optimizer = "sgd",
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        m: int | None = None,
        bn_stats: BNStats = "first",
        eps: float = 1e-12,
        model: torch.nn.Module | None = None,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not rho >= 0.0:
            raise ValueError(f"rho must be >= 0, got rho={rho}")
        super().__init__(params, base_optimizer, model=model, seed=seed, **base_kwargs)
        self.m, self.bn_stats = check_m(m), check_choice("bn_stats", bn_stats, BNStats)
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
    def draw_participants(self) -> list[torch.Tensor]:
        """Tensors that get a first-pass gradient and a perturbation (SAM: all)."""
        return self._trainable()

    def _perturbation_scale(self) -> float:
        return 1.0

    def _select(self, closure: Closure, losses_w: torch.Tensor, subset: torch.Tensor | None):
        """Indices (into the batch) for the second pass, or None for ``subset`` itself, and
        the sharpness if known (SAM: the whole subset, sharpness from the second pass)."""
        return None, None

    def _selected_forward(self, n: int) -> bool:
        """Whether this pass ran a selection forward (ESAM's SDS); for the cost count."""
        return False

    # The step -------------------------------------------------------------------
    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        chunks = self.chunks(closure)
        # m-sharpness: the second-pass gradients of the chunks are carried from one chunk to the
        # next, so each chunk's first pass starts from empty .grad. Under DDP every backward but
        # the last is local and the last one all-reduces the sum, as gradient accumulation does.
        carry, parts = None, []
        for c, subset in enumerate(chunks):
            last = c == len(chunks) - 1
            part = self.sharpness_pass(closure, subset, grad_scaler=grad_scaler, update_bn=c == 0,
                                       scale=1.0 / len(chunks), carry=carry, sync=last)
            parts.append(part)
            if part.overflow:
                break
            carry = None if last else self.take_grads()
        return self.finish(parts, grad_scaler)

    # The public building blocks ---------------------------------------------------
    def chunks(self, closure: Closure) -> list[torch.Tensor | None]:
        """The subsets of the batch perturbed separately: ``[None]`` (the whole batch) unless
        ``m`` splits it into B/m contiguous index tensors."""
        if self.m is None:
            return [None]
        n = getattr(closure, "batch_size", None)
        if n is None:
            raise ValueError("m-sharpness needs closure.batch_size (build the closure with "
                             "esam.optim.make_closure, or set the attribute)")
        if n <= self.m:
            return [None]  # one chunk is the whole batch: exactly the m=None step
        device = getattr(closure, "device", None)
        # A batch m does not divide (the epoch's last, short one) is cut into ceil(n/m) chunks as
        # equal as possible, as DDP ranks share a short last batch (80 = 2 x 40 at m = 64).
        return list(torch.arange(n, device=device).tensor_split(-(-n // self.m)))

    def take_grads(self) -> list[torch.Tensor | None]:
        """The trainable tensors' ``.grad`` (to carry into a later chunk's second pass), then
        empty ``.grad`` for the next first pass."""
        grads = [p.grad for p in self._trainable()]
        self.zero_grad()
        return grads

    def first_pass(self, closure: Closure, subset: torch.Tensor | None = None, *,
                   participants: list[torch.Tensor] | None = None, grad_scaler=None,
                   update_bn: bool = True, sync: bool = False) -> torch.Tensor:
        """Empty ``.grad``, then loss and gradient at w on ``subset`` (None = the batch); only the
        ``participants`` (default: all) get a weight gradient. The backward stays local under
        DDP unless ``sync`` (per-rank perturbation, as in the paper's code). BatchNorm running
        statistics follow it only if ``update_bn``. Returns the per-sample losses, detached."""
        self.zero_grad()
        frozen = []
        if participants is not None:
            taking_part = set(participants)
            frozen = [p for p in self._trainable() if p not in taking_part]
        self._phase("first_pass")
        try:
            for p in frozen:  # no weight gradient is computed for them: the saving is real
                p.requires_grad_(False)
            with contextlib.nullcontext() if sync else self._first_pass_context(), self._bn_stats_context(update_bn):
                losses_w = closure(subset)
                self._backward(losses_w.mean(), grad_scaler)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return losses_w.detach()

    def sharpness_pass(self, closure: Closure, subset: torch.Tensor | None = None, *, grad_scaler=None,
                       update_bn: bool = True, first_update_bn: bool | None = None, scale: float = 1.0,
                       carry: list | None = None, sync: bool = True) -> "Pass":
        """:meth:`first_pass` (on the tensors :meth:`draw_participants` picks) and :meth:`ascent_pass`
        on ``subset``: SAM's step on one chunk, its second-pass gradient (times ``scale``, plus
        ``carry``) left in ``.grad``. ``first_update_bn`` overrides ``update_bn`` for the first pass
        (K-SAM's selection forward already took the statistics)."""
        participants = self.draw_participants()
        losses_w = self.first_pass(closure, subset, participants=participants, grad_scaler=grad_scaler,
                                   update_bn=update_bn if first_update_bn is None else first_update_bn)
        return self.ascent_pass(closure, losses_w, subset, participants=participants, grad_scaler=grad_scaler,
                                update_bn=update_bn, scale=scale, carry=carry, sync=sync)

    def ascent_pass(self, closure: Closure, losses_w: torch.Tensor, subset: torch.Tensor | None = None, *,
                    participants: list[torch.Tensor] | None = None, grad_scaler=None, update_bn: bool = True,
                    scale: float = 1.0, carry: list | None = None, sync: bool = True) -> "Pass":
        """From the first-pass gradient in ``.grad``: ascend to w+e at the ``participants``
        (default: every tensor with a gradient), the second pass there (selected by ESAM's SDS),
        restore w. The second-pass gradient (times ``scale``, plus ``carry``) is left in ``.grad``."""
        self._phase("perturb")
        trainable = self._trainable()
        if participants is None:
            participants = [p for p in trainable if p.grad is not None]
        perturbed = self.perturb(participants, grad_scaler)
        if perturbed is None:  # fp16 overflow: the step is skipped
            return Pass(losses_w, None, 0, losses_w.shape[0], 0.0, False, overflow=True)
        part = self.second_pass(closure, losses_w, subset, grad_scaler=grad_scaler, update_bn=update_bn,
                                scale=scale, carry=carry, sync=sync)
        self._phase("restore")
        self.restore(perturbed)
        part.param_frac = len(participants) / max(1, len(trainable))
        return part

    def second_pass(self, closure: Closure, losses_w: torch.Tensor, subset: torch.Tensor | None = None, *,
                    grad_scaler=None, update_bn: bool = True, scale: float = 1.0, carry: list | None = None,
                    sync: bool = True) -> "Pass":
        """At the perturbed weights: empty ``.grad`` (then ``carry``), (ESAM: select,) forward and
        backward on ``subset`` with the loss times ``scale``. BatchNorm statistics follow it only
        if ``update_bn`` and ``bn_stats='all'``; the backward all-reduces under DDP if ``sync``."""
        self.zero_grad()
        if carry is not None:  # the earlier chunks' second-pass gradients, summed
            for p, g in zip(self._trainable(), carry):
                p.grad = g
        with self._bn_stats_context(update_bn and self.bn_stats == "all"):
            indices, sharpness = self._select(closure, losses_w, subset)
            if indices is None:
                indices = subset
            self._phase("second_pass")
            with contextlib.nullcontext() if sync else self._first_pass_context():
                losses_e = closure(indices)
                self._backward(losses_e.mean() * scale if scale != 1.0 else losses_e.mean(), grad_scaler)
        if sharpness is None:
            sharpness = (losses_e.detach() - losses_w).mean()
        return Pass(losses_w, sharpness, losses_e.shape[0], losses_w.shape[0], 1.0,
                    self._selected_forward(losses_w.shape[0]))

    def finish(self, parts: list["Pass"], grad_scaler) -> torch.Tensor:
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
        self.last_stats = {"sharpness": mean_sharpness(parts), "sample_frac": sample_frac, "param_frac": param_frac}
        # first forward 1 + first backward (input grads 1, weight grads only where drawn) +
        # selection forward (if any) + second forward/backward on the kept samples.
        self.last_cost = 1.0 + 1.0 + param_frac + select_frac + 3.0 * sample_frac
        return losses_w

    def _bn_stats_context(self, update: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if update else self._frozen_bn_stats()

    @torch.no_grad()
    def perturb(self, params: list[torch.Tensor], grad_scaler=None) -> list[torch.Tensor] | None:
        """w <- w + e at those ``params`` that have a gradient (e from it, built in ``.grad``);
        returns them, or None (and w untouched) if fp16 gradients overflowed."""
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
    def restore(self, perturbed: list[torch.Tensor]) -> None:
        """w back at exactly the tensors :meth:`perturb` returned, by copy (w + e - e != w)."""
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
class Pass:
    """What one sharpness-aware pass (the batch, or one chunk of it) saw."""

    losses_w: torch.Tensor          # first-pass per-sample losses, detached
    sharpness: torch.Tensor | None  # mean loss rise under the perturbation
    kept: int                       # samples in the second pass
    n: int                          # samples in the first pass
    param_frac: float               # share of tensors perturbed
    selected: bool                  # whether a selection forward ran
    overflow: bool = False          # fp16 gradients overflowed: nothing was updated


def mean_sharpness(parts: list[Pass]) -> torch.Tensor:
    """The step's sharpness: the one pass's, or the mean over the chunks."""
    if len(parts) == 1:
        return parts[0].sharpness
    return torch.stack([torch.as_tensor(p.sharpness) for p in parts]).mean()
