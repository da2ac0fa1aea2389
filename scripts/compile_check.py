"""Does ``torch.compile`` of the model help each method? Eager vs compiled, side by side.

    python scripts/compile_check.py                         # resnet_digits, batch 64, CPU
    python scripts/compile_check.py --model resnet18 --shape 3 32 32 --batch 128 --device cuda

Per method: median ms per optimizer step (eager and compiled, steps after the first few),
Dynamo's graph count, and whether the recompile limit was hit. ESAM's SWP flips
``requires_grad`` on random tensors every step and SAM/ESAM toggle BatchNorm's
``track_running_stats`` between passes; Dynamo guards on both, so each new pattern is a new
graph until the recompile limit sends the model back to eager.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from esam.models import build_model
from esam.optim import build_optimizer, make_closure
from esam.runtime import resolve_device, sync


def time_method(name: str, compiled: bool, args, **hparams) -> tuple[float, int]:
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10, in_channels=args.shape[0]).to(device)
    net = torch.compile(model) if compiled else model
    opt = build_optimizer(name, model.parameters(), model=model, lr=0.05, momentum=0.9, seed=0, **hparams)
    x = torch.randn(args.batch, *args.shape, device=device)
    y = torch.randint(10, (args.batch,), device=device)
    dynamo.reset()
    counters.clear()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        opt.step(make_closure(net, x, y))
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[args.skip:]), int(counters["stats"].get("unique_graphs", 0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet_digits")
    p.add_argument("--shape", type=int, nargs=3, default=[1, 8, 8])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--skip", type=int, default=6, help="first steps left out (compilation)")
    args = p.parse_args()
    print("| method | eager ms/step | compiled ms/step | compiled / eager | graphs |")
    print("|---|---:|---:|---:|---:|")
    for name, hp in (("sgd", {}), ("sam", {}), ("esam", {"beta": 0.6, "gamma": 0.5})):
        eager, _ = time_method(name, False, args, **hp)
        comp, graphs = time_method(name, True, args, **hp)
        print(f"| {name} | {eager:.1f} | {comp:.1f} | {comp / eager:.2f} | {graphs} |", flush=True)


if __name__ == "__main__":
    main()
