"""SAF and MESA (Du et al., Sharpness-Aware Training for Free, NeurIPS 2022, arXiv 2205.14083).

Both are plain one-pass steps on ``CE + lam * L_traj``, where the trajectory loss
``L_traj = tau^2 * mean_i KL(softmax(t_i / tau) || softmax(z_i / tau))`` pulls the current
logits z toward target logits t from the past: SAF's t are each sample's own logits stored
``lookback`` (E~) epochs ago, MESA's t come from an EMA copy of the weights. As in the authors'
code (AngusDujw/SAF, ``F.kl_div(log softmax(z/tau), softmax(t/tau)).sum(-1).mean() * tau**2``)
the targets are constants, the KL runs from the targets to the current outputs, and it is on
only in epochs e > ``start`` (0-based e: the authors' ``epoch > kl_start_epoch``).
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from esam.optim.base import Closure, SharpnessAwareOptimizer, check_choice

MemoryDevice = Literal["cpu", "device"]  # host memory (as the authors; ImageNet) | beside the logits (CIFAR)


def trajectory_loss(logits: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample ``tau^2 * KL(softmax(targets/tau) || softmax(logits/tau))``; gradient to ``logits`` only."""
    dtype = torch.promote_types(logits.dtype, torch.float32)  # half-precision logits scored in fp32
    log_q = F.log_softmax(logits.to(dtype) / tau, dim=-1)
    log_p = F.log_softmax(targets.detach().to(dtype) / tau, dim=-1)
    # kl_div(input=log q, target=log p, log_target) = p (log p - log q), as the authors' kl_div
    # of softmax(.).log() (log_softmax is the same value without the underflow of log(softmax)).
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1) * tau ** 2


def _check_closure(closure: Closure, name: str) -> None:
    try:
        params = inspect.signature(closure).parameters
    except (TypeError, ValueError):  # a builtin: let the call itself say what is wrong
        return
    if "return_logits" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"{name} reads the logits: the closure must accept return_logits=True and then "
                         "return (losses, logits), as esam.optim.make_closure's does")


