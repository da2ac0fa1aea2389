"""ESAM (Du et al., ICLR 2022): SAM with Stochastic Weight Perturbation and
Sharpness-Sensitive Data Selection. Each switch works alone for ablations;
beta=1 and gamma=1 give exactly SAM's update."""
from __future__ import annotations

from typing import Any, Iterable, Literal

import torch

from esam.optim.base import Closure, check_choice
from esam.optim.sam import SAM, BNStats

Selection = Literal["topk", "authors"]  # exactly int(gamma n) samples | the authors' strict rule


class ESAM(SAM):
    """SAM whose first pass covers a random subset of tensors and whose second pass a subset of samples.

    beta  (SWP): each trainable tensor takes part in the first pass and the
          perturbation with probability beta; the others get no gradient computed
          there and are not perturbed; e is scaled by 1/beta. The second pass
          gives every tensor its update gradient (as in the authors' code).
    gamma (SDS): the second pass uses the samples whose loss rises most under the
          perturbation, found by one extra no-grad forward; with ``m`` the ranking and the
          k = int(gamma * m) are per chunk, as per rank in the authors' code.
    selection: ``"topk"`` keeps exactly k = int(gamma * n) samples; ``"authors"`` keeps those
          whose rise is strictly above the k-th largest (k - 1 without ties) and all of
          them at gamma >= 0.99, as dydjw9/Efficient_SAM utils/Esam.py does.
    seed: seeds the generator of the SWP draws, so runs are reproducible.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: str | type | torch.optim.Optimizer = "sgd",
        *,
        rho: float = 0.05,
        beta: float = 0.6,
        gamma: float = 0.5,
        adaptive: bool = False,
        m: int | None = None,
        bn_stats: BNStats = "first",
        selection: Selection = "topk",
        eps: float = 1e-12,
        model: torch.nn.Module | None = None,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        for name, value in (("beta", beta), ("gamma", gamma)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {name}={value}")
        selection = check_choice("selection", selection, Selection)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, m=m, bn_stats=bn_stats,
                         eps=eps, model=model, seed=seed, **base_kwargs)
        self.beta, self.gamma, self.selection = float(beta), float(gamma), selection

    def draw_participants(self) -> list[torch.Tensor]:
        trainable = self._trainable()
        if self.beta >= 1.0:
            return trainable
        take = torch.rand(len(trainable), generator=self.generator) < self.beta
        if not bool(take.any()):  # an empty draw would leave nothing to differentiate
            take[torch.randint(len(trainable), (1,), generator=self.generator)] = True
        return [p for p, t in zip(trainable, take.tolist()) if t]

    def _perturbation_scale(self) -> float:
        return self.beta

    def _selected_forward(self, n: int) -> bool:
        if self.selection == "authors":
            return self.gamma < 0.99
        return max(1, int(self.gamma * n)) < n

    @torch.no_grad()
    def _select(self, closure: Closure, losses_w: torch.Tensor, subset: torch.Tensor | None):
        n = losses_w.shape[0]
        if not self._selected_forward(n):
            return None, None  # no selection forward at all: exactly SAM's cost
        k = max(1, int(self.gamma * n))
        self._phase("select_forward")
        # Half-precision losses are compared in fp32; float64 ones keep their precision.
        dtype = torch.promote_types(losses_w.dtype, torch.float32)
        # inference_mode: only the ranking is needed, and it skips autograd's bookkeeping
        # (a few % of this forward on CPU); the results are cloned back into normal tensors.
        with torch.inference_mode():
            rise = closure(subset).to(dtype) - losses_w.to(dtype)
            if self.selection == "topk":
                chosen = torch.topk(rise, k, sorted=False).indices
            else:
                chosen = (rise > torch.topk(rise, k).values[-1]).nonzero().flatten()
                if chosen.numel() == 0:  # k = 1 (or ties): keep the sharpest rather than none
                    chosen = rise.argmax().reshape(1)
            indices = chosen if subset is None else subset[chosen]
            sharpness = rise.mean()
        return indices.clone(), sharpness.clone()


def esam_cost(beta: float, gamma: float, selection: str = "topk", **_: Any) -> float:
    """first forward 1; first backward 1 + beta (SWP skips the other tensors' weight grads);
    the no-grad selection forward 1 (none at gamma = 1); second forward/backward 3 * gamma."""
    selects = gamma < (0.99 if selection == "authors" else 1.0)
    return 1 + (1 + beta) + (1 if selects else 0) + 3 * gamma

