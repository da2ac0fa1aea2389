"""When to take the sharpness-aware step: late-phase SAM, RST and AE-SAM, built once.

Each step runs either the inner sharpness-aware step (SAM, or ESAM with ``inner="esam"``) or
a plain step of the base optimizer (one forward, one backward), and a rule decides which:

- ``LateSAM`` (Zhou et al., ICLR 2025): plain steps until ``start`` (a share of training),
  sharpness-aware steps after.
- ``RST`` (Zhao et al., 2022; first titled SS-SAM): a Bernoulli(p_t) draw each step, p_t
  constant or scheduled over training.
- ``AESAM`` (Jiang et al., ICLR 2023): the sharpness-aware step only when ||g||^2 is large
  against its running mean and deviation; it decides after the first pass and reuses it.

Each rule *holds* its inner step (``opt.inner``, a :class:`SAM` or :class:`ESAM` on the rule's own
base optimizer) and calls it; ``m``, ``bn_stats`` and the other inner keys are the inner's, so
every rule perturbs the way SAM/ESAM does.

The rules read training progress from ``opt.progress`` (the trainer calls ``set_progress``
before every step). Every step logs ``sam_step`` (1 on sharpness-aware steps, else 0), so the
trainer's per-epoch mean is the share of sharpness-aware steps, and ``sharpness`` (0 on plain
steps: divide its epoch mean by ``sam_step``'s for the mean over sharpness-aware steps).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Literal

import torch
import torch.distributed as dist

from esam.optim.base import Closure, SharpnessAwareOptimizer, check_choice, global_norm
from esam.optim.esam import ESAM, Selection, esam_cost
from esam.optim.sam import SAM, BNStats, mean_sharpness

Inner = Literal["sam", "esam"]                    # the sharpness-aware step: SAM's, or ESAM's (beta, gamma)
Schedule = Literal["constant", "linear", "cosine"]  # RST's p_t over training


def _finite(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {key}={value!r}")
    return float(value)


class _SwitchingRule(SharpnessAwareOptimizer):
    """The inner sharpness-aware step (``self.inner``) or a plain base step, as :meth:`_sam_now`
    decides. ``inner="sam"`` holds a :class:`SAM` (``beta``, ``gamma`` and ``selection`` then take
    no part); ``inner="esam"`` an :class:`ESAM` (beta, gamma). Both step this rule's base optimizer."""

    def _hold_inner(self, inner: str, *, rho: float, adaptive: bool, beta: float, gamma: float, m: int | None,
                    bn_stats: str, selection: str, eps: float, seed: int | None) -> None:
        inner = check_choice("inner", inner, Inner)
        for name, value in (("beta", beta), ("gamma", gamma)):  # checked even when unused
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {name}={value}")
        sam_keys = dict(rho=rho, adaptive=adaptive, m=m, bn_stats=bn_stats, eps=eps, model=self.model, seed=seed)
        groups = self.base_optimizer.param_groups
        self.inner = (SAM(groups, self.base_optimizer, **sam_keys) if inner == "sam" else
                      ESAM(groups, self.base_optimizer, beta=beta, gamma=gamma, selection=check_choice(
                          "selection", selection, Selection), **sam_keys))

    def _sam_now(self) -> bool:  # pragma: no cover - abstract
        """Whether this step is sharpness-aware (decided before any pass)."""
        raise NotImplementedError

    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        if self._sam_now():
            self.inner.phase_hook, self.inner.last_stats = self.phase_hook, {}
            losses = self.inner.step(closure, grad_scaler=grad_scaler)
            stats = self.inner.last_stats
            self._record(sam=True, sharpness=stats.get("sharpness", 0.0),
                         cost=self.inner.last_cost if stats else 3.0)  # no stats: fp16 overflow
            return losses
        losses = self._plain_step(closure, grad_scaler)
        self._record(sam=False, sharpness=0.0, cost=3.0)
        return losses

    def _record(self, *, sam: bool, sharpness, cost: float) -> None:
        self.last_stats = {"sam_step": 1.0 if sam else 0.0, "sharpness": sharpness}
        self.last_cost = float(cost)

    # -- state: the rule's own plus the inner's (ESAM's SWP generator) --------------------------
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "inner": self.inner.extra_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        # Checkpoints from before the rules held their inner step kept its generator at the top.
        self.inner.load_extra_state(state.get("inner", state))


def _inner_cost(inner: str, beta: float, gamma: float, **_: Any) -> float:
    """Units of one sharpness-aware step of the inner method."""
    return 6.0 if check_choice("inner", inner, Inner) == "sam" else esam_cost(beta, gamma)


