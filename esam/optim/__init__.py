"""Sharpness-aware optimizers as plain PyTorch: no Hydra, no logging, no files.

All share ``opt.step(closure)`` where ``closure(indices=None)`` returns per-sample
losses (autograd on) for the whole batch or for ``indices``.
"""
from esam.optim.base import BASE_OPTIMIZERS, SGD, SharpnessAwareOptimizer, resolve_base_optimizer
from esam.optim.esam import ESAM
from esam.optim.sam import SAM

__all__ = ["SGD", "SAM", "ESAM", "SharpnessAwareOptimizer", "BASE_OPTIMIZERS", "resolve_base_optimizer"]
