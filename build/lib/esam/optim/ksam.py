"""K-SAM (Ni et al., 2022): both SAM passes on only the k samples of the batch with the
highest loss, found by one forward of the whole batch without gradients."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from esam.optim.base import Closure
from esam.optim.registry import MethodInfo, register_method
from esam.optim.sam import SAM


class KSAM(SAM):
    """A no-grad forward of the batch gives the per-sample losses L_i(w); the k samples with the
    largest L_i(w) get SAM's two passes (g_k at w, e = rho g_k/||g_k||, g at w + e on the same
    k samples) and the base optimizer steps on that g.

    k = ``k`` if ``k > 0``, else max(1, int(k_frac * B)) for a batch of B (per process under DDP).
    Cost per sample of the batch: 1 (the no-grad forward of B) + 3 k/B (forward and backward of
    the first pass on k) + 3 k/B (the second pass) = 1 + 6 k/B units; SGD is 3, so k/B < 1/3 is
    cheaper than SGD in FLOPs. At k >= B it is SAM plus that one forward.

    BatchNorm: the whole-batch forward updates the running statistics (once per step, as SGD's
    forward); both passes on the k samples use their own batch statistics and leave them alone.
    The returned losses (and a BatchClosure's ``first_logits``) are the whole batch's at w.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: str | type = "sgd",
        *,
        rho: float = 0.05,
        k_frac: float = 0.1,
        k: int = 0,
        adaptive: bool = False,
        eps: float = 1e-12,
        model: torch.nn.Module | None = None,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not 0.0 < k_frac <= 1.0:
            raise ValueError(f"k_frac must be in (0, 1], got k_frac={k_frac}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0 (0 = use k_frac), got k={k!r}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eps=eps,
                         model=model, seed=seed, **base_kwargs)
        self.k_frac, self.k = float(k_frac), k

    def _k(self, n: int) -> int:
        return min(n, self.k) if self.k > 0 else max(1, int(self.k_frac * n))

    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        self.zero_grad()
        self._phase("select_forward")
        with torch.no_grad():
            losses_all = closure()
            n = losses_all.shape[0]
            k = self._k(n)
            # Half-precision losses are ranked in fp32; float64 ones keep their precision.
            ranked = losses_all.to(torch.promote_types(losses_all.dtype, torch.float32))
            indices = None if k >= n else torch.topk(ranked, k, sorted=False).indices

        # SAM's two passes on the k samples; BN statistics were updated by the forward above.
        part = self._sharpness_pass(closure, indices, grad_scaler, update_bn=False)
        if part.overflow:  # fp16 overflow: the step is skipped
            self.zero_grad()
            self._phase("end")
            return losses_all
        self._base_step(grad_scaler)
        self._phase("end")
        self.last_stats = {"sharpness": part.sharpness, "sample_frac": k / n}
        self.last_cost = 1.0 + 6.0 * k / n
        return losses_all


register_method(MethodInfo(
    name="ksam", cls=KSAM,
    paper="Ni et al., K-SAM: Sharpness-Aware Minimization at the Speed of SGD, 2022 (arXiv 2210.12864)",
    # from k_frac; with a fixed count k > 0 it depends on the batch (opt.last_cost is exact)
    cost_units=lambda k_frac, **_: 1.0 + 6.0 * k_frac,
    hparams={"rho": 0.05, "k_frac": 0.1, "k": 0, "adaptive": False},
    stats={"sharpness": "mean loss rise L(w+e) - L(w) over the k selected samples",
           "sample_frac": "share of the batch in the two SAM passes (k/B)"},
    description="a no-grad forward ranks the batch by loss; SAM's two passes on the k highest-loss samples",
))
