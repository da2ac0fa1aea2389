"""Side-by-side overhead benchmark: SGD, SAM and ESAM variants in one process, interleaved.

    python -m esam.bench                       # resnet18, 128 x 3x32x32, bf16 + channels_last, 5 methods
    python -m esam.bench precision=fp32 repeats=14
    python -m esam.bench mode=grid grid.betas=[0.4,0.6,0.8,1.0] grid.gammas=[0.3,0.5,0.7,1.0] steps=1 repeats=10

Every method gets its own copy of the same initial model and its own optimizer, and
all see the same batches (made once, kept on the device). Methods take turns in
blocks of ``steps`` steps, ``repeats`` times (the order rotates each repeat), so
drift of the machine (clock, temperature, other load) hits all of them alike.

What is inside the step timer: exactly one ``opt.step(closure)`` (zero_grad, every
forward and backward under autocast, perturbation, selection, restore, base
update) followed by a device sync. Batch creation is outside. ``warmup_steps`` per
method run before any timing; the steps whose FLOPs are counted (FlopCounterMode:
convolutions and matmuls only) and the per-phase pass (host syncs at every phase
boundary) run apart from the timed steps. On Linux, blocks during which other
processes used more than ``max_foreign_cpu`` of the machine are left out of the
medians (``blocks_used`` says how many stayed).

Cost model (forward = 1 unit, backward = 2 units: 1 for input grads + 1 for weight grads):

    SGD  = 1 + 2                                   = 3
    SAM  = 2 * (1 + 2)                             = 6
    ESAM = 1 + (1 + beta) + [gamma < 1] + 3 * gamma
           first forward; first backward with weight grads only for the beta-drawn
           tensors (SWP); one no-grad forward of the whole batch to select samples
           (SDS, skipped at gamma = 1); second forward + backward on gamma * B samples

    extra % = (units / 3 - 1) * 100: SAM +100; ESAM(0.6, 0.5) = 5.1 units, +70;
    SWP only (0.6, 1) = 5.6, +86.7; SDS only (1, 0.5) = 5.5, +83.3; +40 needs beta + 3 gamma = 1.2.
"""
from __future__ import annotations

import copy
import gc
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from esam.config import DatasetConfig, LoggerConfig, ModelConfig, Precision
from esam.data import build_data
from esam.errors import UserError
from esam.models import build_model
from esam.optim import ESAM, SAM, SGD, SharpnessAwareOptimizer
from esam.runtime import resolve_device, resolve_precision


# -- config schema ---------------------------------------------------------------
class Mode(str, Enum):
    methods = "methods"  # the methods listed in ``methods``, side by side
    grid = "grid"        # ESAM over grid.betas x grid.gammas, next to ``baseline``


@dataclass
class GridConfig:
    betas: List[float] = field(default_factory=lambda: [0.4, 0.6, 0.8, 1.0])
    gammas: List[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 1.0])
    method: str = "esam"   # the method_defs entry whose beta and gamma the grid replaces


@dataclass
class BenchConfig:
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    logger: LoggerConfig = MISSING
    mode: Mode = Mode.methods
    seed: int = 0
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.bf16
    num_threads: int = 0                  # CPU threads for torch; 0 = torch's default
    methods: List[str] = field(default_factory=list)
    baseline: str = "sgd"
    method_defs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    optimizer: Dict[str, Any] = field(default_factory=dict)  # kwargs every method gets
    steps: int = 2                        # timed steps per method per block
    repeats: int = 32                     # blocks per method
    warmup_steps: int = 3
    phase_steps: int = 3                  # steps of the per-phase pass (0 = skip it)
    flop_steps: int = 8                   # steps averaged for FLOPs when SWP draws vary (beta < 1)
    num_batches: int = 4                  # distinct batches, cycled
    max_foreign_cpu: float = 0.1          # leave out blocks where other processes used more CPU
    grid: GridConfig = field(default_factory=GridConfig)
    results_dir: str = "results/bench"
    tag: str = ""                         # appended to the file names
    plot: bool = True


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


