"""What a method asks of the evaluation, by name: hooks before the final evaluation and other
weights to evaluate beside the model's own.

The engine never asks which class an optimizer is; a method declares, as plain attributes:

- ``before_final_evaluation``: names in :data:`FINAL_HOOKS`, run once after the last epoch
  with the model at its evaluation weights, before the test set is scored again. MSAM declares
  ``("recalibrate_bn",)``: its BatchNorm running statistics were gathered at the perturbed
  weights w - rho v/||v||, and the authors (MarlonBecker/MSAM ``main.py``, the block after the
  training loop) run one no-grad train-mode pass over the training set at w before the final
  test. ``trainer.before_final_eval`` overrides the declaration (null = the method's, [] = none,
  [recalibrate_bn] = for any method).
- ``evaluation_variants()``: ``{name: context manager factory}``, weights scored on the test set
  after every epoch next to the model's own, logged as ``test_acc_<name>`` etc. MESA offers
  ``{"ema": ...}``: the authors report the EMA model's accuracy (timm's ``--model-ema``
  validation replaces the model's). ``trainer.evaluate_variants=false`` skips them.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from esam.errors import UserError


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], *,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   average_over_ranks: bool = False) -> int:
    """One no-grad forward per batch in train mode: BatchNorm running statistics follow the
    weights ``model`` holds now, each layer with its own momentum (PyTorch's 0.1), as in the MSAM
    authors' extra epoch; other layers' train-mode behaviour (dropout) changes no state. Under
    torch.distributed (``average_over_ranks``) every rank then holds the mean of the ranks'
    statistics, so all ranks evaluate the same model (the authors used SyncBatchNorm). Returns
    the number of batches seen; 0 and nothing changed for a model without BatchNorm."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    n = 0
    try:
        for x in batches:
            with autocast():
                model(x)
            n += 1
    finally:
        for m, training in modes:
            m.training = training
    if average_over_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        stats = [t for m in bns for t in (m.running_mean, m.running_var) if t is not None]
        flat = torch._utils._flatten_dense_tensors(stats)
        dist.all_reduce(flat)
        flat.div_(dist.get_world_size())
        for t, f in zip(stats, torch._utils._unflatten_dense_tensors(flat, stats)):
            t.copy_(f)
    return n


def _recalibrate_run_bn(run: Any, epoch: int) -> str:
    """The hook as the trainer runs it: the run's training batches (``limit_train_batches`` of
    them), augmented as in training, drawn for ``epoch`` (the epoch after the last trained one)."""
    def images():
        for i, (x, _y) in enumerate(run.data.train.batches(epoch)):
            if i >= run.steps_per_epoch:
                break
            yield x
    n = recalibrate_bn(run.model, images(), autocast=run.autocast, average_over_ranks=run.dist.world_size > 1)
    return (f"BatchNorm statistics recomputed at the evaluated weights ({n} training batches, no gradient)"
            if n else "no BatchNorm layer: nothing to recalibrate")


# name -> hook(run, epoch) -> one line saying what it did
FINAL_HOOKS: dict[str, Callable[[Any, int], str]] = {"recalibrate_bn": _recalibrate_run_bn}


def final_hooks(optimizer: Any, override: Iterable[str] | None = None) -> list[str]:
    """The hook names to run before the final evaluation: ``override`` (trainer.before_final_eval)
    if given, else what the method declares."""
    names = list(getattr(optimizer, "before_final_evaluation", ()) if override is None else override)
    for name in names:
        if name not in FINAL_HOOKS:
            raise UserError(f"trainer.before_final_eval: unknown hook {name!r}; allowed: "
                            f"{', '.join(sorted(FINAL_HOOKS))} (or null for the method's own, [] for none)")
    return names


def evaluation_variants(optimizer: Any) -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
    """Other weights the method offers for evaluation now ({} for most methods)."""
    offer = getattr(optimizer, "evaluation_variants", None)
    return dict(offer()) if callable(offer) else {}
