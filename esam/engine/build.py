"""Build every part of a run from its resolved config, in the order they depend on each other.

``build_run(cfg, run_dir)`` returns a :class:`Run`: the process group, device and precision,
the data, the model (and its DDP wrapper), the optimizer from the method registry, the lr
schedule and the fp16 scaler, plus the run's planned length. The trainer only drives them.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from esam.data import DataBundle, build_data
from esam.data.fake import build_fake
from esam.engine.schedule import lr_factor, planned_epochs
from esam.errors import UserError
from esam.models import build_model_on, count_parameters
from esam.optim.registry import SGD_UNITS, build_from_spec, get_method
from esam.runtime import (DistInfo, autocast_context, init_distributed, resolve_device, resolve_precision,
                          seed_everything)

def option(value: Any) -> str:
    """The string of a structured-config Enum option (or of a plain string)."""
    return str(getattr(value, "value", value))


@dataclass
class Run:
    """The parts of one training run, built once; what the trainer, checkpoints and files read."""

    cfg: DictConfig
    run_dir: Path
    dist: DistInfo
    device: torch.device
    precision: str                      # fp32 | tf32 | bf16 | fp16 (resolved from auto)
    data: DataBundle
    model: nn.Module                    # the module whose state is saved
    ddp_model: nn.Module                # what the steps call (DDP wrapper under torchrun)
    optimizer: Any                      # a SharpnessAwareOptimizer from esam.optim's registry
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    num_params: int
    steps_per_epoch: int
    epoch_units: float                  # units of one SGD epoch: 3 x samples per epoch (all ranks)
    step_units: float                   # the method's declared units per sample (SGD 3, SAM 6)
    planned_epochs: float               # trainer.epochs, or what trainer.budget buys at the method's cost
    budget: float | None                # SGD-epoch equivalents, or None

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def epochs_label(self) -> int:
        """The epoch count to print ("epoch 3/10"); a budget's last epoch may be partial."""
        return math.ceil(self.planned_epochs - 1e-9)

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context for one forward at the run's precision (shared with the bench)."""
        return autocast_context(self.precision, self.device)


def configure_backends(device: torch.device, precision: str) -> None:
    """cuDNN picks its fastest kernels (fixed input shapes); TF32 matmuls only for precision=tf32,
    so fp32 means IEEE fp32 (PyTorch's own default lets cuDNN convolutions use TF32)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def check_trainer_config(tc: DictConfig) -> None:
    """What the schema cannot say: ranges, in one sentence naming the key."""
    if tc.epochs < 1:
        raise UserError(f"trainer.epochs must be >= 1, got {tc.epochs}")
    if tc.get("budget") is not None and not tc.budget > 0:
        raise UserError(f"trainer.budget must be > 0 (SGD-epoch equivalents) or null, got {tc.budget}")
    if tc.get("max_steps", 0) < 0:
        raise UserError(f"trainer.max_steps must be >= 0 (0 = off), got {tc.max_steps}")
    if tc.get("check_every", 1) < 1:
        raise UserError(f"trainer.check_every must be >= 1 (steps), got {tc.check_every}")
    milestones = list(tc.get("milestones", []))
    if not all(0 < m <= 1 for m in milestones) or milestones != sorted(milestones):
        raise UserError(f"trainer.milestones must be increasing shares of the run in (0, 1], got {milestones}")
    if not tc.get("step_gamma", 1.0) > 0:
        raise UserError(f"trainer.step_gamma must be > 0 (the lr factor per milestone), got {tc.step_gamma}")


def agree_on_run_dir(run_dir: Path, info: DistInfo) -> Path:
    """Under torchrun every rank composes its own Hydra folder; rank 0's is the run's."""
    if info.world_size > 1:
        box = [str(run_dir)]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    return run_dir


def make_writable(run_dir: Path, info: DistInfo) -> None:
    if not info.is_main:
        return
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output folder {run_dir} is not writable ({e.strerror})") from None


def build_run_optimizer(cfg: DictConfig, model: nn.Module, ddp_model: nn.Module, rank: int):
    """The run's method from the registry (esam.optim.build_from_spec), on this rank's seed."""
    # SWP draws differ per rank (as in the authors' code) but are fixed by the run's seed.
    # Ints only: hash() of a str is salted per process (PYTHONHASHSEED), which made ESAM
    # runs with the same seed differ from one process to the next.
    swp_seed = hash((int(cfg.seed), rank, 0x5E5)) & 0x7FFF_FFFF
    return build_from_spec(OmegaConf.to_container(cfg.optimizer, resolve=True),
                           model.parameters(), model=ddp_model, seed=swp_seed)


def relative_cost(cfg: DictConfig) -> float:
    """The method's declared cost per step relative to SGD's, at this config's hyper-parameters."""
    spec = OmegaConf.to_container(cfg.optimizer, resolve=True)
    return get_method(cfg.optimizer.name).relative_cost(**spec)


def build_run(cfg: DictConfig, run_dir: str | Path) -> Run:
    """Every part of the run ``cfg`` describes, training in ``run_dir``."""
    tc = cfg.trainer
    check_trainer_config(tc)
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    info = init_distributed("cuda" if tc.device.startswith("cuda") or
                            (tc.device == "auto" and torch.cuda.is_available()) else "cpu")
    device = resolve_device(tc.device, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(option(tc.precision), device)
    configure_backends(device, precision)
    run_dir = agree_on_run_dir(Path(run_dir), info)
    make_writable(run_dir, info)
    seed_everything(cfg.seed)

    ds = OmegaConf.to_container(cfg.dataset, resolve=True)
    build = build_fake if ds.get("fake", 0) > 0 else build_data
    data = build(ds.pop("name"), **ds, seed=cfg.seed, device=device, channels_last=cfg.model.channels_last,
                      rank=info.rank, world_size=info.world_size)
    torch.manual_seed(cfg.seed)  # same initial weights whatever the data builder drew
    model = build_model_on(cfg.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                           device=device, channels_last=cfg.model.channels_last,
                           **OmegaConf.to_container(cfg.model.args, resolve=True))
    num_params = count_parameters(model)
    ddp_model: nn.Module = model
    if info.world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_run_optimizer(cfg, model, ddp_model, info.rank)

    limit = tc.limit_train_batches
    steps_per_epoch = min(len(data.train), limit) if limit > 0 else len(data.train)
    # The unit of compute_used: what SGD spends on one epoch as this run draws it (the whole set,
    # or limit_train_batches batches of it), so that budget=E gives SGD exactly E epochs.
    epoch_samples = min(data.num_train, steps_per_epoch * cfg.dataset.batch_size)
    budget = tc.get("budget")
    cost = relative_cost(cfg)
    epochs = planned_epochs(tc.epochs, budget, cost)
    factor = functools.partial(lr_factor, steps_per_epoch=steps_per_epoch, epochs=epochs,
                               warmup_epochs=tc.warmup_epochs, kind=option(tc.scheduler),
                               per=option(tc.schedule_per), milestones=tuple(tc.get("milestones", (0.3, 0.6))),
                               step_gamma=float(tc.get("step_gamma", 0.2)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.base_optimizer, lambda step: factor(step))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return Run(cfg=cfg, run_dir=run_dir, dist=info, device=device, precision=precision, data=data, model=model,
               ddp_model=ddp_model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, num_params=num_params,
               steps_per_epoch=steps_per_epoch, epoch_units=SGD_UNITS * epoch_samples,
               step_units=SGD_UNITS * cost,                planned_epochs=epochs, budget=budget)
