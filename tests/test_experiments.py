"""The paper recipes (conf/experiment), the sweep grids (conf/sweep) and the launchers compose with
the values the paper and the authors' run.sh use; the Makefile targets name existing recipes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from hydra import compose, initialize_config_dir

from esam import recipes as recipes_module
from esam.optim import build_from_spec
from esam.train import CONFIG_DIR
from helpers import REPO, compose_cfg

EXPERIMENTS = Path(CONFIG_DIR) / "experiment"
METHODS = ("sgd", "sam", "esam")
# Du et al. (ICLR 2022) and dydjw9/Efficient_SAM run.sh; batch = the global batch.
RECIPES = {
    "resnet18": dict(batch=128, lr=0.05, wd=1e-3, rho=0.05, beta=0.6, gamma=0.5, epochs=200),
    "wrn28_10": dict(batch=256, lr=0.05, wd=1e-3, rho=0.1, beta=0.5, gamma=0.5, epochs=200),
    "pyramidnet110": dict(batch=256, lr=0.05, wd=5e-4, rho=0.2, beta=0.5, gamma=0.5, epochs=300),
    "resnet50": dict(batch=256, lr=0.1, wd=1e-4, rho=0.05, beta=0.6, gamma=0.5, epochs=90),
    "resnet101": dict(batch=256, lr=0.1, wd=1e-4, rho=0.05, beta=0.6, gamma=0.5, epochs=90),
}
GRID = ([(ds, m) for ds in ("cifar10", "cifar100") for m in ("resnet18", "wrn28_10", "pyramidnet110")]
        + [("imagenet", m) for m in ("resnet50", "resnet101")])
NAMES = [f"{ds}_{m}_{opt}" for ds, m in GRID for opt in METHODS]
# The efficient-SAM field (LookSAM to MESA) on CIFAR-10/100 x ResNet-18/WRN-28-10.
FIELD = ("looksam", "gsam", "ksam", "latesam", "rst", "aesam", "msam", "saf", "mesa")
FIELD_NAMES = [f"{ds}_{m}_{opt}" for ds in ("cifar10", "cifar100") for m in ("resnet18", "wrn28_10")
               for opt in FIELD]


# Files only where a cell says something the recipe and the method do not (esam/recipes.py).
FILES = sorted([f"{ds}_{m}_esam" for ds in ("cifar10", "cifar100") for m in ("wrn28_10", "pyramidnet110")]
               + [f"{ds}_{m}_{opt}" for ds in ("cifar10", "cifar100") for m in ("resnet18", "wrn28_10")
                  for opt in ("latesam", "mesa")])


def test_experiment_files_are_only_the_cells_that_add_something():
    assert sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")) == FILES


def test_every_recipe_and_method_is_an_experiment_name():
    """The names older scripts use (and `make cifar10-<method>`) exist for every cell."""
    names = set(recipes_module.experiment_cells()) | set(FILES)
    options = {p.stem for p in (Path(CONFIG_DIR) / "optimizer").glob("*.yaml")}
    assert names == {f"{r}_{o}" for r in recipes_module.recipes() for o in options}
    assert set(NAMES + FIELD_NAMES) <= names


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_field_experiments_are_the_recipe_plus_the_method(name):
    """Every method runs on the same recipe as SGD/SAM/ESAM; SAM-based ones at SAM's rho there."""
    cfg = compose_cfg([f"experiment={name}"])
    ds, _, rest = name.partition("_")
    model, _, method = rest.rpartition("_")
    sam = compose_cfg([f"experiment={ds}_{model}_sam"])
    assert cfg.optimizer.name == method and cfg.experiment_name == f"{ds}_{model}"
    assert (cfg.dataset, cfg.model, cfg.trainer.epochs) == (sam.dataset, sam.model, sam.trainer.epochs)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (sam.optimizer.lr, sam.optimizer.weight_decay)
    if method not in ("msam", "saf", "mesa"):
        assert cfg.optimizer.rho == sam.optimizer.rho


