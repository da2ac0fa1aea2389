"""The one closure builder the trainer, the bench and anyone's own loop share.

``closure(indices=None)`` runs the model on the batch (or on ``indices`` of it) under the
given autocast and returns per-sample losses with autograd on. It carries what the
methods need to know about its batch: ``batch_size`` (m-sharpness chunks it), ``device``,
``first_logits``, the detached logits of each row's first forward (the pass at w; with
m-sharpness each chunk's own first pass fills its rows), from which
the trainer measures train accuracy without another forward, and ``sample_ids``, the
dataset indices of the batch rows when the loader gave them (SAF's per-sample memory
needs them; ``None`` otherwise). ``closure(return_logits=True)`` returns
``(losses, logits)``, the logits with autograd on, for methods whose loss reads the outputs
(SAF, MESA).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class BatchClosure:
    """Per-sample cross-entropy of ``model`` on ``(x, y)`` or on rows ``indices`` of it."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 label_smoothing: float = 0.0, channels_last: bool = False,
                 on_forward_end: Callable[[], None] | None = None,
                 sample_ids: torch.Tensor | None = None) -> None:
        self.model, self.x, self.y = model, x, y
        self.sample_ids = sample_ids  # dataset index of each row of x (loader.batches(..., with_indices=True))
        self.autocast, self.label_smoothing = autocast, label_smoothing
        self.channels_last = channels_last
        self.on_forward_end = on_forward_end  # the bench's per-phase timer cuts here
        self.batch_size, self.device = int(y.shape[0]), y.device
        self.first_logits: torch.Tensor | None = None
        self._filled: torch.Tensor | None = None  # rows of first_logits written, while not all are

    def _record_first_logits(self, indices: torch.Tensor | None, logits: torch.Tensor) -> None:
        """Each row's logits from the first call that saw it: the pass at w, also when m-sharpness
        runs the batch chunk by chunk (no host sync: a where, not a mask read)."""
        if self.first_logits is None and indices is None:
            self.first_logits = logits  # the usual case: the first call is the whole batch
            return
        if self.first_logits is None:
            self.first_logits = logits.new_zeros((self.batch_size, *logits.shape[1:]))
            self._filled = torch.zeros(self.batch_size, dtype=torch.bool, device=logits.device)
        if self._filled is None:  # every row already has its first logits
            return
        if indices is None:
            indices = torch.arange(self.batch_size, device=logits.device)
        seen = self._filled.index_select(0, indices).reshape(-1, *([1] * (logits.dim() - 1)))
        current = self.first_logits.index_select(0, indices)
        self.first_logits.index_copy_(0, indices, torch.where(seen, current, logits.to(current.dtype)))
        self._filled.index_fill_(0, indices, True)

    def __call__(self, indices: torch.Tensor | None = None, *,
                 return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        xb, yb = self.x, self.y
        if indices is not None:
            xb, yb = xb.index_select(0, indices), yb.index_select(0, indices)
            if self.channels_last and xb.dim() == 4:  # index_select returns a contiguous copy
                xb = xb.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            logits = self.model(xb)
        self._record_first_logits(indices, logits.detach())
        # Half-precision logits are scored in fp32; fp32/fp64 ones keep their precision.
        losses = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), yb, reduction="none",
                                 label_smoothing=self.label_smoothing)
        if self.on_forward_end is not None:
            self.on_forward_end()
        return (losses, logits) if return_logits else losses


def make_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> BatchClosure:
    """``opt.step(make_closure(model, x, y))`` in any training loop; kwargs as :class:`BatchClosure`."""
    return BatchClosure(model, x, y, **kwargs)
