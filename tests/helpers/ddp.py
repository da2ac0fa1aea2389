"""The DDP harness: two gloo ranks started once per session and fed jobs, the jobs the optimizer
tests run on them, and FakeDDP for what is only about which backward runs under ``no_sync``.

Starting a rank costs an interpreter and a torch import (seconds on a busy CPU); a job costs only
its work. A job is a module-level function called as ``fn(rank, *args)`` on every rank, as
``torch.multiprocessing.spawn`` would call it; it joins (and leaves) its own process group, so a
job that fails cannot leave a half-used group behind. What it returns comes back to the test.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import multiprocessing
import os
import queue
import time
import traceback
from typing import Any, Callable

import torch
from torch import nn

from helpers.cli import free_port
from helpers.closures import CountingClosure
from helpers.models import MODELS, batches, convnet, weights

WORLD = 2
# Fixed and different per rank: a rank's result must not depend on Python's per-process hash salt.
HASH_SEEDS = ("1", "2")


def _serve(rank: int, jobs, results) -> None:
    """A rank's loop: run each job, send back its result (torch-serialised) or its traceback."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    import esam.optim  # noqa: F401  (imported while the session runs other tests, not in the first job)

    results.put(("ready", rank, None))
    while (job := jobs.get()) is not None:
        job_id, fn, args = job
        try:
            buf = io.BytesIO()
            torch.save(fn(rank, *args), buf)
            reply = ("ok", buf.getvalue())
        except BaseException:  # noqa: BLE001  (the test reports it; the rank lives on)
            reply = ("error", traceback.format_exc())
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        results.put((job_id, rank, reply))


class TwoRanks:
    """``WORLD`` long-lived processes that run jobs on every rank at once (see the module doc)."""

    def __init__(self, world: int = WORLD) -> None:
        self.world, self.procs, self._ids = world, [], itertools.count()

    def start(self) -> None:
        """Start the ranks if they are not running (returns at once; they import in the background)."""
        if self.procs:
            return
        ctx = multiprocessing.get_context("spawn")
        self.jobs, self.results = [ctx.Queue() for _ in range(self.world)], ctx.Queue()
        saved = {k: os.environ.get(k) for k in ("PYTHONHASHSEED", "OMP_NUM_THREADS")}
        try:
            for rank in range(self.world):
                os.environ.update(PYTHONHASHSEED=HASH_SEEDS[rank % len(HASH_SEEDS)], OMP_NUM_THREADS="1")
                proc = ctx.Process(target=_serve, args=(rank, self.jobs[rank], self.results), daemon=True,
                                   name=f"ddp-rank-{rank}")
                proc.start()
                self.procs.append(proc)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def spawn(self, fn: Callable[..., Any], args: tuple = (), timeout: float = 300) -> list[Any]:
        """``fn(rank, *args)`` on every rank; each rank's return value, rank 0 first. A rank that
        raises, dies or overruns ``timeout`` fails the call with its traceback and stops the ranks
        (the next call starts fresh ones), since its partner may be stuck in a collective."""
        self.start()
        job_id = next(self._ids)
        for q in self.jobs:
            q.put((job_id, fn, tuple(args)))
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(out) < self.world:
            try:
                msg = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"{fn.__qualname__} on the DDP ranks: "
                                       + (f"{', '.join(dead)} died" if dead else f"no result after {timeout:.0f} s"))
                continue
            if msg[0] == "ready" or msg[0] != job_id:
                continue
            _, rank, (status, payload) = msg
            if status == "error":
                self.close()
                raise RuntimeError(f"{fn.__qualname__} failed on rank {rank}:\n{payload}")
            out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        return [out[r] for r in range(self.world)]

    def close(self) -> None:
        for q, proc in zip(self.jobs if self.procs else [], self.procs):
            if proc.is_alive():
                with contextlib.suppress(Exception):
                    q.put(None)
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.procs = []


_RANKS = TwoRanks()


def two_ranks() -> TwoRanks:
    """The session's ranks (started on first use, or by conftest when a ``ddp`` test is collected)."""
    return _RANKS


def join_group(rank: int, world: int, port: int) -> None:
    """A job's own gloo group on localhost:``port`` (the rank process leaves it after the job)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


# -- jobs ----------------------------------------------------------------------------------------
def _weights_job(rank: int, world: int, port: int, method: str, kwargs: dict[str, Any], model: str,
                 steps: int, n: int) -> list[torch.Tensor]:
    from esam.optim import build_optimizer, make_closure

    join_group(rank, world, port)
    net = MODELS[model]()
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = build_optimizer(method, net.parameters(), model=ddp, **kwargs)
    per = n // world
    for x, y in batches(model, steps, n=n):
        opt.step(make_closure(ddp, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]))
    return weights(net)


def ddp_weights(tmp_path, method: str, kwargs: dict[str, Any], *, model: str = "mlp", steps: int = 3,
                n: int = 12, world: int = WORLD) -> list[list[torch.Tensor]]:
    """Each rank's weights after ``steps`` steps of ``method`` on its 1/world of every batch.
    (``tmp_path`` is unused: kept so the call sites read as before.)"""
    assert world == two_ranks().world, f"the session runs {two_ranks().world} ranks"
    return two_ranks().spawn(_weights_job, (world, free_port(), method, kwargs, model, steps, n))


def _decisions_job(rank: int, world: int, port: int, name: str, kwargs: dict) -> dict:
    """One rank of a DDP run on its own shard, seeded per rank as the trainer seeds ESAM's SWP:
    its sequence of sam_step decisions and its final weights."""
    from esam.optim import build_optimizer

    join_group(rank, world, port)
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
    return {"decisions": decisions, "weights": weights(model)}


def ddp_decisions(tmp_path, name: str, **kwargs) -> list[dict]:
    """Both ranks' step decisions and weights for a switching method (``tmp_path`` unused)."""
    return two_ranks().spawn(_decisions_job, (WORLD, free_port(), name, kwargs))


def train_job(rank: int, overrides: list[str], out: str) -> tuple[list[dict], int]:
    """A one-process ``esam.train`` run (no process group) into out/rank<R>: its metrics rows, and
    this process's ``hash("esam")`` (which shows whether the ranks' hash salts differ)."""
    import json
    from pathlib import Path

    from esam.train import run
    from helpers.cli import compose_cfg

    folder = Path(out) / f"rank{rank}"
    with contextlib.redirect_stdout(io.StringIO()):
        run(compose_cfg(list(overrides)), folder)
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()], hash("esam")


# -- the in-process fake -------------------------------------------------------------------------
class FakeDDP(nn.Sequential):
    """An nn.Sequential with DDP's ``no_sync``: ``syncing`` says whether a backward now would all-reduce."""

    syncing = True

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True