@pytest.mark.parametrize("name", NAMES)
def test_recipe_composes_with_the_paper_values(name):
    ds, _, rest = name.partition("_")
    model, _, method = rest.rpartition("_")
    r = RECIPES[model]
    cfg = compose_cfg([f"experiment={name}"])

    assert (cfg.dataset.name, cfg.model.name, cfg.optimizer.name) == (ds, model, method)
    assert cfg.experiment_name == f"{ds}_{model}"  # one wandb group for the three methods
    assert cfg.dataset.batch_size == r["batch"]
    assert cfg.trainer.epochs == r["epochs"]
    o = cfg.optimizer
    assert (o.base.name, o.lr, o.weight_decay, o.base.momentum, o.base.nesterov) == ("sgd", r["lr"], r["wd"], 0.9, False)
    if method == "sgd":
        assert "rho" not in o
    else:
        assert o.rho == r["rho"] and not o.adaptive
    if method == "esam":
        assert (o.beta, o.gamma) == (r["beta"], r["gamma"])
    t = cfg.trainer
    assert (str(t.scheduler.value), str(t.schedule_per.value), t.warmup_epochs, t.label_smoothing) == \
        ("cosine", "epoch", 0, 0.0)
    aug = cfg.dataset.augment
    if ds == "imagenet":
        assert aug.cutout == 0 and aug.flip
    else:
        assert (aug.crop_padding, aug.flip, aug.cutout) == (4, True, 16)
        authors_recipe_switches(cfg, model, method)


def authors_recipe_switches(cfg, model: str, method: str) -> None:
    """CIFAR recipes run what dydjw9/Efficient_SAM ran (docs/fidelity.md): fp32 (TF32 on CUDA),
    one perturbation per 64 samples, BN statistics from every pass, the authors' SDS rule and
    eps, PyTorch's default init for their ResNet-18."""
    assert str(cfg.trainer.precision.value) == "tf32"
    assert cfg.model.args.get("init") == ("pytorch" if model == "resnet18" else None)
    if method != "sgd":
        o = cfg.optimizer
        assert (o.m, str(o.bn_stats.value)) == (64, "all")
        assert cfg.dataset.batch_size % o.m == 0
    if method == "esam":
        assert (str(cfg.optimizer.selection.value), cfg.optimizer.eps) == ("authors", 1e-7)


def test_fidelity_switches_show_in_the_printed_job_config():
    out = subprocess.run([sys.executable, "-m", "esam.train", "experiment=cifar10_resnet18_esam", "--cfg", "job"],
                         cwd=REPO, capture_output=True, text=True, timeout=120).stdout
    for line in ("precision: tf32", "init: pytorch", "m: 64", "bn_stats: all", "selection: authors"):
        assert line in out


@pytest.mark.parametrize("name", ["cifar10_resnet18_esam", "imagenet_resnet50_sam", "cifar100_pyramidnet110_sgd"])
def test_recipe_builds_one_group_with_weight_decay_on_every_parameter(name):
    cfg = compose_cfg([f"experiment={name}"])
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = build_from_spec(OmegaConf.to_container(cfg.optimizer, resolve=True), model.parameters())
    groups = opt.param_groups
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))
    assert groups[0]["weight_decay"] == cfg.optimizer.weight_decay and groups[0]["nesterov"] is False


def compose_with_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("sweep,params", [
    ("digits", {"optimizer": "sgd,sam,esam", "seed": "0,1,2"}),
    ("paper", {"experiment": "glob([cifar*_sgd,cifar*_sam,cifar*_esam])", "seed": "0,1,2"}),
    ("efficient_sam", {"experiment": "glob([cifar*_resnet18_*,cifar*_wrn28_10_*],exclude=[*_sgd,*_sam,*_esam,"
                                     "*_esam_swp,*_esam_sds])", "seed": "0,1,2"}),
    ("paper_imagenet", {"experiment": "glob([imagenet*_sgd,imagenet*_sam,imagenet*_esam])", "seed": "0"}),
    ("esam_ablation", {"experiment": "cifar10_resnet18_esam", "optimizer.beta": "0.4,0.5,0.6,0.8,1.0",
                       "optimizer.gamma": "0.3,0.5,0.7,1.0", "seed": "0"}),
])
def test_sweep_files_hold_their_grid(sweep, params):
    cfg = compose_with_hydra([f"+sweep={sweep}"])
    assert dict(cfg.hydra.sweeper.params) == params