SWITCH_STATS = {
    "sam_step": "1 on sharpness-aware steps, 0 on plain ones: the epoch mean is their share",
    "sharpness": "loss rise L(w+e) - L(w) on sharpness-aware steps, 0 on plain ones",
}


# -- late-phase SAM ------------------------------------------------------------------------
class LateSAM(_SwitchingRule):
    """Plain steps while ``opt.progress < start``, then the inner sharpness-aware step.

    Zhou et al. (ICLR 2025) switch SGD -> SAM at epoch 175 of 200 (Figure 1): start = 0.875.
    Without ``set_progress`` the progress stays 0, so every step is plain unless start = 0.
    ``inner``, ``rho``, ``adaptive``, ``m``, ``bn_stats``, ``eps`` (and with inner=esam ``beta``,
    ``gamma``, ``selection``) are the inner step's, as in :class:`SAM` and :class:`ESAM`.
    """

    def __init__(self, params: Iterable, base_optimizer: str | type | torch.optim.Optimizer = "sgd", *,
                 start: float = 0.875, inner: Inner = "sam", rho: float = 0.05, adaptive: bool = False,
                 beta: float = 0.6, gamma: float = 0.5, m: int | None = None, bn_stats: BNStats = "first",
                 selection: Selection = "topk", eps: float = 1e-12,
                 model: torch.nn.Module | None = None, seed: int | None = None, **base_kwargs: Any) -> None:
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0.0 <= start <= 1.0:
            raise ValueError(f"start must be a share of training in [0, 1], got start={start!r}")
        super().__init__(params, base_optimizer, model=model, seed=seed, **base_kwargs)
        self._hold_inner(inner, rho=rho, adaptive=adaptive, beta=beta, gamma=gamma, m=m, bn_stats=bn_stats,
                         selection=selection, eps=eps, seed=seed)
        self.start = float(start)

    def _sam_now(self) -> bool:
        return self.progress >= self.start


def latesam_cost(start: float, inner: str, beta: float, gamma: float, **_: Any) -> float:
    return 3.0 + (1.0 - start) * (_inner_cost(inner, beta, gamma) - 3.0)


