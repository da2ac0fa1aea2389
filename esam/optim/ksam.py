"""K-SAM (Ni et al., 2022): both SAM passes on only the k samples of the batch with the
highest loss, found by one forward of the whole batch without gradients."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from esam.optim.base import Closure
from esam.optim.sam import SAM, BNStats, mean_sharpness


class KSAM(SAM):
    """A no-grad forward of the batch gives the per-sample losses L_i(w); the k samples with the
    largest L_i(w) get SAM's two passes (g_k at w, e = rho g_k/||g_k||, g at w + e on the same
    k samples) and the base optimizer steps on that g.

    k = ``k`` if ``k > 0``, else max(1, int(k_frac * B)) for a batch of B (per process under DDP).
    Cost per sample of the batch: 1 (the no-grad forward of B) + 3 k/B (forward and backward of
    the first pass on k) + 3 k/B (the second pass) = 1 + 6 k/B units; SGD is 3, so k/B < 1/3 is
    cheaper than SGD in FLOPs. At k >= B it is SAM plus that one forward.

    BatchNorm: the whole-batch forward updates the running statistics (once per step, as SGD's
    forward); both passes on the k samples use their own batch statistics and leave them alone
    (``bn_stats='all'``: they update them too, as every forward does in the authors' SAM code).
    The returned losses (and a BatchClosure's ``first_logits``) are the whole batch's at w.

    ``m`` (m-sharpness), as B/m DDP ranks of per-rank batch m would run K-SAM: each chunk of m
    samples has its own no-grad forward, its own top k = k_frac * m (or min(k, m)) and its own
    SAM passes and perturbation on those; the update is the mean of the chunks' second-pass
    gradients. Only the first chunk's forwards touch the BatchNorm statistics (rank 0's buffers).
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: str | type | torch.optim.Optimizer = "sgd",
        *,
        rho: float = 0.05,
        k_frac: float = 0.36,
        k: int = 0,
        adaptive: bool = False,
        m: int | None = None,
        bn_stats: BNStats = "first",
        eps: float = 1e-12,
        model: torch.nn.Module | None = None,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not 0.0 < k_frac <= 1.0:
            raise ValueError(f"k_frac must be in (0, 1], got k_frac={k_frac}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0 (0 = use k_frac), got k={k!r}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, m=m, bn_stats=bn_stats, eps=eps,
                         model=model, seed=seed, **base_kwargs)
        self.k_frac, self.k = float(k_frac), k

    def _k(self, n: int) -> int:
        return min(n, self.k) if self.k > 0 else max(1, int(self.k_frac * n))

    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        self.zero_grad()
        chunks = self.chunks(closure)
        n = len(chunks)
        carry, parts, losses = None, [], []
        for c, subset in enumerate(chunks):
            last = c == n - 1
            self._phase("select_forward")
            with torch.no_grad(), self._bn_stats_context(c == 0):
                losses_all = closure(subset)
                size = losses_all.shape[0]
                k = self._k(size)
                # Half-precision losses are ranked in fp32; float64 ones keep their precision.
                ranked = losses_all.to(torch.promote_types(losses_all.dtype, torch.float32))
                top = None if k >= size else torch.topk(ranked, k, sorted=False).indices
            losses.append(losses_all)
            indices = top if subset is None else (subset if top is None else subset[top])
            # SAM's two passes on the k samples; BN statistics were updated by the forward above.
            part = self.sharpness_pass(closure, indices, grad_scaler=grad_scaler, update_bn=c == 0,
                                       first_update_bn=c == 0 and self.bn_stats == "all",
                                       scale=1.0 / n, carry=carry, sync=last)
            parts.append(part)
            if part.overflow:  # fp16 overflow: the step is skipped
                self.zero_grad()
                self._phase("end")
                return torch.cat(losses)
            carry = None if last else self.take_grads()
        self._base_step(grad_scaler)
        self._phase("end")
        batch = sum(q.shape[0] for q in losses)
        kept = sum(q.kept for q in parts)
        self.last_stats = {"sharpness": mean_sharpness(parts), "sample_frac": kept / batch}
        self.last_cost = 1.0 + 6.0 * kept / batch
        return losses[0] if n == 1 else torch.cat(losses)
