"""A tiny in-process train through the shared Trainer, checkpoints through a file, GradScaler cancelling out."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

from helpers.cli import FAST, compose_cfg
from helpers.closures import CountingClosure
from helpers.models import weights
from helpers.reference import assert_all_close


def save_load(model, opt, *, inside_evaluation: bool = True) -> dict:
    """Model and optimizer state through a file, as the trainer saves them (inside evaluation_weights)."""
    buf = io.BytesIO()
    if inside_evaluation:
        with opt.evaluation_weights():
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    else:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def train_digits(name: str, out: Path, *overrides: str) -> list[dict]:
    """What ``python -m esam.train dataset=digits optimizer=<name>`` does for 5 batches, in this
    process (no interpreter start-up per test); the metrics rows."""
    from esam.engine import Trainer

    threads = torch.get_num_threads()
    cfg = compose_cfg(["dataset=digits", f"optimizer={name}", "trainer.epochs=1", "trainer.limit_train_batches=5",
                       "trainer.num_threads=1", *FAST, *overrides])
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            Trainer(cfg, out).fit()
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert (out / "summary.json").is_file()
    return rows


def scaled_equals_unscaled(make_opt, model_fn, data, progress_total: int | None = None) -> None:
    """torch.amp.GradScaler on CPU: a power-of-two scale must cancel out of every step."""
    model, plain = model_fn(), model_fn()
    opt, ref = make_opt(model), make_opt(plain)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for t, (x, y) in enumerate(data):
        for o in (opt, ref):
            o.set_progress(t, progress_total or len(data))
        opt.step(CountingClosure(model, x, y), grad_scaler=scaler)
        ref.step(CountingClosure(plain, x, y))
        assert opt.last_stats.get("sam_step") == ref.last_stats.get("sam_step")  # the same kind of step
    assert scaler.get_scale() == 2.0**12
    assert_all_close(weights(model), weights(plain))
