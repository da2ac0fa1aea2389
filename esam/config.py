"""Structured-config schemas: a typo in a key or a wrong type fails at compose time.

Each YAML option under ``conf/<group>/`` starts with ``defaults: [<group>_schema, _self_]``
so Hydra merges it onto the dataclass below and rejects unknown keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


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


class BNStats(str, Enum):
    first = "first"  # running statistics from the first pass only (ours)
    all = "all"      # from every forward, as the ESAM authors' code


class Selection(str, Enum):
    topk = "topk"        # exactly int(gamma * n) samples (ours)
    authors = "authors"  # strictly above the k-th largest rise, all at gamma >= 0.99 (authors' code)


@dataclass
class SAMConfig(OptimizerConfig):
    rho: float = 0.05
    adaptive: bool = False
    m: Optional[int] = None      # m-sharpness: samples per perturbation (null = the whole per-process batch)
    bn_stats: BNStats = BNStats.first
    eps: float = 1e-12           # in rho / (||g|| + eps); davda54/sam 1e-12, the ESAM authors 1e-7


@dataclass
class ESAMConfig(SAMConfig):
    beta: float = 0.6
    gamma: float = 0.5
    selection: Selection = Selection.topk


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
    cs.store(group="optimizer", name="sgd_schema", node=OptimizerConfig)
    cs.store(group="optimizer", name="sam_schema", node=SAMConfig)
    cs.store(group="optimizer", name="esam_schema", node=ESAMConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)


register_configs()


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


# -- the efficient-SAM field: LookSAM, GSAM, K-SAM --------------------------------------------
# Their own rho/adaptive (not SAMConfig's), so SAM's m-sharpness keys never reach them.
@dataclass
class LookSAMConfig(OptimizerConfig):
    rho: float = 0.05
    adaptive: bool = False
    k: int = 5                   # a SAM step every k steps
    alpha: float = 0.7           # weight of the reused orthogonal component g_v (the paper's, k = 5)


@dataclass
class GSAMConfig(OptimizerConfig):
    rho: float = 0.04            # rho_max: the radius at the peak lr
    rho_min: float = 0.02        # the radius at lr_min
    alpha: float = 0.01          # ascent along the part of g orthogonal to g_s
    lr_min: float = 0.0
    adaptive: bool = False


@dataclass
class KSAMConfig(OptimizerConfig):
    rho: float = 0.05
    k_frac: float = 0.36         # share of the batch (highest loss) in both SAM passes (unverified: ksam.yaml)
    k: int = 0                   # a fixed count instead; 0 = use k_frac
    adaptive: bool = False


def register_efficient_sam_configs() -> None:
    cs = ConfigStore.instance()
    for name, node in (("looksam_schema", LookSAMConfig), ("gsam_schema", GSAMConfig),
                       ("ksam_schema", KSAMConfig)):
        cs.store(group="optimizer", name=name, node=node)


register_efficient_sam_configs()


# -- when to take the sharpness-aware step (late-phase SAM, RST, AE-SAM) and MSAM ---------------
class Inner(str, Enum):
    sam = "sam"    # the sharpness-aware step is SAM's
    esam = "esam"  # ESAM's, with beta and gamma


class PSchedule(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


@dataclass
class SwitchingSAMConfig(ESAMConfig):
    inner: Inner = Inner.sam     # beta, gamma and selection act only with inner=esam


@dataclass
class LateSAMConfig(SwitchingSAMConfig):
    start: float = 0.875         # share of training before the first sharpness-aware step


@dataclass
class RSTConfig(SwitchingSAMConfig):
    schedule: PSchedule = PSchedule.constant
    p: float = 0.5               # probability of a sharpness-aware step (at the start if scheduled)
    p_end: Optional[float] = None  # at the end of training, for schedule=linear|cosine


@dataclass
class AESAMConfig(SwitchingSAMConfig):
    delta: float = 0.9           # EMA rate of the mean and variance of ||g||^2
    lambda1: float = -1.0        # c_t = t lambda1 + (1 - t) lambda2, t = share of training done
    lambda2: float = 1.0


@dataclass
class MSAMConfig(OptimizerConfig):
    rho: float = 3.0             # perturbation length along -v/||v|| (the authors' CIFAR value)
    eps: float = 1e-12           # in rho / (||v|| + eps), as the authors' code


def register_switching_and_msam_configs() -> None:
    cs = ConfigStore.instance()
    for name, node in (("latesam_schema", LateSAMConfig), ("rst_schema", RSTConfig),
                       ("aesam_schema", AESAMConfig), ("msam_schema", MSAMConfig)):
        cs.store(group="optimizer", name=name, node=node)


register_switching_and_msam_configs()


# -- SAF and MESA (Du et al., NeurIPS 2022) -----------------------------------------------------
class SAFMemory(str, Enum):
    cpu = "cpu"        # host memory, as the authors (ImageNet's memory is ~20 GB); a sync per step
    device = "device"  # beside the logits: no sync, for memories that fit (CIFAR: 8-80 MB)


@dataclass
class SAFConfig(OptimizerConfig):
    lam: float = 0.3             # weight of the trajectory loss (the authors' --reinforce)
    tau: float = 5.0             # softmax temperature of the trajectory KL
    start: int = 5               # trajectory loss on in 0-based epochs > start (--kl_start_epoch)
    lookback: int = 3            # E~: targets are each sample's logits from this many epochs ago
    memory_device: SAFMemory = SAFMemory.cpu


@dataclass
class MESAConfig(OptimizerConfig):
    lam: float = 0.8
    tau: float = 5.0
    start: int = 5
    decay: float = 0.9998        # EMA of the weights: ema <- decay ema + (1 - decay) w, every step


def register_saf_configs() -> None:
    cs = ConfigStore.instance()
    for name, node in (("saf_schema", SAFConfig), ("mesa_schema", MESAConfig)):
        cs.store(group="optimizer", name=name, node=node)


register_saf_configs()


# The recipe layer (group sam, experiment=<recipe>_<method> for every cell): esam/recipes.py.
from esam.recipes import register_recipe_configs  # noqa: E402

register_recipe_configs()
