"""The measurement: methods side by side in one process, timed in rotating blocks, FLOPs counted.

What is inside the step timer: exactly one ``opt.step(closure)`` (zero_grad, every forward and
backward under autocast, perturbation, selection, restore, base update) followed by a device
sync. Batch creation is outside. Warm-up, the FLOP-counted steps and the per-phase pass (host
syncs at every phase boundary) run apart from the timed steps.
"""
from __future__ import annotations

import copy
import gc
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from esam.bench.methods import MethodSpec, method_specs
from esam.data import build_data
from esam.engine.build import configure_backends
from esam.errors import UserError
from esam.models import build_model_on, count_parameters
from esam.optim import SharpnessAwareOptimizer, build_from_spec, make_closure
from esam.runtime import autocast_context, resolve_device, resolve_precision, sync

Log = Callable[[str], None]


class Segments:
    """Cuts optimizer steps at the phase hook and at the end of each forward, summing ``read()`` per segment.

    ``read`` is a clock (with a device sync) or a FLOP counter's total. Segments are
    'setup', '<phase>.fwd' (the closure) and what follows the closure inside the phase
    ('.bwd' for the two gradient passes, '.topk' for the selection), 'perturb',
    'restore' and 'base_update'.
    """

    AFTER_FORWARD = {"first_pass": "bwd", "second_pass": "bwd", "select_forward": "topk"}

    def __init__(self, read: Callable[[], float]) -> None:
        self.read = read
        self.steps: list[dict[str, float]] = []  # per step: segment -> amount
        self.label: Optional[str] = None
        self.phase = ""
        self.mark = 0.0

    def start_step(self) -> None:
        self.steps.append(defaultdict(float))
        self.label, self.phase, self.mark = "setup", "setup", self.read()

    def _switch(self, label: Optional[str]) -> None:
        now = self.read()
        if self.label is not None:
            self.steps[-1][self.label] += now - self.mark
        self.label, self.mark = label, now

    def on_phase(self, name: str) -> None:
        self.phase = name
        if name == "end":
            self._switch(None)
        else:
            self._switch(f"{name}.fwd" if name in self.AFTER_FORWARD else name)

    def on_forward_end(self) -> None:
        if self.label is not None and self.label.endswith(".fwd"):
            self._switch(f"{self.phase}.{self.AFTER_FORWARD.get(self.phase, 'bwd')}")

    def per_step(self, reduce: Callable[[list[float]], float] = np.mean) -> dict[str, float]:
        labels = {k for step in self.steps for k in step}
        return {k: float(reduce([step.get(k, 0.0) for step in self.steps])) for k in labels}


@dataclass
class Method:
    """One row of the bench: its own model copy and optimizer, and what was measured of it."""

    spec: MethodSpec
    model: nn.Module
    opt: SharpnessAwareOptimizer
    times: list[list[float]] = field(default_factory=list)   # seconds, one list per repeat
    costs: list[float] = field(default_factory=list)         # opt.last_cost of each timed step
    foreign: list[float] = field(default_factory=list)       # other processes' CPU share, per block
    flops: dict[str, float] = field(default_factory=dict)    # per segment, mean of the counted steps
    phase_ms: dict[str, float] = field(default_factory=dict)
    step_index: int = 0
    segments: Optional[Segments] = None                       # set only while segmenting

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def units(self) -> float:
        return self.spec.expected_cost

    @property
    def mixed_steps(self) -> bool:
        """Whether the timed window mixes steps of different passes (e.g. LookSAM's cheap and full
        steps): costs at least one unit (a forward) apart. SWP's draws move it by less than one."""
        return bool(self.costs) and max(self.costs) - min(self.costs) >= 1.0 - 1e-9


