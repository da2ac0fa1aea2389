"""How long a run is and how its learning rate moves: pure functions of the step.

``lr_factor`` multiplies the base lr after ``step`` optimizer steps. ``planned_epochs`` is the
run's length: ``trainer.epochs``, or under a compute budget the epochs that budget buys at the
method's expected cost (SAM at budget 2 plans 1 epoch), so warm-up and cosine span the run's
own length.
"""
from __future__ import annotations

import math


def cosine_factor(progress: float) -> float:
    """1 at progress 0, 0 at progress 1 (clamped outside [0, 1])."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def lr_factor(step: int, *, steps_per_epoch: int, epochs: float, warmup_epochs: float = 0,
              kind: str = "cosine", per: str = "epoch") -> float:
    """Linear warm-up over ``warmup_epochs``, then cosine to 0 at ``epochs`` (or constant).

    With ``per="epoch"`` (the authors' recipe) the factor is constant within an epoch;
    ``epochs`` may be fractional (a run sized by a compute budget)."""
    t = step / steps_per_epoch  # epochs done, fractional
    if per == "epoch":
        t = math.floor(t)
    if t < warmup_epochs:
        return (t + 1.0 / (steps_per_epoch if per == "step" else 1)) / warmup_epochs
    if kind == "constant":
        return 1.0
    span = epochs - warmup_epochs
    # An integer run with warm-up >= epochs keeps a span of 1 (as before); a budget may give < 1.
    return cosine_factor((t - warmup_epochs) / (span if span > 0 else 1))


def planned_epochs(epochs: int, budget: float | None, relative_cost: float) -> float:
    """The run's length in epochs: ``epochs``, or ``budget`` SGD-epochs at ``relative_cost`` x SGD.

    Under a budget the run stops on the compute it measured, which may differ a little from the
    method's declared cost (ESAM's random selection); the plan only sizes the lr schedule and
    what ``set_progress`` reports, so it has to be known before the first step."""
    if budget is None:
        return float(epochs)
    return budget / relative_cost
