"""Sharpness-aware optimizers as plain PyTorch: no Hydra, no logging, no files.

All share ``opt.step(closure)`` where ``closure(indices=None)`` returns per-sample
losses (autograd on) for the whole batch or for ``indices``. :data:`METHODS` lists them
(name, class, cost in forward/backward units, logged stats), registered in one place:
``esam.optim.registry._register_default_methods``.
"""
from esam.optim.base import BASE_OPTIMIZERS, SharpnessAwareOptimizer, resolve_base_optimizer
from esam.optim.closure import BatchClosure, make_closure
from esam.optim.esam import ESAM
from esam.optim.gsam import GSAM
from esam.optim.ksam import KSAM
from esam.optim.looksam import LookSAM
from esam.optim.msam import MSAM
from esam.optim.registry import (METHODS, MethodInfo, build_from_spec, build_optimizer, get_method,
                                 method_hparams, optimizer_kwargs, register_method)
from esam.optim.saf import MESA, SAF
from esam.optim.sam import SAM
from esam.optim.sgd import SGD, BaseOnly
from esam.optim.switching import AESAM, RST, LateSAM

__all__ = ["make_closure", "BatchClosure", "SGD", "BaseOnly", "SAM", "ESAM", "LookSAM", "GSAM", "KSAM",
           "LateSAM", "RST", "AESAM", "MSAM", "SAF", "MESA", "SharpnessAwareOptimizer", "BASE_OPTIMIZERS",
           "resolve_base_optimizer", "METHODS", "MethodInfo", "build_optimizer", "build_from_spec",
           "optimizer_kwargs", "get_method", "method_hparams", "register_method"]
