"""Helpers shared by tests/test_methods_{latesam,rst,aesam,msam}.py (not collected: no test_ prefix)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from conftest import FAST, free_port


class CountingClosure:
    """Per-sample CE losses; counts forwards with autograd, forwards without, and backward passes
    (a hook on the losses fires once per backward through them) and records the weights seen."""

    def __init__(self, model, x, y):
        self.model, self.x, self.y = model, x, y
        self.batch_size, self.device = int(y.shape[0]), y.device
        self.grad_forwards = self.nograd_forwards = self.backwards = 0
        self.seen: list[list[torch.Tensor]] = []

    def _count_backward(self, grad):
        self.backwards += 1
        return grad

    def __call__(self, indices=None):
        self.seen.append([p.detach().clone() for p in self.model.parameters()])
        x, y = (self.x, self.y) if indices is None else (self.x[indices], self.y[indices])
        losses = F.cross_entropy(self.model(x), y, reduction="none")
        if losses.requires_grad:
            self.grad_forwards += 1
            losses.register_hook(self._count_backward)
        else:
            self.nograd_forwards += 1
        return losses

    @property
    def passes(self) -> tuple[int, int]:
        """(forwards with autograd, backward passes)."""
        return self.grad_forwards, self.backwards


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
    import contextlib

    from conftest import compose_cfg
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


# -- two gloo DDP ranks: do they take the same kind of step? --------------------------------------


def ddp_rank_decisions(rank: int, world: int, port: int, name: str, kwargs: dict, out: str) -> None:
    """One rank of a DDP run on its own shard, seeded per rank as the trainer seeds ESAM's SWP;
    saves its sequence of sam_step decisions and its final weights."""
    import os

    from torch import nn

    from esam.optim import build_optimizer
    from test_optim import batches, convnet, weights

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = convnet()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(name, model.parameters(), model=ddp, seed=1000 + rank, **kwargs)
    decisions = []
    data = batches("convnet", 8, n=8)
    for t, (x, y) in enumerate(data):
        per = x.shape[0] // world
        opt.set_progress(t, len(data))
        opt.step(CountingClosure(ddp, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]))
        decisions.append(opt.last_stats["sam_step"])
    torch.save({"decisions": decisions, "weights": weights(model)}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def ddp_decisions(tmp_path: Path, name: str, **kwargs) -> list[dict]:
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp")
    mp.spawn(ddp_rank_decisions, args=(2, free_port(), name, kwargs, out), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]


def scaled_equals_unscaled(make_opt, model_fn, data, progress_total: int | None = None) -> None:
    """torch.amp.GradScaler on CPU: a power-of-two scale must cancel out of every step."""
    from test_optim import assert_all_close, weights

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
