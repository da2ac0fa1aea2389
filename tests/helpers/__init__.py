"""What the tests share (a package, so no test module imports another): tiny models and batches,
the float64 reference, the one counting closure, the DDP harness, in-process trains and the CLI.

``from helpers import mlp, Reference, ...`` reads the names from the modules below."""
from helpers.cli import FAST, REPO, compose_cfg, free_port, run_cli, run_cli_in_process
from helpers.closures import CountingClosure, counting_closure, make_closure
from helpers.ddp import FakeDDP, ddp_decisions, ddp_weights, two_ranks
from helpers.models import MODELS, batch, batches, convnet, mlp, two_groups, weights
from helpers.reference import (LR, MOMENTUM, RHO, TIGHT, WD, Reference, assert_all_close, assert_all_equal,
                               global_norm, loss_and_grad, sam_perturbation)
from helpers.training import save_load, scaled_equals_unscaled, train_digits

__all__ = [
    "FAST", "REPO", "compose_cfg", "free_port", "run_cli", "run_cli_in_process",
    "CountingClosure", "counting_closure", "make_closure",
    "FakeDDP", "ddp_decisions", "ddp_weights", "two_ranks",
    "MODELS", "batch", "batches", "convnet", "mlp", "two_groups", "weights",
    "LR", "MOMENTUM", "RHO", "TIGHT", "WD", "Reference", "assert_all_close", "assert_all_equal",
    "global_norm", "loss_and_grad", "sam_perturbation",
    "save_load", "scaled_equals_unscaled", "train_digits",
]
