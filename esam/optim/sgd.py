"""The base optimizer alone, behind the same ``step(closure)`` as every method: the baseline."""
from __future__ import annotations

from esam.optim.base import Closure, SharpnessAwareOptimizer
import torch


class BaseOnly(SharpnessAwareOptimizer):
    """The base optimizer alone (no sharpness-aware step): one forward and one backward.
    ``BaseOnly(params, 'sgd', momentum=0.9)`` is the paper's SGD baseline; ``BaseOnly(params,
    'adamw')`` is plain AdamW. No knobs of its own: every keyword goes to the base optimizer."""

    def step(self, closure: Closure, *, grad_scaler=None) -> torch.Tensor:
        losses = self._plain_step(closure, grad_scaler)
        self.last_stats = {}
        self.last_cost = 3.0
        return losses


SGD = BaseOnly  # the name the paper's tables use for the baseline (registry key "sgd")