def test_digits_sweep_is_cpu_sized():
    cfg = compose_with_hydra(["+sweep=digits"])
    assert cfg.dataset.name == "digits" and cfg.experiment_name == "digits"
    assert str(cfg.trainer.precision.value) == "fp32" and cfg.trainer.epochs <= 50


@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launchers_compose(launcher, target):
    h = compose_with_hydra([f"hydra/launcher={launcher}"]).hydra.launcher
    assert h._target_.endswith(target)
    for key in ("timeout_min", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb"):
        assert key in h
    if launcher == "slurm":
        assert "partition" in h and h.max_num_timeout > 0 and h.signal_delay_s >= 60


@pytest.mark.parametrize("target,model,experiment", [
    (f"{ds}-{opt}", m, f"{ds}_{m}_{opt}") for ds, m in GRID for opt in METHODS
] + [("cifar10-sam", "", "cifar10_resnet18_sam"), ("imagenet-esam", "", "imagenet_resnet50_esam")])
def test_make_targets_name_existing_recipes(target, model, experiment):
    # Under `make test` the parent make's MAKEFLAGS/MAKELEVEL would add "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "-o", "install", target, f"MODEL={model}",
                          "SEEDS=0,1,2"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert re.search(rf"esam\.train -m experiment={experiment} seed=0,1,2", line), line
    assert experiment in set(recipes_module.experiment_cells()) | set(FILES)


# The SAM terms a recipe sets once reach every SAM-based method (esam/recipes.py, conf/sam/).
SAM_BASED = ("sam", "esam", "esam_swp", "esam_sds", "looksam", "gsam", "ksam", "latesam", "rst", "aesam")


@pytest.mark.parametrize("option", SAM_BASED)
def test_the_recipes_sam_terms_reach_every_sam_based_method(option):
    cfg = compose_cfg([f"optimizer={option}", "sam.rho=0.123", "sam.m=4", "sam.bn_stats=all", "sam.eps=1e-9"])
    spec = OmegaConf.to_container(cfg.optimizer, resolve=True)
    assert (spec["rho"], spec["m"], str(getattr(spec["bn_stats"], "value", spec["bn_stats"])), spec["eps"]) == \
        (0.123, 4, "all", 1e-9)
    if option == "gsam":  # like-for-like: a constant radius, as SAM's
        assert spec["rho_min"] == 0.123
    opt = build_from_spec(spec, torch.nn.Linear(2, 2).parameters())
    inner = getattr(opt, "inner", opt)
    assert (inner.m, inner.bn_stats) == (4, "all")


@pytest.mark.parametrize("option", ["msam", "saf", "mesa", "sgd"])
def test_methods_without_a_sam_radius_keep_their_own(option):
    """MSAM's rho is on another scale (3.0); SAF, MESA and SGD have none: sam.rho leaves them alone."""
    plain, moved = compose_cfg([f"optimizer={option}"]), compose_cfg([f"optimizer={option}", "sam.rho=0.123"])
    assert plain.optimizer == moved.optimizer


@pytest.mark.parametrize("recipe", ["cifar10_resnet18", "cifar100_wrn28_10", "cifar10_pyramidnet110"])
@pytest.mark.parametrize("option", [o for o in SAM_BASED if o != "sam"])
def test_every_sam_based_method_meets_sam_on_its_terms_in_the_cifar_recipes(recipe, option):
    """`--cfg job` of experiment=<recipe>_<method> shows SAM's m, BN rule, eps and radius."""
    sam = compose_cfg([f"experiment={recipe}_sam"]).optimizer
    other = compose_cfg([f"experiment={recipe}_{option}"]).optimizer
    for key in ("m", "bn_stats", "eps", "rho"):
        assert getattr(other[key], "value", other[key]) == getattr(sam[key], "value", sam[key]), key
    assert (sam.m, str(sam.bn_stats.value)) == (64, "all")