# -- cost model -------------------------------------------------------------------
def cost_units(opt: torch.optim.Optimizer) -> float:
    """Forward/backward units of one step (forward 1, backward 2); NaN for unknown methods."""
    if isinstance(opt, ESAM):
        return 1 + (1 + opt.beta) + (1 if opt.gamma < 1 else 0) + 3 * opt.gamma
    if isinstance(opt, SAM):
        return 6.0
    if isinstance(opt, SGD):
        return 3.0
    return math.nan


# -- device and precision ---------------------------------------------------------
def autocast_for(precision: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def make_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None  # CPU kernels have returned when the call returns


# -- splitting one step into segments --------------------------------------------
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
            self._switch(f"{self.phase}.{self.AFTER_FORWARD[self.phase]}")

    def per_step(self, reduce: Callable[[list[float]], float] = np.mean) -> dict[str, float]:
        labels = {k for step in self.steps for k in step}
        return {k: float(reduce([step.get(k, 0.0) for step in self.steps])) for k in labels}


# -- methods ----------------------------------------------------------------------
@dataclass
class Method:
    name: str
    model: nn.Module
    opt: SharpnessAwareOptimizer
    units: float
    times: list[list[float]] = field(default_factory=list)   # seconds, one list per repeat
    foreign: list[float] = field(default_factory=list)       # other processes' CPU share, per block
    flops: dict[str, float] = field(default_factory=dict)    # per segment, one step
    phase_ms: dict[str, float] = field(default_factory=dict)
    step_index: int = 0
    segments: Optional[Segments] = None                       # set only while segmenting

    @property
    def beta(self) -> float:
        return getattr(self.opt, "beta", 1.0 if isinstance(self.opt, SAM) else math.nan)

    @property
    def gamma(self) -> float:
        return getattr(self.opt, "gamma", 1.0 if isinstance(self.opt, SAM) else math.nan)


def method_specs(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """name -> optimizer kwargs (with ``_target_``) for every method this run measures."""
    defs = {k: dict(v) for k, v in OmegaConf.to_container(cfg.method_defs, resolve=True).items()}
    if cfg.baseline not in defs:
        raise UserError(f"baseline={cfg.baseline!r} is not in method_defs; allowed: {sorted(defs)}")
    if Mode(cfg.mode) == Mode.methods:
        if not cfg.methods:
            raise UserError("methods is empty; list some of: " + ", ".join(sorted(defs)))
        unknown = [m for m in cfg.methods if m not in defs]
        if unknown:
            raise UserError(f"methods {unknown} are not in method_defs; allowed: {sorted(defs)} "
                            "(add one with +method_defs.NAME={_target_:esam.optim.ESAM,beta:..,gamma:..})")
        if cfg.baseline not in cfg.methods:
            raise UserError(f"baseline={cfg.baseline!r} must be one of methods={list(cfg.methods)}")
        if len(set(cfg.methods)) != len(cfg.methods):
            raise UserError(f"methods={list(cfg.methods)} lists a method twice")
        return {m: defs[m] for m in cfg.methods}
    if cfg.grid.method not in defs:
        raise UserError(f"grid.method={cfg.grid.method!r} is not in method_defs; allowed: {sorted(defs)}")
    specs = {cfg.baseline: defs[cfg.baseline]}
    for b in cfg.grid.betas:
        for g in cfg.grid.gammas:
            if not (0 < b <= 1 and 0 < g <= 1):
                raise UserError(f"grid.betas and grid.gammas must lie in (0, 1], got beta={b} gamma={g}")
            specs[f"{cfg.grid.method}_b{b:g}_g{g:g}"] = {**defs[cfg.grid.method], "beta": b, "gamma": g}
    return specs


def build_optimizer(name: str, spec: dict[str, Any], model: nn.Module, common: dict[str, Any],
                    seed: int) -> SharpnessAwareOptimizer:
    spec = dict(spec)
    target = spec.pop("_target_", None)
    if target is None:
        raise UserError(f"method_defs.{name} has no _target_ (e.g. esam.optim.ESAM)")
    try:
        cls = hydra.utils.get_class(target)
    except Exception:
        raise UserError(f"method_defs.{name}._target_={target!r} is not an importable class") from None
    if not (isinstance(cls, type) and issubclass(cls, SharpnessAwareOptimizer)):
        raise UserError(f"method_defs.{name}._target_={target} must be an esam.optim optimizer "
                        "(a SharpnessAwareOptimizer with step(closure) and phase_hook)")
    kwargs = {**common, **spec}
    if "seed" in inspect.signature(cls.__init__).parameters:
        kwargs.setdefault("seed", seed)  # SWP draws are reproducible
    try:
        return cls(model.parameters(), model=model, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"method_defs.{name}: {e}") from None


def make_closure(method: Method, x: torch.Tensor, y: torch.Tensor, autocast, channels_last: bool):
    """``closure(indices=None)`` -> per-sample losses on the batch or on ``indices`` of it."""

    def closure(indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        xb, yb = x, y
        if indices is not None:
            xb, yb = x.index_select(0, indices), y.index_select(0, indices)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = method.model(xb)
        losses = F.cross_entropy(logits.float(), yb, reduction="none")
        if method.segments is not None:
            method.segments.on_forward_end()
        return losses

    return closure


# -- the measurement --------------------------------------------------------------
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
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.autocast = autocast_for(self.precision, self.device)
        self.sync = make_sync(self.device)
        self.channels_last = bool(cfg.model.channels_last)
        for key in ("steps", "repeats", "num_batches", "flop_steps"):
            if cfg[key] < 1:
                raise UserError(f"{key}={cfg[key]} must be >= 1")
        for key in ("warmup_steps", "phase_steps"):
            if cfg[key] < 0:
                raise UserError(f"{key}={cfg[key]} must be >= 0")
        specs = method_specs(cfg)  # a bad method list fails before any data or model is built

        data_kwargs = OmegaConf.to_container(cfg.dataset, resolve=True)
        data_kwargs.update(seed=cfg.seed, drop_last=True, device=self.device, channels_last=self.channels_last)
        data = build_data(data_kwargs.pop("name"), **data_kwargs)
        self.batches = []
        for x, y in data.train.batches(0):
            self.batches.append((x, y))
            if len(self.batches) == cfg.num_batches:
                break
        if not self.batches:
            raise UserError(f"dataset.batch_size={cfg.dataset.batch_size} leaves no full batch")
        self.batch_size, self.input_shape = self.batches[0][0].shape[0], tuple(self.batches[0][0].shape[1:])

        torch.manual_seed(cfg.seed)
        template = build_model(cfg.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                               **cfg.model.args).to(self.device)
        if self.channels_last:
            template = template.to(memory_format=torch.channels_last)
        template.train()
        self.num_params = sum(p.numel() for p in template.parameters())
        common = OmegaConf.to_container(cfg.optimizer, resolve=True)
        self.methods: list[Method] = []
        for name, spec in specs.items():
            model = copy.deepcopy(template)  # same initial weights for everyone
            opt = build_optimizer(name, spec, model, common, cfg.seed)
            self.methods.append(Method(name, model, opt, cost_units(opt)))
        self.phase_foreign_cpu = math.nan
        self.grad_scaler = None
        if self.precision == "fp16":
            self.grad_scaler = {m.name: torch.amp.GradScaler(self.device.type) for m in self.methods}

    def step(self, m: Method) -> None:
        x, y = self.batches[m.step_index % len(self.batches)]
        m.step_index += 1
        closure = make_closure(m, x, y, self.autocast, self.channels_last)
        scaler = self.grad_scaler[m.name] if self.grad_scaler else None
        m.opt.step(closure, grad_scaler=scaler)

    def timed_step(self, m: Method) -> float:
        t0 = time.perf_counter()
        self.step(m)
        self.sync()
        return time.perf_counter() - t0

    def count_flops(self) -> None:
        """FLOPs per optimizer step, split into segments: one step, or the mean of
        ``flop_steps`` steps when the SWP draw (beta < 1) changes the count from step to step."""
        for m in self.methods:
            n = self.cfg.flop_steps if m.beta < 1 else 1
            with FlopCounterMode(display=False) as counter:
                m.segments = Segments(lambda: float(counter.get_total_flops()))
                m.opt.phase_hook = m.segments.on_phase
                try:
                    for _ in range(n):
                        m.segments.start_step()
                        self.step(m)
                    m.flops = m.segments.per_step()
                    m.flops["total"] = float(counter.get_total_flops()) / n
                finally:
                    m.segments, m.opt.phase_hook = None, None

    def warm_up(self) -> None:
        for _ in range(self.cfg.warmup_steps):
            for m in self.methods:
                self.step(m)
        self.sync()

    def time_steps(self, log: Callable[[str], None] = print) -> None:
        """The main timing: no hooks, a sync per step, methods in rotating blocks."""
        n = len(self.methods)
        for r in range(self.cfg.repeats):
            order = self.methods[r % n:] + self.methods[: r % n]
            gc.collect()
            gc.disable()  # no collector pauses inside the timed steps
            try:
                for m in order:
                    load = ForeignCPU()
                    m.times.append([self.timed_step(m) for _ in range(self.cfg.steps)])
                    m.foreign.append(load.share())
            finally:
                gc.enable()
            busy = [self.busy(m.foreign[-1]) for m in self.methods]
            log(f"repeat {r + 1}/{self.cfg.repeats}: " + "  ".join(
                f"{m.name} {1e3 * _median(m.times[-1]):.0f}ms" + ("*" if b else "")
                for m, b in zip(self.methods, busy)) + ("   (*: other processes busy, left out)" if any(busy) else ""))

    def busy(self, share: float) -> bool:
        return share > self.cfg.max_foreign_cpu  # NaN (no /proc) is never busy

    def time_phases(self) -> None:
        """A separate pass with a synced clock read at every phase boundary (ms per step)."""
        if self.cfg.phase_steps == 0:
            return

        def clock() -> float:
            self.sync()
            return time.perf_counter()

        for m in self.methods:
            m.segments = Segments(clock)
            m.opt.phase_hook = m.segments.on_phase
        load = ForeignCPU()
        try:
            for _ in range(self.cfg.phase_steps):
                for m in self.methods:
                    m.segments.start_step()
                    self.step(m)
            for m in self.methods:
                m.phase_ms = {k: 1e3 * v for k, v in m.segments.per_step(np.median).items()}
            self.phase_foreign_cpu = load.share()
        finally:
            for m in self.methods:
                m.segments, m.opt.phase_hook = None, None


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def _quantile(xs: list[float], q: float) -> float:
    return float(np.quantile(xs, q))


# -- tables -----------------------------------------------------------------------
SEGMENT_ORDER = ["setup", "first_pass.fwd", "first_pass.bwd", "perturb", "select_forward.fwd",
                 "select_forward.topk", "second_pass.fwd", "second_pass.bwd", "restore", "base_update"]


def summarize(bench: Bench, env: dict[str, Any]):
    """One row per method: times, throughput, extra % (measured, FLOP-counted, cost model), phases."""
    import pandas as pd

    base = next(m for m in bench.methods if m.name == bench.cfg.baseline)
    clean = {m.name: _clean_blocks(bench, m) for m in bench.methods}
    base_med = _median([t for r in clean[base.name] for t in base.times[r]])
    base_flops = base.flops.get("total", math.nan)
    rows = []
    for m in bench.methods:
        all_t = [t for r in clean[m.name] for t in m.times[r]]
        med = _median(all_t)
        both = [r for r in clean[m.name] if r in set(clean[base.name])]
        per_repeat = [100 * (_median(m.times[r]) / _median(base.times[r]) - 1) for r in both] or [math.nan]
        fwd = sum(v for k, v in m.flops.items() if k.endswith(".fwd"))
        bwd = sum(v for k, v in m.flops.items() if k.endswith(".bwd"))
        row = {
            "method": m.name,
            "optimizer": type(m.opt).__name__,
            "beta": m.beta,
            "gamma": m.gamma,
            "ms_median": 1e3 * med,
            "ms_q25": 1e3 * _quantile(all_t, 0.25),
            "ms_q75": 1e3 * _quantile(all_t, 0.75),
            "ms_min": 1e3 * min(all_t),
            "ms_max": 1e3 * max(all_t),
            "images_per_s": bench.batch_size / med,
            "extra_pct": 100 * (med / base_med - 1),
            # Paired: each repeat's block against the baseline's block of the same repeat.
            "extra_pct_paired_median": _median(per_repeat),
            "extra_pct_paired_q25": _quantile(per_repeat, 0.25),
            "extra_pct_paired_q75": _quantile(per_repeat, 0.75),
            "blocks_used": len(clean[m.name]),
            "blocks": len(m.times),
            "gflops_step": m.flops.get("total", math.nan) / 1e9,
            "gflops_fwd": fwd / 1e9,
            "gflops_bwd": bwd / 1e9,
            "extra_flops_pct": 100 * (m.flops.get("total", math.nan) / base_flops - 1),
            "cost_units": m.units,
            "cost_model_extra_pct": 100 * (m.units / base.units - 1),
            **{f"phase_ms.{k}": m.phase_ms.get(k, 0.0) for k in _segments(bench) if m.phase_ms},
            "model": bench.cfg.model.label,
            "device": env["device"],
            "precision": bench.precision,
            "channels_last": bench.channels_last,
            "batch_size": bench.batch_size,
            "input_shape": "x".join(map(str, bench.input_shape)),
            "steps": bench.cfg.steps,
            "repeats": bench.cfg.repeats,
            "torch": env["torch"],
        }
        rows.append(row)
    return pd.DataFrame(rows)


def _clean_blocks(bench: Bench, m: Method) -> list[int]:
    """Repeats whose block ran while other processes were quiet (all of them if none was)."""
    quiet = [r for r, share in enumerate(m.foreign) if not bench.busy(share)]
    return quiet or list(range(len(m.times)))


def _segments(bench: Bench) -> list[str]:
    seen = {k for m in bench.methods for k in m.phase_ms}
    return [s for s in SEGMENT_ORDER if s in seen] + sorted(seen - set(SEGMENT_ORDER))


def report_tables(df, bench: Bench) -> list[tuple[str, Any]]:
    """(caption, DataFrame) pairs: the main table, then the phases or the grid's planes."""
    cols = {"method": "method", "ms_median": "ms/step", "ms_q25": "q25", "ms_q75": "q75",
            "images_per_s": "img/s", "extra_pct": "extra %", "extra_pct_paired_median": "paired %",
            "extra_flops_pct": "FLOPs extra %", "cost_model_extra_pct": "cost model %",
            "gflops_step": "GFLOP/step"}
    table = df[list(cols)].rename(columns=cols)
    table["blocks"] = [f"{u}/{n}" for u, n in zip(df.blocks_used, df.blocks)]
    out = [(f"ms/step: median over the quiet blocks of {bench.cfg.repeats} x {bench.cfg.steps} steps "
            f"(q25, q75); extra % vs {bench.cfg.baseline} from the medians, paired % = median over "
            "repeats of each block vs the baseline's block", table)]
    segs = _segments(bench)
    if segs:
        ph = df[["method"] + [f"phase_ms.{s}" for s in segs]].copy()
        ph.columns = ["method"] + segs
        ph["sum"] = ph[segs].sum(axis=1)
        out.append((f"per-phase ms/step (median of {bench.cfg.phase_steps} steps, synced at each phase "
                    f"boundary; other processes used {bench.phase_foreign_cpu:.0%} of the CPU meanwhile)", ph))
    if Mode(bench.cfg.mode) == Mode.grid:
        grid = grid_table(df)
        for col, label in (("extra_pct", "measured"), ("extra_flops_pct", "FLOP-counted"),
                           ("cost_model_extra_pct", "cost-model")):
            plane = grid.pivot(index="beta", columns="gamma", values=col)
            plane.columns = [f"gamma={g:g}" for g in plane.columns]
            out.append((f"{label} extra % of ESAM vs {bench.cfg.baseline} (rows: beta)", plane.reset_index()))
    return out


def format_tables(tables: list[tuple[str, Any]]) -> str:
    return "\n\n".join(f"{caption}:\n{t.to_string(index=False, float_format=lambda v: f'{v:.1f}')}"
                        for caption, t in tables)


def markdown_table(t) -> str:
    def cell(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    numeric = [t[c].dtype.kind in "if" for c in t.columns]
    lines = ["| " + " | ".join(map(str, t.columns)) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in t.itertuples(index=False)]
    return "\n".join(lines)


def markdown_report(tables: list[tuple[str, Any]], env: dict[str, Any], title: str) -> str:
    head = [f"### {title}", "", f"`{env['command']}`", "",
            f"commit {env['git_commit'][:10]}{' (dirty)' if env['git_dirty'] else ''}, {env['threads']} threads, "
            f"{env['num_params']:,} parameters", ""]
    return "\n".join(head + [f"{caption}:\n\n{markdown_table(t)}\n" for caption, t in tables])


# -- environment, files, plots -----------------------------------------------------
def environment(bench: Bench) -> dict[str, Any]:
    dev = bench.device
    env = {
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "torch": torch.__version__.split("+")[0],
        "torch_full": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join(["python -m esam.bench", *_overrides()]),
        "num_params": bench.num_params,
        "cpu_count": os.cpu_count(),
        "load_avg_1m_before": _load_avg(),
    }
    return env


def _load_avg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return math.nan


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig
        return list(HydraConfig.get().overrides.task)
    except Exception:  # called as a plain function, not through Hydra
        return []


def file_stem(bench: Bench, env: dict[str, Any]) -> str:
    stem = f"{bench.cfg.model.label}-{env['device']}-{bench.precision}-torch{env['torch']}"
    return f"{stem}-{bench.cfg.tag}" if bench.cfg.tag else stem


def plot_bars(df, baseline: str, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = df[df.method != baseline].reset_index(drop=True)
    x = np.arange(len(d))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(d), 4))
    # Whiskers: the IQR of the per-repeat (paired) extra %.
    err = np.clip(np.array([d.extra_pct - d.extra_pct_paired_q25, d.extra_pct_paired_q75 - d.extra_pct]), 0, None)
    bars = [("measured (median; IQR over repeats)", d.extra_pct, err), ("FLOP-counted", d.extra_flops_pct, None),
            ("cost model", d.cost_model_extra_pct, None)]
    for i, (label, vals, e) in enumerate(bars):
        rects = ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=label, yerr=e, capsize=3 if e is not None else 0)
        ax.bar_label(rects, fmt="%.0f", fontsize=7, padding=2)
    ax.axhline(100, color="grey", lw=0.6, ls=":")
    ax.axhline(40, color="grey", lw=0.6, ls="--")
    ax.set_xticks(x, d.method)
    ax.set_ylabel(f"extra time vs {baseline} (%)")
    ax.set_ylim(0, 1.3 * max(105.0, float(np.nanmax(d[["extra_pct", "extra_flops_pct"]].values))))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grid_table(df):
    g = df[df.optimizer == "ESAM"][["beta", "gamma", "ms_median", "extra_pct", "extra_flops_pct",
                                    "cost_model_extra_pct", "extra_pct_paired_q25", "extra_pct_paired_q75"]]
    return g.sort_values(["beta", "gamma"]).reset_index(drop=True)


def plot_grid(grid, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("extra_pct", "measured extra %"), ("extra_flops_pct", "FLOP-counted extra %"),
              ("cost_model_extra_pct", "cost-model extra %")]
    vmax = max(100.0, float(grid[[p for p, _ in panels]].max().max()))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, (col, label) in zip(axes, panels):
        z = grid.pivot(index="beta", columns="gamma", values=col)
        im = ax.imshow(z.values, origin="lower", cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(z.shape[1]), [f"{g:g}" for g in z.columns])
        ax.set_yticks(range(z.shape[0]), [f"{b:g}" for b in z.index])
        for i in range(z.shape[0]):
            for j in range(z.shape[1]):
                v = z.values[i, j]
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 0.6 * vmax else "black",
                        fontweight="bold" if v <= 40 else "normal")
        ax.set_xlabel("gamma (SDS sample fraction)")
        ax.set_title(label, fontsize=9)
    axes[0].set_ylabel("beta (SWP tensor probability)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="extra vs SGD (%); bold: <= 40")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def log_wandb(cfg: DictConfig, df, env: dict[str, Any], name: str) -> None:
    import wandb

    lg = cfg.logger
    mode = lg.mode or os.environ.get("WANDB_MODE") or "online"
    run = wandb.init(project=lg.project, entity=lg.entity, mode=mode, job_type="bench", name=name,
                     group="bench", tags=list(lg.tags) + [env["device"], cfg.model.label],
                     config={**OmegaConf.to_container(cfg, resolve=True), "env": env})
    try:
        run.log({"bench": wandb.Table(dataframe=df)})
        for r in df.itertuples():
            for col in ("ms_median", "images_per_s", "extra_pct", "extra_flops_pct", "cost_model_extra_pct"):
                run.summary[f"{r.method}/{col}"] = getattr(r, col)
    finally:
        run.finish()


# -- entry points -----------------------------------------------------------------
def run(cfg: DictConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure, write the CSV/JSON/PNG/MD files and return ``{'table', 'files', 'env'}``."""
    threads = torch.get_num_threads()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _run(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DictConfig, log: Callable[[str], None]) -> dict[str, Any]:
    bench = Bench(cfg)
    env = environment(bench)
    log(f"bench: {cfg.model.label} on {env['device_name']} ({env['threads']} threads), {bench.precision}, "
        f"channels_last={bench.channels_last}, batch {bench.batch_size}x{'x'.join(map(str, bench.input_shape))}, "
        f"{len(bench.methods)} methods, {cfg.repeats} repeats x {cfg.steps} steps")
    if env["device"] == "cpu" and env["load_avg_1m_before"] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {env['load_avg_1m_before']} on {os.cpu_count()} cores: "
            "other processes share the CPU, so the timings will be noisy")
    bench.count_flops()
    bench.warm_up()
    bench.time_steps(log)
    bench.time_phases()
    env["load_avg_1m_after"] = _load_avg()
    env["phase_pass_foreign_cpu"] = round(bench.phase_foreign_cpu, 3)
    df = summarize(bench, env)

    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = file_stem(bench, env) + ("-grid" if Mode(cfg.mode) == Mode.grid else "")
    title = (f"{cfg.model.label}, batch {bench.batch_size}x{'x'.join(map(str, bench.input_shape))}, "
             f"{bench.precision}{', channels_last' if bench.channels_last else ''}, {env['device_name']}, "
             f"torch {env['torch']}")
    files = {"csv": out / f"{stem}.csv", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    df.to_csv(files["csv"], index=False, float_format="%.4g")
    payload = {
        "env": env,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "timer": "one opt.step(closure) + device sync; batches prebuilt; warm-up, FLOP step and phase pass excluded",
        "rows": df.to_dict(orient="records"),
        "flops_by_segment": {m.name: m.flops for m in bench.methods},
        "phase_ms": {m.name: m.phase_ms for m in bench.methods},
        "step_ms": {m.name: [[round(1e3 * t, 3) for t in b] for b in m.times] for m in bench.methods},
        "foreign_cpu": {m.name: [round(f, 3) for f in m.foreign] for m in bench.methods},
    }
    if Mode(cfg.mode) == Mode.grid:
        grid = grid_table(df)
        payload["grid"] = grid.to_dict(orient="records")
        if cfg.plot:
            plot_grid(grid, title, files["png"])
    elif cfg.plot:
        plot_bars(df, cfg.baseline, title, files["png"])
    if not cfg.plot:
        del files["png"]
    files["json"].write_text(json.dumps(payload, indent=1, default=str))
    tables = report_tables(df, bench)
    files["md"] = out / f"{stem}.md"
    files["md"].write_text(markdown_report(tables, env, title))
    log(format_tables(tables))
    log("wrote " + ", ".join(str(p) for p in files.values()))
    if cfg.logger.name == "wandb":
        log_wandb(cfg, df, env, stem)
    return {"table": df, "files": files, "env": env}


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
