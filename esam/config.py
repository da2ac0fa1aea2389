"""Structured-config schemas: a typo in a key or a wrong type fails at compose time.

Each YAML option under ``conf/<group>/`` starts with ``defaults: [<group>_schema, _self_]``
so Hydra merges it onto the dataclass below and rejects unknown keys.
"""
from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from esam.optim.registry import method_hparams


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast where the hardware runs bf16 natively, else fp32 (fp16 on old GPUs)
    fp32 = "fp32"
    tf32 = "tf32"  # fp32 weights and activations, TF32 matmuls/convs on CUDA (Ampere+); fp32 on CPU
    bf16 = "bf16"
    fp16 = "fp16"  # CUDA only: autocast + GradScaler


class Scheduler(str, Enum):
    cosine = "cosine"
    constant = "constant"
    step = "step"          # x step_gamma at each of trainer.milestones (late-phase SAM authors' WRN schedule)


class SchedulePer(str, Enum):
    epoch = "epoch"  # the ESAM authors' recipe
    step = "step"


@dataclass
class AugmentConfig:
    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0
    cutout_prob: float = 1.0     # chance that an image gets its Cutout square


@dataclass
class DatasetConfig:
    """Keys every dataset has; each dataset's own schema below adds its own (and only those)."""
    name: str = MISSING          # registry key (esam.data.DATASETS)
    batch_size: int = 128        # global batch (split over DDP ranks)
    test_batch_size: int = 512
    drop_last: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # N > 0: train on N random images of this dataset's shape (classes, channels, size) instead
    # of reading it, for smoke runs of a recipe without its data (trainer=debug dataset.fake=256).
    fake: int = 0


@dataclass
class CIFARConfig(DatasetConfig):
    root: str = "data"           # relative to the launch folder
    download: bool = True


@dataclass
class ImageNetConfig(DatasetConfig):
    root: str = "data/imagenet"  # root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG; never downloaded
    image_size: int = 224        # train crop side
    num_workers: int = 8         # JPEG-decoding processes


@dataclass
class DigitsConfig(DatasetConfig):
    test_size: float = 0.2       # held-out fraction
    label_noise: float = 0.0     # fraction of training labels flipped to another class (fixed set)


@dataclass
class SyntheticConfig(DatasetConfig):
    image_size: int = 32
    num_classes: int = 10
    num_train: int = 5000
    num_test: int = 1000
    in_channels: int = 3
    class_signal: float = 0.2    # share of each image that is its class template (0 = noise)


@dataclass
class ModelConfig:
    name: str = MISSING          # registry key (esam.models.MODELS)
    label: str = "${.name}"      # what tables and wandb call it
    channels_last: bool = True
    args: Dict[str, Any] = field(default_factory=dict)  # passed to the builder


# -- optimizers: the method (optimizer.name, a key of esam.optim.METHODS) and its base --------
@dataclass
class SGDBaseConfig:
    """torch.optim.SGD; timm-style names sgd | momentum | nesterov."""
    name: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    dampening: float = 0.0


@dataclass
class AdamBaseConfig:
    """torch.optim.Adam / AdamW (name adam | adamw)."""
    name: str = "adam"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    amsgrad: bool = False


@dataclass
class RMSpropBaseConfig:
    name: str = "rmsprop"
    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0


@dataclass
class OptimizerConfig:
    name: str = MISSING          # method: registry key (esam.optim.METHODS)
    label: str = "${.name}"      # what tables and wandb call it
    lr: float = 0.05
    weight_decay: float = 1e-3
    base: Any = MISSING          # conf/optimizer/base/<name>.yaml: the base optimizer and its own args


def _schema_type(annotation: Any, owner: str, key: str) -> Any:
    """A constructor annotation as OmegaConf takes it: ``X | None`` -> Optional[X]; a
    ``Literal[...]`` of strings -> an Enum of those values (so a bad value fails at compose time)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        # One Enum per choice set, a module attribute so that configs holding it pickle (checkpoints).
        name = "Choice_" + "_".join([key, *map(str, args)])
        if name not in globals():
            globals()[name] = Enum(name, {str(a): a for a in args}, type=str, module=__name__, qualname=name)
        return globals()[name]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return Optional[_schema_type(rest[0], owner, key)]
        return Any
    return annotation


def method_schema(name: str, cls: type) -> type:
    """The Hydra schema of ``conf/optimizer/<name>.yaml``: OptimizerConfig's keys (lr, weight_decay,
    base) plus the method's own constructor keywords, typed and defaulted by the constructor itself."""
    hints = typing.get_type_hints(cls.__init__)
    fields = []
    for key, default in method_hparams(cls).items():
        kind = _schema_type(hints.get(key, Any), cls.__name__, key)
        if isinstance(kind, type) and issubclass(kind, Enum) and default is not None:
            default = kind(default)
        fields.append((key, kind, field(default=default)))
    return make_dataclass(f"{cls.__name__}Config", fields, bases=(OptimizerConfig,))


def method_schemas() -> dict[str, type]:
    """One schema per registered method (esam.optim.METHODS), generated from its signature."""
    from esam.optim import METHODS

    return {name: method_schema(name, info.cls) for name, info in METHODS.items()}


