"""ESAM in your own training loop, top to bottom: the file to read first.

    python examples/minimal_esam.py            # digits (bundled with scikit-learn), CPU, under a minute

Everything the trainer (esam/engine) adds on top of this loop is bookkeeping: timing, compute
counting, checkpoints, logging. The method is the optimizer: ``opt.step(closure)`` runs every
forward and backward ESAM needs (SAM's two passes, with SWP and SDS) through one closure.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from esam.data import build_data
from esam.models import build_model
from esam.optim import ESAM, make_closure

EPOCHS = 10
BATCH = 64            # samples per step
LR = 0.05             # SGD with momentum 0.9, weight decay 1e-3 on every parameter
RHO = 0.05            # SAM's radius: w + rho g / ||g|| is where the second gradient is taken
BETA, GAMMA = 0.6, 0.5  # SWP: share of weight tensors perturbed; SDS: share of samples in the 2nd pass


def evaluate(model: torch.nn.Module, loader) -> float:
    """Test accuracy in % (eval mode: BatchNorm's running statistics)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader.batches(0):
            correct += (model(x).argmax(1) == y).sum().item()
            total += y.shape[0]
    return 100.0 * correct / total


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    # 1. Data: 8x8 digits as uint8 tensors on the device, normalised and shuffled per epoch.
    data = build_data("digits", batch_size=BATCH, test_batch_size=512, seed=0)
    # 2. Model: a small CIFAR-style ResNet for 1 x 8 x 8 inputs.
    model = build_model("resnet_digits", num_classes=data.num_classes, in_channels=data.in_channels)
    # 3. ESAM wraps a base optimizer (here torch.optim.SGD) and shares its param groups, so an
    #    LR scheduler stepping `opt` changes what SGD uses. `model=` lets it keep BatchNorm's
    #    running statistics to the first pass (and skip DDP's all-reduce in the first backward).
    opt = ESAM(model.parameters(), "sgd", rho=RHO, beta=BETA, gamma=GAMMA,
               lr=LR, momentum=0.9, weight_decay=1e-3, model=model, seed=0)
    steps = EPOCHS * len(data.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))  # cosine
    for epoch in range(EPOCHS):
        model.train()
        loss_sum = n = 0.0
        for x, y in data.train.batches(epoch):
            # 4. The closure: per-sample losses of the model on the batch (or on rows of it: SDS
            #    asks for the sharpest gamma share). ESAM calls it for each pass it needs.
            closure = make_closure(model, x, y)
            losses = opt.step(closure)           # first-pass per-sample losses, detached
            sched.step()
            loss_sum += losses.sum().item()
            n += y.shape[0]
        stats = {k: float(v) for k, v in opt.last_stats.items()}   # what the last step saw
        print(f"epoch {epoch + 1:2d}  train loss {loss_sum / n:.4f}  test acc {evaluate(model, data.test):5.2f}%  "
              f"sharpness {stats['sharpness']:+.4f}  samples in 2nd pass {stats['sample_frac']:.2f}  "
              f"cost {opt.last_cost / 3:.2f}x SGD")
    # 5. Cross-entropy of the final model, to compare with plain SGD: swap ESAM for
    #    esam.optim.SGD(model.parameters(), "sgd", lr=LR, momentum=0.9, weight_decay=1e-3).
    model.eval()
    with torch.no_grad():
        x, y = next(data.test.batches(0))
        print(f"final test loss {F.cross_entropy(model(x), y).item():.4f}")


if __name__ == "__main__":
    main()