def _check_number(name: str, value: Any, *, low: float, strict: bool, integer: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    ok = ok and (value > low if strict else value >= low) and math.isfinite(value)
    if not ok:
        kind = "an int" if integer else "a number"
        raise ValueError(f"{name} must be {kind} {'>' if strict else '>='} {low:g}, got {name}={value!r}")


class _TrajectoryMethod(SharpnessAwareOptimizer):
    """What SAF and MESA share: hyper-parameters, the epoch count, the one-pass step."""

    def __init__(self, params: Iterable, base_optimizer: str | type, *, lam: float, tau: float, start: int,
                 model: nn.Module | None, seed: int | None, **base_kwargs: Any) -> None:
        _check_number("lam", lam, low=0.0, strict=False)
        _check_number("tau", tau, low=0.0, strict=True)
        _check_number("start", start, low=0, strict=False, integer=True)
        super().__init__(params, base_optimizer, model=model, seed=seed, **base_kwargs)
        self.lam, self.tau, self.start = float(lam), float(tau), int(start)

    @property
    def epoch(self) -> int:
        """The 0-based epoch of this step (the trainer's ``set_progress`` says it)."""
        return int(math.floor(getattr(self, "epochs_done", 0.0)))

    def _targets(self, closure: Closure, logits: torch.Tensor, epoch: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(target logits, per-sample 0/1 weight or None) for this batch, or None for none at all."""
        raise NotImplementedError

    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        _check_closure(closure, type(self).__name__)
        epoch = self.epoch
        self.zero_grad()
        self._phase("first_pass")
        losses, logits = closure(return_logits=True)
        loss = losses.mean()
        traj, have = self._trajectory(closure, logits, epoch)
        if traj is not None:
            loss = loss + self.lam * traj
        # Bench segments: first_pass.fwd, first_pass.bwd (SAF's memory traffic, the KL),
        # ema_forward (MESA), backward, base_update.
        self._phase("backward")
        self._backward(loss, grad_scaler)
        self._base_step(grad_scaler)
        self._after_step()
        self._phase("end")
        self.last_cost = 3.0  # one forward, one backward (MESA adds its extra forward)
        zero = losses.new_zeros(())
        self.last_stats = {"traj_loss": zero if traj is None else traj.detach(),
                           "traj_share": zero if have is None else have}
        return losses.detach()

    def _trajectory(self, closure: Closure, logits: torch.Tensor, epoch: int
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the batch's L_traj with autograd, share of the batch that had a target), or (None, None)."""
        found = self._targets(closure, logits, epoch)
        if found is None:
            return None, None
        targets, weight = found
        per_sample = trajectory_loss(logits, targets, self.tau)
        if weight is None:
            return per_sample.mean(), torch.ones((), device=logits.device)
        # Samples without a stored target add nothing; the mean stays over the whole batch,
        # which is the authors' mean whenever every sample has one.
        return (per_sample * weight).mean(), weight.mean()

    def _after_step(self) -> None:
        pass


class SAF(_TrajectoryMethod):
    """SAF: one forward/backward on ``CE + lam * L_traj`` with targets = each sample's logits from
    ``lookback`` (E~) epochs earlier (Du et al. 2022, Algorithm 1). Cost: 3 units, as SGD.

    Each step first stores the batch's detached logits in slot ``epoch % (lookback + 1)`` of a
    per-sample memory (the authors' ``train_logits[indices, epoch % (minus_epoch + 1)]``), then,
    in epochs e > ``start``, reads the logits stored in epoch e - lookback. A sample with nothing
    stored for that epoch (never seen, or skipped by drop_last) gets no trajectory term; the
    authors would read zeros or older logits there. Before ``start`` the step is plain SGD.

    Memory: N x (lookback + 1) x classes floats (fp32, or fp64 for fp64 logits) plus N x
    (lookback + 1) int64 epoch tags; N = ``num_samples`` if given, else it grows to the largest
    sample id seen. CIFAR-10 at E~ = 3: 50,000 x 4 x 10 x 4 B = 8 MB; CIFAR-100 80 MB; ImageNet
    1.28M x 4 x 1000 x 4 B = 20 GB. ``memory_device='cpu'`` (default, as the authors) keeps it in
    host memory, which ImageNet needs; each step then copies the batch's logits to the host and
    its targets back (a device sync per step). ``memory_device='device'`` keeps it beside the
    logits, with no sync, for datasets whose memory fits on the accelerator (CIFAR). The memory
    is optimizer state: a checkpoint carries it, so a resumed run equals the straight run.

    The closure must carry the batch's dataset indices as ``closure.sample_ids`` (BatchClosure's
    ``sample_ids=``, from ``loader.batches(..., with_indices=True)``); ``needs_sample_ids`` says
    so to the trainer. Under torch.distributed every rank's (ids, logits) are all-gathered before
    they are stored, so each rank's memory holds every sample whichever rank sees it next epoch.
    """

    needs_sample_ids = True

    def __init__(
        self,
        params: Iterable,
        base_optimizer: str | type | torch.optim.Optimizer = "sgd",
        *,
        lam: float = 0.3,
        tau: float = 5.0,
        start: int = 5,
        lookback: int = 3,
        num_samples: int | None = None,
        memory_device: MemoryDevice = "cpu",
        model: nn.Module | None = None,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        _check_number("lookback", lookback, low=1, strict=False, integer=True)
        if num_samples is not None:
            _check_number("num_samples", num_samples, low=1, strict=False, integer=True)
        memory_device = check_choice("memory_device", memory_device, MemoryDevice)
        super().__init__(params, base_optimizer, lam=lam, tau=tau, start=start, model=model, seed=seed,
                         **base_kwargs)
        self.lookback, self.num_samples, self.memory_device = int(lookback), num_samples, memory_device
        self.memory: torch.Tensor | None = None   # N x (lookback + 1) x classes logits
        self.written: torch.Tensor | None = None  # N x (lookback + 1): epoch each slot holds, -1 = none

    # -- the memory -------------------------------------------------------------------------------
    def _ensure_memory(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        device = torch.device("cpu") if self.memory_device == "cpu" else logits.device
        dtype = torch.promote_types(logits.dtype, torch.float32)
        slots, classes = self.lookback + 1, logits.shape[-1]
        if self.memory is None:
            n = self.num_samples if self.num_samples is not None else int(ids.max()) + 1
            self.memory = torch.zeros(n, slots, classes, dtype=dtype, device=device)
            self.written = torch.full((n, slots), -1, dtype=torch.int64, device=device)
        if self.memory.shape[1:] != (slots, classes):
            raise ValueError(f"SAF memory holds {tuple(self.memory.shape[1:])} (slots, classes) per sample, "
                             f"this batch has {classes} classes with lookback={self.lookback}")
        if self.num_samples is None:  # grow to the largest id (a host read; num_samples= avoids it)
            need = int(ids.max()) + 1
            if need > self.memory.shape[0]:
                extra = need - self.memory.shape[0]
                self.memory = torch.cat([self.memory, self.memory.new_zeros(extra, slots, classes)])
                self.written = torch.cat([self.written, self.written.new_full((extra, slots), -1)])

    def _targets(self, closure: Closure, logits: torch.Tensor, epoch: int):
        ids = getattr(closure, "sample_ids", None)
        if ids is None:
            raise ValueError("SAF needs each batch's dataset indices: build the closure with sample_ids= "
                             "(make_closure(model, x, y, sample_ids=ids), ids from "
                             "loader.batches(epoch, start, with_indices=True))")
        ids = ids.to(torch.int64)
        if ids.shape != logits.shape[:1]:
            raise ValueError(f"closure.sample_ids has shape {tuple(ids.shape)}, the batch {logits.shape[0]} rows")
        all_ids, all_logits = _all_gather(ids, logits.detach())
        self._ensure_memory(all_logits, all_ids)
        # Store first, then read another slot (the authors' order): slot epoch % (E~+1) now holds
        # this epoch's outputs, slot (epoch - E~) % (E~+1) those of E~ epochs ago.
        where = all_ids.to(self.memory.device)
        slot = epoch % (self.lookback + 1)
        self.memory[where, slot] = all_logits.to(self.memory.device, self.memory.dtype)
        self.written[where, slot] = epoch
        past = epoch - self.lookback
        if epoch <= self.start or past < 0:
            return None
        mine = ids.to(self.memory.device)
        targets = self.memory[mine, past % (self.lookback + 1)].to(logits.device, non_blocking=True)
        have = (self.written[mine, past % (self.lookback + 1)] == past).to(logits.device, non_blocking=True)
        return targets, have.to(targets.dtype)

    # -- state: the memory, so that a resumed run continues bit for bit ----------------------------
    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        if self.memory is not None:
            state["saf_memory"], state["saf_written"] = self.memory, self.written
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.memory, self.written = None, None
        if state.get("saf_memory") is not None:
            device = torch.device("cpu") if self.memory_device == "cpu" else self._trainable()[0].device
            # copies: the memory is written in place, the checkpoint must not change with it
            self.memory = state["saf_memory"].to(device, copy=True)
            self.written = state["saf_written"].to(device, copy=True)


def _all_gather(ids: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (ids, logits) under torch.distributed (equal local batches), else the inputs."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids, logits
    ids, logits = ids.to(logits.device).contiguous(), logits.contiguous()
    all_ids = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    all_logits = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    dist.all_gather(all_ids, ids)
    dist.all_gather(all_logits, logits)
    return torch.cat(all_ids), torch.cat(all_logits)


class MESA(_TrajectoryMethod):
    """MESA: SAF's trajectory loss with targets from an exponential moving average of the weights,
    ``ema <- decay * ema + (1 - decay) * w`` after every step (timm's ModelEmaV2, as the authors'),
    so no per-sample memory and no sample ids.

    In epochs e > ``start`` each step runs one extra forward, without gradients, at the EMA
    weights in eval mode (the authors' EMA module is in eval mode: BatchNorm uses the EMA's
    running statistics and changes nothing, dropout is off): cost 3 + 1 = 4 units per sample;
    before ``start`` 3 units. The EMA runs through the same closure, after the pass at w (so the
    trainer's accuracy reads w's logits), with the model's parameters and floating-point buffers
    swapped for the EMA's by reparametrisation: no tensor of the model is written, so the pass
    at w's autograd graph and the weights are untouched, exactly. Integer buffers
    (num_batches_tracked) are not averaged. The EMA starts at the weights of the first step and is
    optimizer state (a checkpoint carries it). Needs ``model=``.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: str | type | torch.optim.Optimizer = "sgd",
        *,
        lam: float = 0.8,
        tau: float = 5.0,
        start: int = 5,
        decay: float = 0.9998,
        model: nn.Module | None = None,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        _check_number("decay", decay, low=0.0, strict=False)
        if decay > 1:
            raise ValueError(f"decay must be in [0, 1], got decay={decay!r}")
        super().__init__(params, base_optimizer, lam=lam, tau=tau, start=start, model=model, seed=seed,
                         **base_kwargs)
        self.decay = float(decay)
        self.ema: dict[str, torch.Tensor] | None = None  # module state name -> EMA tensor

    def _module(self) -> nn.Module:
        if self.model is None:
            raise ValueError("MESA needs model= (the model whose weights' EMA gives the targets)")
        return getattr(self.model, "module", self.model)  # DDP's inner module

    def _live(self) -> dict[str, torch.Tensor]:
        """The model's parameters and floating-point buffers, by state name."""
        module = self._module()
        live = dict(module.named_parameters())
        live.update((n, b) for n, b in module.named_buffers() if b.is_floating_point())
        return live

    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        if self.ema is None:
            self.ema = {n: t.detach().clone() for n, t in self._live().items()}
        losses = super().step(closure, grad_scaler=grad_scaler)
        self.last_cost = 4.0 if self.epoch > self.start else 3.0
        return losses

    def _targets(self, closure: Closure, logits: torch.Tensor, epoch: int):
        if epoch <= self.start:
            return None  # the EMA still moves every step; its forward waits for the loss to need it
        self._phase("ema_forward")
        with torch.no_grad(), self._ema_weights():
            _, ema_logits = closure(return_logits=True)
        return ema_logits, None

    def evaluation_variants(self) -> dict[str, Any]:
        """Weights the engine scores beside the model's own: the EMA (the authors report its
        accuracy: timm's --model-ema validation replaces the model's); none before the first step."""
        return {} if self.ema is None else {"ema": self._ema_weights}

    @contextlib.contextmanager
    def _ema_weights(self):
        """The model in eval mode with the EMA's tensors in place of its own; both restored on exit."""
        module = self._module()
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            with torch.nn.utils.stateless._reparametrize_module(module, self.ema):
                yield
        finally:
            for m, training in modes:
                m.training = training

    @torch.no_grad()
    def _after_step(self) -> None:
        live = self._live()
        names = list(self.ema)
        ema, new = [self.ema[n] for n in names], [live[n].detach() for n in names]
        torch._foreach_lerp_(ema, new, 1.0 - self.decay)  # ema + (1 - decay) (w - ema)

    # -- state: the EMA weights, so that a resumed run continues bit for bit ----------------------
    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        if self.ema is not None:
            state["mesa_ema"] = self.ema
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.ema = None
        if state.get("mesa_ema") is not None:
            live = self._live() if self.model is not None else {}
            self.ema = {n: t.to(live[n].device if n in live else t.device, copy=True)
                        for n, t in state["mesa_ema"].items()}