@dataclass
class TrainerConfig:
    epochs: int = 10
    scheduler: Scheduler = Scheduler.cosine
    schedule_per: SchedulePer = SchedulePer.epoch
    milestones: List[float] = field(default_factory=lambda: [0.3, 0.6])  # scheduler=step: shares of the run
    step_gamma: float = 0.2               # scheduler=step: lr factor per milestone (0.2, 0.2^2 = 0.04 after 60%)
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    precision: Precision = Precision.auto
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    timing_warmup_steps: int = 5          # steps excluded from the step timer
    limit_train_batches: int = 0          # 0 = all (for smoke runs)
    limit_test_batches: int = 0
    max_steps: int = 0                    # stop after this many steps of the run (0 = off; trainer=debug)
    checkpoint_every: int = 1             # epochs; 0 = only at the end and on signals
    keep_best: bool = True
    resume: Optional[str] = None          # null | auto | <run folder> (continue there) | <file.pt> (new folder)
    progress: bool = True
    num_threads: int = 0                  # CPU threads for torch; 0 = torch's default
    budget: Optional[float] = None        # stop after this compute, in SGD epochs (SAM gets ~half); null = off
    check_every: int = 50                 # steps between host reads of the device (non-finite loss, DDP stop)
    # Hooks before the final evaluation (esam/engine/hooks.py): null = what the method declares
    # (MSAM: [recalibrate_bn], as its authors); [] = none; [recalibrate_bn] = for any method.
    before_final_eval: Optional[List[str]] = None
    evaluate_variants: bool = True        # also score the weights a method offers (MESA's EMA: test_acc_ema)


@dataclass
class LoggerConfig:
    name: str = "none"                    # none | wandb
    project: str = "esam"
    entity: Optional[str] = None
    mode: Optional[str] = None            # online | offline | disabled; null = WANDB_MODE or online
    tags: List[str] = field(default_factory=list)


def register_configs() -> None:
    cs = ConfigStore.instance()
    for name, node in (("cifar_schema", CIFARConfig), ("imagenet_schema", ImageNetConfig),
                       ("digits_schema", DigitsConfig), ("synthetic_schema", SyntheticConfig)):
        cs.store(group="dataset", name=name, node=node)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    for name, node in (("sgd_schema", SGDBaseConfig), ("adam_schema", AdamBaseConfig),
                       ("rmsprop_schema", RMSpropBaseConfig)):
        cs.store(group="optimizer/base", name=name, node=node)
    for name, node in method_schemas().items():  # sgd_schema, sam_schema, esam_schema, ...
        cs.store(group="optimizer", name=f"{name}_schema", node=node)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)


register_configs()

# The names the hand-written enums had, so checkpoints pickled before the schemas were generated load.
BNStats, Selection = globals()["Choice_bn_stats_first_all"], globals()["Choice_selection_topk_authors"]
Inner, PSchedule = globals()["Choice_inner_sam_esam"], globals()["Choice_schedule_constant_linear_cosine"]
SAFMemory = globals()["Choice_memory_device_cpu_device"]


# -- the overhead benchmark (python -m esam.bench; conf/bench.yaml) ---------------------------
class BenchMode(str, Enum):
    methods = "methods"  # the methods listed in ``methods``, side by side
    grid = "grid"        # grid.method over grid.betas x grid.gammas, next to ``baseline``


@dataclass
class BenchGridConfig:
    method: str = "esam"   # a method (conf/optimizer option or variant) whose beta and gamma the grid sets
    betas: List[float] = field(default_factory=lambda: [0.4, 0.6, 0.8, 1.0])
    gammas: List[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 1.0])


@dataclass
class BenchWindowConfig:
    """The stretch of training the bench's steps stand for: each pass spreads its steps evenly
    from ``start`` to ``end`` (fractions of training) through ``opt.set_progress``, so a method
    whose steps vary with progress (late-phase SAM, RST's schedule, AE-SAM's c_t) is timed over
    a realistic mix of its steps."""
    start: float = 0.0
    end: float = 1.0
    epochs: int = 200      # the run length set_progress reports (epochs_total)


@dataclass
class BenchConfig:
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    logger: LoggerConfig = MISSING
    mode: BenchMode = BenchMode.methods
    seed: int = 0
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto
    num_threads: int = 0                  # CPU threads for torch; 0 = torch's default
    methods: List[str] = field(default_factory=list)  # conf/optimizer options or keys of variants
    baseline: str = "sgd"
    # name -> {optimizer: <conf/optimizer option>, <key>: value, ...}: a method with other settings
    variants: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    common: Dict[str, Any] = field(default_factory=dict)  # merged onto every method's optimizer config
    window: BenchWindowConfig = field(default_factory=BenchWindowConfig)
    steps: int = 2                        # timed steps per method per block
    repeats: int = 32                     # blocks per method
    warmup_steps: int = 3
    phase_steps: int = 3                  # steps of the per-phase pass (0 = skip it)
    flop_steps: int = 5                   # steps whose FLOPs are counted and averaged
    num_batches: int = 4                  # distinct batches, cycled
    max_foreign_cpu: float = 0.1          # a block during which other processes used more CPU is busy
    max_busy_repeats: int = 8             # busy repeats run again before measuring anyway, flagged under load
    grid: BenchGridConfig = field(default_factory=BenchGridConfig)
    results_dir: Optional[str] = None     # null = the run folder (outputs/bench/<time>/)
    publish: bool = False                 # true = write into results/bench/ (the committed results)
    tag: str = ""                         # appended to the file names
    plot: bool = True


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


# The recipe layer (group sam, experiment=<recipe>_<method> for every cell): esam/recipes.py.
from esam.recipes import register_recipe_configs  # noqa: E402

register_recipe_configs()
