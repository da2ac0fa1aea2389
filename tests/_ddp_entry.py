"""`python -m esam.train` plus a BatchNorm-free model, for the DDP test (run by torchrun).

Without BatchNorm a rank's forward does not depend on the other rank's half of the
batch, so DDP's averaged gradient is the single-process gradient and SGD must agree
to rounding. The model is registered under ``ddp_test_mlp`` (use model.name=ddp_test_mlp).
"""
from __future__ import annotations

from torch import nn

from esam.models import MODELS, register_model


def register() -> None:
    if "ddp_test_mlp" in MODELS:
        return

    @register_model("ddp_test_mlp", input_size=(1, 8, 8))
    def ddp_test_mlp(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, 64), nn.ReLU(), nn.Linear(64, num_classes))


if __name__ == "__main__":
    register()
    from esam.train import main

    main()
