"""Several `python -m esam.train` runs in one torchrun launch, for tests/test_ddp.py.

    torchrun --nproc_per_node=2 tests/_ddp_entry.py OUT '{"case": ["override", ...], ...}'

Each case is the CLI's own entry point (``esam.train.main``, Hydra and all) called in turn in the
same two processes, so the interpreter, torch import and gloo rendezvous are paid once, not once
per case. A case writes into OUT/<case>/: Hydra's run folder per rank (``rank${oc.env:RANK}``, as a
user would compose it), and per rank what the CLI printed (``rank<R>.out``, ``rank<R>.err``) and
how it ended (``rank<R>.exit``: 0, the CLI's exit code, or ``exception`` with the traceback in
.err). Cases that fail on every rank at the same step (a non-finite loss) leave the process
group usable; put one that may not last.

It also registers a BatchNorm-free model, ``ddp_test_mlp``: without BatchNorm a rank's forward
does not depend on the other rank's half of the batch, so DDP's averaged gradient is the
single-process gradient and SGD must agree to rounding.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

from torch import nn

from esam.models import MODELS, register_model


def register() -> None:
    if "ddp_test_mlp" in MODELS:
        return

    @register_model("ddp_test_mlp", input_size=(1, 8, 8))
    def ddp_test_mlp(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, 64), nn.ReLU(), nn.Linear(64, num_classes))


def run_case(out: Path, name: str, overrides: list[str]) -> None:
    """``python -m esam.train <overrides>`` on this rank, its output and exit code into out/name/."""
    from esam.train import main

    folder, rank = out / name, os.environ["RANK"]
    folder.mkdir(parents=True, exist_ok=True)
    sys.argv = ["esam.train", *overrides, f"hydra.run.dir={folder}/rank${{oc.env:RANK}}"]
    code: int | str = 0
    with open(folder / f"rank{rank}.out", "w") as o, open(folder / f"rank{rank}.err", "w") as e, \
            contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:  # noqa: BLE001  (reported to the test, which fails on it)
            traceback.print_exc()
            code = "exception"
    (folder / f"rank{rank}.exit").write_text(str(code))


if __name__ == "__main__":
    register()
    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    for name, overrides in cases.items():
        run_case(out, name, overrides)
