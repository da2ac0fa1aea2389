"""One harness for the optimizer-level DDP tests: 2 gloo processes, each holding its half of
every batch, stepping a registered method; returns each rank's final weights."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

from conftest import free_port


def _rank(rank: int, world: int, port: int, method: str, kwargs: dict[str, Any], model: str,
          steps: int, n: int, out: str) -> None:
    from esam.optim import build_optimizer, make_closure
    from test_optim import MODELS, batches, weights

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    net = MODELS[model]()
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = build_optimizer(method, net.parameters(), model=ddp, **kwargs)
    per = n // world
    for x, y in batches(model, steps, n=n):
        opt.step(make_closure(ddp, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]))
    torch.save(weights(net), f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def ddp_weights(tmp_path, method: str, kwargs: dict[str, Any], *, model: str = "mlp", steps: int = 3,
                n: int = 12, world: int = 2) -> list[list[torch.Tensor]]:
    """Each rank's weights after ``steps`` steps of ``method`` on its 1/world of every batch."""
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_rank, args=(world, free_port(), method, kwargs, model, steps, n, out), nprocs=world, join=True)
    return [torch.load(f"{out}.{r}") for r in range(world)]