class ForeignCPU:
    """Share of the machine's CPU time that other processes used since construction.

    Linux only (/proc; NaN elsewhere). On a shared machine a block of timed steps
    during which others were busy is left out of the medians: a 2-core box running
    someone's test suite makes a step 2-10x slower, which no interleaving evens out.
    """

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> Optional[tuple[int, int]]:
        try:
            cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait
        return busy - (int(own[11]) + int(own[12])), sum(cpu)  # others' busy ticks, all ticks

    def share(self) -> float:
        end = self._read()
        if self.start is None or end is None or end[1] <= self.start[1]:
            return math.nan
        return max(0.0, (end[0] - self.start[0]) / (end[1] - self.start[1]))


class Bench:
    """Holds the methods, the batches and the precision; runs the passes over all methods."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        for key in ("steps", "repeats", "num_batches", "flop_steps"):
            if cfg[key] < 1:
                raise UserError(f"{key}={cfg[key]} must be >= 1")
        for key in ("warmup_steps", "phase_steps"):
            if cfg[key] < 0:
                raise UserError(f"{key}={cfg[key]} must be >= 0")
        w = cfg.window
        if not (0 <= w.start <= w.end <= 1) or w.epochs < 1:
            raise UserError(f"window.start={w.start}, window.end={w.end} must satisfy 0 <= start <= end <= 1 "
                            f"and window.epochs={w.epochs} must be >= 1")
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        configure_backends(self.device, self.precision)  # cuDNN autotuning and TF32 exactly as the trainer sets them
        self.channels_last = bool(cfg.model.channels_last)
        specs = method_specs(cfg)  # a bad method list fails before any data or model is built

        data_kwargs = OmegaConf.to_container(cfg.dataset, resolve=True)
        data_kwargs.update(seed=cfg.seed, drop_last=True, device=self.device, channels_last=self.channels_last)
        data = build_data(data_kwargs.pop("name"), **data_kwargs)
        self.batches = []  # (images, labels, dataset indices): SAF/MESA key their memory by sample
        for batch in data.train.batches(0, with_indices=True):
            self.batches.append(batch)
            if len(self.batches) == cfg.num_batches:
                break
        if not self.batches:
            raise UserError(f"dataset.batch_size={cfg.dataset.batch_size} leaves no full batch")
        self.batch_size, self.input_shape = self.batches[0][0].shape[0], tuple(self.batches[0][0].shape[1:])

        torch.manual_seed(cfg.seed)
        template = build_model_on(cfg.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                                  device=self.device, channels_last=self.channels_last, **cfg.model.args)
        template.train()
        self.num_params = count_parameters(template)
        self.methods: list[Method] = []
        for spec in specs:
            model = copy.deepcopy(template)  # same initial weights for everyone
            # seed: the methods' own draws (ESAM's SWP) are reproducible
            opt = build_from_spec(spec.spec, model.parameters(), model=model, seed=cfg.seed)
            self.methods.append(Method(spec, model, opt))
        self.phase_foreign_cpu = math.nan
        self.grad_scaler = None
        if self.precision == "fp16":
            self.grad_scaler = {m.name: torch.amp.GradScaler(self.device.type) for m in self.methods}

    # -- one step ------------------------------------------------------------------
    def closure(self, m: Method, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> Callable:
        """The trainer's closure builder; the per-phase pass cuts its segments at each forward's end."""
        return make_closure(m.model, x, y, autocast=lambda: autocast_context(self.precision, self.device),
                            channels_last=self.channels_last, sample_ids=ids,
                            on_forward_end=m.segments.on_forward_end if m.segments is not None else None)

    def progress(self, i: int, n: int) -> float:
        """Training progress of step ``i`` of a pass of ``n`` steps: spread evenly over the window."""
        w = self.cfg.window
        return w.start + (w.end - w.start) * (i / (n - 1) if n > 1 else 0.0)

    def step(self, m: Method, progress: Optional[float] = None) -> None:
        x, y, ids = self.batches[m.step_index % len(self.batches)]
        m.step_index += 1
        epochs = float(self.cfg.window.epochs)
        p = self.cfg.window.start if progress is None else progress
        m.opt.set_progress(p * epochs, epochs)  # as the trainer does before every step
        scaler = self.grad_scaler[m.name] if self.grad_scaler else None
        m.opt.step(self.closure(m, x, y, ids), grad_scaler=scaler)

    def timed_step(self, m: Method, progress: Optional[float] = None) -> float:
        t0 = time.perf_counter()
        self.step(m, progress)
        sync(self.device)
        return time.perf_counter() - t0

    # -- the passes ----------------------------------------------------------------
    def count_flops(self, log: Log = print) -> None:
        """FLOPs per optimizer step, split into segments: the mean of ``flop_steps`` steps spread
        over the window (SWP draws and per-step decisions change the count from step to step)."""
        n = self.cfg.flop_steps
        for m in self.methods:
            t0 = time.perf_counter()
            with FlopCounterMode(display=False) as counter:
                m.segments = Segments(lambda: float(counter.get_total_flops()))
                m.opt.phase_hook = m.segments.on_phase
                try:
                    for i in range(n):
                        m.segments.start_step()
                        self.step(m, self.progress(i, n))
                        log(f"flops: {m.name} step {i + 1}/{n} ({time.perf_counter() - t0:.1f} s)")
                    m.flops = m.segments.per_step()
                    m.flops["total"] = float(counter.get_total_flops()) / n
                finally:
                    m.segments, m.opt.phase_hook = None, None

    def warm_up(self, log: Log = print) -> None:
        n = self.cfg.warmup_steps
        for i in range(n):
            t0 = time.perf_counter()
            for m in self.methods:
                self.step(m, self.progress(i, n))
            sync(self.device)
            log(f"warm-up: step {i + 1}/{n} of every method ({time.perf_counter() - t0:.1f} s)")

    def time_steps(self, log: Log = print) -> None:
        """The main timing: no hooks, a sync per step, methods in rotating blocks."""
        n, cfg = len(self.methods), self.cfg
        total = cfg.repeats * cfg.steps
        for r in range(cfg.repeats):
            order = self.methods[r % n:] + self.methods[: r % n]
            gc.collect()
            gc.disable()  # no collector pauses inside the timed steps
            try:
                for m in order:
                    load = ForeignCPU()
                    block = []
                    for s in range(cfg.steps):
                        block.append(self.timed_step(m, self.progress(r * cfg.steps + s, total)))
                        m.costs.append(float(m.opt.last_cost))
                    m.times.append(block)
                    m.foreign.append(load.share())
            finally:
                gc.enable()
            busy = [self.busy(m.foreign[-1]) for m in self.methods]
            log(f"repeat {r + 1}/{cfg.repeats}: " + "  ".join(
                f"{m.name} {1e3 * float(np.median(m.times[-1])):.0f}ms" + ("*" if b else "")
                for m, b in zip(self.methods, busy)) + ("   (*: other processes busy, left out)" if any(busy) else ""))

    def busy(self, share: float) -> bool:
        return share > self.cfg.max_foreign_cpu  # NaN (no /proc) is never busy

    def time_phases(self) -> None:
        """A separate pass with a synced clock read at every phase boundary (ms per step)."""
        n = self.cfg.phase_steps
        if n == 0:
            return

        def clock() -> float:
            sync(self.device)
            return time.perf_counter()

        for m in self.methods:
            m.segments = Segments(clock)
            m.opt.phase_hook = m.segments.on_phase
        load = ForeignCPU()
        try:
            for i in range(n):
                for m in self.methods:
                    m.segments.start_step()
                    self.step(m, self.progress(i, n))
            for m in self.methods:
                m.phase_ms = {k: 1e3 * v for k, v in m.segments.per_step(np.median).items()}
            self.phase_foreign_cpu = load.share()
        finally:
            for m in self.methods:
                m.segments, m.opt.phase_hook = None, None
