"""The one test closure: per-sample CE losses that record what each call saw and count passes."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class CountingClosure:
    """Per-sample CE losses (``closure(indices=None)``, the protocol esam.optim steps call).

    Counts forwards with autograd, forwards without, and backward passes (a hook on the losses
    fires once per backward through them); ``calls`` records, per call, the indices, whether
    autograd was on, which parameters required grad and the weights the forward ran at. Pass
    your own lists as ``calls``/``backwards`` to collect over several closures."""

    def __init__(self, model, x, y, calls: list | None = None, backwards: list | None = None):
        self.model, self.x, self.y = model, x, y
        self.batch_size, self.device = int(y.shape[0]), y.device
        self.calls = [] if calls is None else calls
        self._backwards = [] if backwards is None else backwards
        self.grad_forwards = self.nograd_forwards = self.backwards = 0

    def _count_backward(self, grad):
        self.backwards += 1
        self._backwards.append(1)
        return grad

    def __call__(self, indices=None):
        self.calls.append({
            "indices": None if indices is None else indices.clone(),
            "grad_enabled": torch.is_grad_enabled(),
            "requires_grad": [p.requires_grad for p in self.model.parameters()],
            "weights": [p.detach().clone() for p in self.model.parameters()],
        })
        x, y = (self.x, self.y) if indices is None else (self.x[indices], self.y[indices])
        losses = F.cross_entropy(self.model(x), y, reduction="none")
        if losses.requires_grad:
            self.grad_forwards += 1
            losses.register_hook(self._count_backward)
        else:
            self.nograd_forwards += 1
        return losses

    @property
    def seen(self) -> list[list[torch.Tensor]]:
        """The weights each call's forward ran at."""
        return [c["weights"] for c in self.calls]

    @property
    def passes(self) -> tuple[int, int]:
        """(forwards with autograd, backward passes)."""
        return self.grad_forwards, self.backwards


def make_closure(model, x, y, calls: list | None = None) -> CountingClosure:
    """Per-sample CE losses; ``calls`` records what each call saw (for the assertions)."""
    return CountingClosure(model, x, y, calls=calls)


def counting_closure(model, x, y, calls: list, backwards: list) -> CountingClosure:
    """make_closure's closure that also appends 1 to ``backwards`` per backward pass."""
    return CountingClosure(model, x, y, calls=calls, backwards=backwards)