# -- RST -----------------------------------------------------------------------------------
def _shared_seed(seed: int, params: list[torch.Tensor]) -> int:
    """Rank 0's seed on every rank: the trainer seeds each rank differently (ESAM's SWP draws
    differ per rank), but RST's draw must agree, or the ranks would run different passes."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return seed
    t = torch.tensor([seed], dtype=torch.int64, device=params[0].device)  # NCCL: on the GPU
    dist.broadcast(t, src=0)
    return int(t.item())


class RST(_SwitchingRule):
    """Each step a Bernoulli(p_t) draw picks the inner sharpness-aware step (else a plain one).

    ``schedule="constant"``: p_t = p. ``"linear"``: p_t = p + (p_end - p) t, ``"cosine"``:
    p_t = p_end + (p - p_end)(1 + cos(pi t)) / 2, with t = ``opt.progress`` in [0, 1].
    The draws come from their own generator, seeded by ``seed`` (rank 0's under DDP) and saved
    in the state, so a resumed run draws what the straight run drew. The inner step's keys as in
    :class:`LateSAM`.
    """

    def __init__(self, params: Iterable, base_optimizer: str | type | torch.optim.Optimizer = "sgd", *,
                 schedule: Schedule = "constant", p: float = 0.5, p_end: float | None = None,
                 inner: Inner = "sam", rho: float = 0.05, adaptive: bool = False,
                 beta: float = 0.6, gamma: float = 0.5, m: int | None = None, bn_stats: BNStats = "first",
                 selection: Selection = "topk", eps: float = 1e-12,
                 model: torch.nn.Module | None = None, seed: int | None = None, **base_kwargs: Any) -> None:
        schedule = check_choice("schedule", schedule, Schedule)
        for key, value in (("p", p), ("p_end", p_end)):
            if key == "p_end" and value is None:
                continue
            if not 0.0 <= _finite(key, value) <= 1.0:
                raise ValueError(f"{key} must be a probability in [0, 1], got {key}={value}")
        if schedule == "constant" and p_end is not None:
            raise ValueError(f"p_end is for schedule=linear|cosine; with schedule=constant set p_end=null "
                             f"(got p_end={p_end})")
        if schedule != "constant" and p_end is None:
            raise ValueError(f"schedule={schedule} needs p_end, the probability at the end of training")
        super().__init__(params, base_optimizer, model=model, seed=seed, **base_kwargs)
        self._hold_inner(inner, rho=rho, adaptive=adaptive, beta=beta, gamma=gamma, m=m, bn_stats=bn_stats,
                         selection=selection, eps=eps, seed=seed)
        self.schedule, self.p = schedule, float(p)
        self.p_end = self.p if p_end is None else float(p_end)
        base_seed = torch.initial_seed() if seed is None else int(seed)
        tensors = [t for g in self.param_groups for t in g["params"]]
        self.rule_generator = torch.Generator()
        self.rule_generator.manual_seed(_shared_seed(base_seed, tensors) ^ 0x5257)  # not the SWP stream

    def probability(self, progress: float | None = None) -> float:
        t = self.progress if progress is None else progress
        if self.schedule == "linear":
            return self.p + (self.p_end - self.p) * t
        if self.schedule == "cosine":
            return self.p_end + (self.p - self.p_end) * (1.0 + math.cos(math.pi * t)) / 2.0
        return self.p

    def _sam_now(self) -> bool:
        # A host draw: deciding never waits on the device.
        return float(torch.rand((), generator=self.rule_generator)) < self.probability()

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "rule_generator": self.rule_generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if "rule_generator" in state:
            self.rule_generator.set_state(state["rule_generator"])


def rst_cost(schedule: str, p: float, p_end: float | None, inner: str, beta: float, gamma: float,
             **_: Any) -> float:
    # Linear and cosine schedules both average (p + p_end) / 2 over training.
    mean_p = p if p_end is None or check_choice("schedule", schedule, Schedule) == "constant" else (p + p_end) / 2
    return 3.0 + mean_p * (_inner_cost(inner, beta, gamma) - 3.0)


# -- AE-SAM --------------------------------------------------------------------------------
class AESAM(_SwitchingRule):
    """The sharpness-aware step only where ||g_t||^2 >= mu_t + c_t sigma_t (Jiang et al., 2023).

    After the first pass at w (a full, synced gradient g_t, the one an SGD step needs):
        mu_t      = delta mu_{t-1}      + (1 - delta) ||g_t||^2
        sigma_t^2 = delta sigma_{t-1}^2 + (1 - delta) (||g_t||^2 - mu_t)^2
        c_t       = t lambda1 + (1 - t) lambda2,   t = opt.progress in [0, 1]
    (mu_{-1} = sigma_{-1} = 0). If the test holds, g_t is the first pass of the inner step
    (perturb, second pass, base step); otherwise the base optimizer steps on g_t: one forward
    and one backward. With lambda1 < lambda2 the threshold falls during training, so the
    sharpness-aware steps grow more frequent late.

    Under DDP the first backward all-reduces (unlike SAM's local one): the plain step needs
    the global gradient and every rank must take the same branch. Deciding reads ||g||^2 on
    the host (one device sync per step).

    ``m`` (m-sharpness), as B/m DDP ranks of AE-SAM would run it: the first pass (the decision
    and the plain step) is the whole batch's and the perturbation e = rho g/||g|| is the batch
    gradient's (under DDP it is all-reduced, so every rank perturbs alike); the second pass runs
    chunk by chunk at w + e, each chunk with its own batch statistics and (inner=esam) its own SDS
    selection, and the update is the mean of the chunks' gradients. ``bn_stats`` as in SAM.
    The inner step's keys as in :class:`LateSAM`.
    """

    def __init__(self, params: Iterable, base_optimizer: str | type | torch.optim.Optimizer = "sgd", *,
                 delta: float = 0.9, lambda1: float = -1.0, lambda2: float = 1.0,
                 inner: Inner = "sam", rho: float = 0.05, adaptive: bool = False,
                 beta: float = 0.6, gamma: float = 0.5, m: int | None = None, bn_stats: BNStats = "first",
                 selection: Selection = "topk", eps: float = 1e-12,
                 model: torch.nn.Module | None = None, seed: int | None = None, **base_kwargs: Any) -> None:
        if not 0.0 < _finite("delta", delta) < 1.0:
            raise ValueError(f"delta must be in (0, 1), got delta={delta}")
        lambda1, lambda2 = _finite("lambda1", lambda1), _finite("lambda2", lambda2)
        super().__init__(params, base_optimizer, model=model, seed=seed, **base_kwargs)
        self._hold_inner(inner, rho=rho, adaptive=adaptive, beta=beta, gamma=gamma, m=m, bn_stats=bn_stats,
                         selection=selection, eps=eps, seed=seed)
        self.delta, self.lambda1, self.lambda2 = float(delta), lambda1, lambda2
        self.mu, self.var = 0.0, 0.0  # EMAs of ||g||^2 and of its squared deviation

    def threshold_c(self, progress: float | None = None) -> float:
        t = self.progress if progress is None else progress
        return t * self.lambda1 + (1.0 - t) * self.lambda2

    @torch.no_grad()
    def _grad_sq_norm(self, grad_scaler) -> float:
        grads = [p.grad for p in self._trainable() if p.grad is not None]
        if not grads:
            return 0.0
        norm = float(global_norm(grads))
        if grad_scaler is not None:
            norm /= grad_scaler.get_scale()
        return norm * norm

    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        inner = self.inner
        inner.phase_hook = self.phase_hook
        losses_w = inner.first_pass(closure, grad_scaler=grad_scaler, sync=True)  # the global g

        sq = self._grad_sq_norm(grad_scaler)
        take = False
        if math.isfinite(sq):  # fp16 overflow: a plain step, which GradScaler then skips
            d = self.delta
            self.mu = d * self.mu + (1.0 - d) * sq
            self.var = d * self.var + (1.0 - d) * (sq - self.mu) ** 2
            take = sq >= self.mu + self.threshold_c() * math.sqrt(self.var)
        if not take:
            self._base_step(grad_scaler)
            self._phase("end")
            self._record(sam=False, sharpness=0.0, cost=3.0)
            return losses_w

        # The inner step, its first pass being the one above (all tensors got a gradient).
        participants = inner.draw_participants()  # ESAM's SWP: which tensors are perturbed
        parts = self._ascent(closure, losses_w, participants, grad_scaler)
        if parts is None:  # fp16 overflow: skipped, as GradScaler skips an inf step
            self.zero_grad()
            self._phase("end")
            self._record(sam=True, sharpness=0.0, cost=3.0)
            return losses_w
        self._base_step(grad_scaler)
        self._phase("end")
        kept, selected = sum(q.kept for q in parts), sum(q.selected for q in parts) / len(parts)
        # full first pass 3 + selection forward (if any) + second forward/backward on the kept samples
        self._record(sam=True, sharpness=mean_sharpness(parts),
                     cost=3.0 + float(selected) + 3.0 * kept / losses_w.shape[0])
        return losses_w

    def _ascent(self, closure: Closure, losses_w: torch.Tensor, participants: list[torch.Tensor],
                grad_scaler) -> list | None:
        """Perturb along the batch's g, the second pass (chunk by chunk under ``m``), restore."""
        inner = self.inner
        chunks = inner.chunks(closure)
        if len(chunks) == 1:
            part = inner.ascent_pass(closure, losses_w, participants=participants, grad_scaler=grad_scaler)
            return None if part.overflow else [part]
        self._phase("perturb")
        perturbed = inner.perturb(participants, grad_scaler)
        if perturbed is None:
            return None
        carry, parts = None, []
        for c, subset in enumerate(chunks):
            last = c == len(chunks) - 1
            parts.append(inner.second_pass(closure, losses_w.index_select(0, subset), subset,
                                           grad_scaler=grad_scaler, update_bn=c == 0, scale=1.0 / len(chunks),
                                           carry=carry, sync=last))
            carry = None if last else inner.take_grads()
        self._phase("restore")
        inner.restore(perturbed)
        return parts

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "aesam": {"mu": self.mu, "var": self.var}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if "aesam" in state:
            self.mu, self.var = float(state["aesam"]["mu"]), float(state["aesam"]["var"])


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def aesam_share(lambda1: float, lambda2: float) -> float:
    """Expected share of sharpness-aware steps under the paper's own model (||g||^2 normal with
    mean mu and deviation sigma): P(Z >= c) = Phi(-c), averaged over c_t's linear path."""
    if lambda1 == lambda2:
        return _normal_cdf(-lambda1)
    lo, hi = sorted((lambda1, lambda2))

    def integral_phi(x: float) -> float:  # antiderivative of Phi: x Phi(x) + phi(x)
        return x * _normal_cdf(x) + math.exp(-x * x / 2.0) / math.sqrt(2.0 * math.pi)

    # mean over c in [lo, hi] of Phi(-c) = mean over u in [-hi, -lo] of Phi(u)
    return (integral_phi(-lo) - integral_phi(-hi)) / (hi - lo)


def aesam_cost(lambda1: float, lambda2: float, inner: str, beta: float, gamma: float, **_: Any) -> float:
    """A plain step 3; a sharpness-aware one reuses the first pass (3) and adds the selection
    forward (ESAM with gamma < 1) and the second pass 3 * gamma. The share is the normal model's
    (0.5 at the paper's lambda1 = -1, lambda2 = 1): an expectation, not a bound."""
    extra = 3.0 if check_choice("inner", inner, Inner) == "sam" else float(gamma < 1.0) + 3.0 * gamma
    return 3.0 + aesam_share(lambda1, lambda2) * extra

