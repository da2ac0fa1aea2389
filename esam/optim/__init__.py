"""Sharpness-aware optimizers as plain PyTorch: no Hydra, no logging, no files.

All share ``opt.step(closure)`` where ``closure(indices=None)`` returns per-sample
losses (autograd on) for the whole batch or for ``indices``. Every method registers
itself in :data:`METHODS` (name, class, cost in forward/backward units, logged stats).
"""
from esam.optim.base import BASE_OPTIMIZERS, SGD, BaseOnly, SharpnessAwareOptimizer, resolve_base_optimizer
from esam.optim.closure import BatchClosure, make_closure
from esam.optim.esam import ESAM
from esam.optim.registry import (METHODS, MethodInfo, build_from_spec, build_optimizer, get_method,
                                  optimizer_kwargs, register_method)
from esam.optim.sam import SAM
from esam.optim.msam import MSAM  # noqa: F401  (registers msam)
from esam.optim.switching import AESAM, RST, LateSAM  # noqa: F401  (latesam, rst, aesam)
from esam.optim.gsam import GSAM  # noqa: F401  (registers gsam)
from esam.optim.ksam import KSAM  # noqa: F401
from esam.optim.looksam import LookSAM  # noqa: F401
from esam.optim.saf import MESA, SAF  # noqa: F401  (registers saf and mesa)

__all__ = ["make_closure", "BatchClosure", "SGD", "BaseOnly", "SAM", "ESAM", "SharpnessAwareOptimizer", "BASE_OPTIMIZERS",
           "resolve_base_optimizer", "METHODS", "MethodInfo", "build_optimizer", "build_from_spec",
           "optimizer_kwargs", "get_method",
           "register_method"]
