"""Contracts every registered method keeps, run over esam.optim.METHODS: a new method gets them
for free by registering itself (timm's optimizer tests do the same over its registry)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from omegaconf import OmegaConf

from esam.errors import UserError
from esam.optim import METHODS, SGD, build_from_spec, build_optimizer, get_method, make_closure
from esam.train import CONFIG_DIR
from helpers import compose_cfg
from helpers import batches, convnet, weights

NAMES = sorted(METHODS)
KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, model: torch.nn.Module, seed: int = 0):
    return build_optimizer(name, model.parameters(), model=model, seed=seed, **KW)


def train(opt, model, data, start: int = 0, total: int = 8) -> list[torch.Tensor]:
    losses = []
    for i, (x, y) in enumerate(data):
        opt.set_progress((start + i) / 2, total / 2)  # two steps per "epoch"
        # Dataset indices of the rows (SAF's memory needs them): the two batches of an epoch
        # are samples 0..n-1 and n..2n-1.
        ids = torch.arange(y.shape[0]) + y.shape[0] * ((start + i) % 2)
        losses.append(opt.step(make_closure(model, x, y, sample_ids=ids)))
    return losses


def test_the_paper_methods_are_registered():
    assert {"sgd", "sam", "esam"} <= set(METHODS)
    assert METHODS["sgd"].cls is SGD
    with pytest.raises(UserError, match="unknown method 'esma'; allowed: .*esam"):
        get_method("esma")


@pytest.mark.parametrize("name", NAMES)
def test_method_declares_cost_and_stats(name):
    info = METHODS[name]
    assert info.name == name and info.paper and issubclass(info.cls, torch.optim.Optimizer)
    units = info.expected_cost()
    # K-SAM can cost less than SGD (gradients of a few samples only); nothing costs over 4 SGD steps.
    assert 0.0 < units <= 3.0 * 4 and info.relative_cost() == pytest.approx(units / 3)
    model = convnet()
    opt = make(name, model)
    train(opt, model, batches("convnet", 3, n=8))
    assert opt.last_cost >= 1.0 - 1e-9  # every method at least looks at every sample once
    assert set(opt.last_stats) <= set(info.stats), f"undeclared stats {set(opt.last_stats) - set(info.stats)}"


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_are_the_base_optimizers_and_a_scheduler_drives_them(name):
    model = convnet()
    opt = make(name, model)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    train(opt, model, batches("convnet", 1, n=8))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_run_bit_for_bit(name):
    runs = []
    for _ in range(2):
        model = convnet()
        opt = make(name, model, seed=7)
        train(opt, model, batches("convnet", 4, n=8))
        runs.append(weights(model))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_bit_for_bit(name):
    data = batches("convnet", 8, n=8)
    model = convnet()
    opt = make(name, model, seed=3)
    train(opt, model, data)
    straight, straight_buffers = weights(model), [b.clone() for b in model.buffers()]

    model = convnet()
    opt = make(name, model, seed=3)
    train(opt, model, data[:4])
    with opt.evaluation_weights():  # what the trainer saves: model and optimizer, through a file
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    def resume(load_opt: bool) -> torch.nn.Module:
        model2 = convnet(seed=1)
        model2.load_state_dict(saved["model"])
        opt2 = make(name, model2, seed=99)  # the saved generator state must win over the seed
        if load_opt:
            opt2.load_state_dict(saved["opt"])
        train(opt2, model2, data[4:], start=4)
        return model2

    resumed = resume(load_opt=True)
    for a, b in zip(weights(resumed), straight):
        assert torch.equal(a, b)
    for a, b in zip(resumed.buffers(), straight_buffers):  # BatchNorm statistics too
        assert torch.equal(a, b)
    # Without the optimizer's state (momentum, generators, the method's memory) the run differs:
    # the check above bites.
    assert any(not torch.equal(a, b) for a, b in zip(weights(resume(load_opt=False)), straight))


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_are_one_sentence_user_errors(name):
    model = convnet()
    with pytest.raises(UserError, match=f"optimizer {name}: .*rhoo"):
        build_optimizer(name, model.parameters(), rhoo=0.1, **KW)
    with pytest.raises(UserError, match="unknown base optimizer 'adamm'"):
        build_optimizer(name, model.parameters(), base_optimizer="adamm", **KW)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_has_a_config_that_builds_it(name):
    cfg = compose_cfg([f"optimizer={name}"])
    assert cfg.optimizer.name == name
    spec = OmegaConf.to_container(cfg.optimizer, resolve=True)
    opt = build_from_spec(spec, convnet().parameters())
    assert type(opt) is METHODS[name].cls
    # The config's own hyper-parameters are the ones the registry knows (the cost reads them).
    own = set(spec) - {"name", "label", "lr", "weight_decay", "base"}
    assert own <= set(METHODS[name].hparams) | {"eps"}, f"{own - set(METHODS[name].hparams)} not in hparams"


@pytest.mark.parametrize("base", ["sgd", "nesterov", "adam", "adamw", "rmsprop"])
def test_every_base_optimizer_composes_with_every_method(base):
    for name in NAMES:
        cfg = compose_cfg([f"optimizer={name}", f"optimizer/base={base}"])
        if name == "msam" and base == "rmsprop":  # MSAM perturbs along momentum; rmsprop.yaml has none
            with pytest.raises(UserError, match="momentum"):
                build_from_spec(OmegaConf.to_container(cfg.optimizer, resolve=True), convnet().parameters())
            continue
        opt = build_from_spec(OmegaConf.to_container(cfg.optimizer, resolve=True), convnet().parameters())
        expected = {"nesterov": torch.optim.SGD, "sgd": torch.optim.SGD, "adam": torch.optim.Adam,
                    "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}[base]
        assert type(opt.base_optimizer) is expected
        if base == "nesterov":
            assert opt.param_groups[0]["nesterov"] is True


def test_docs_methods_table_is_generated_from_the_registry():
    """docs/methods.md is what `python scripts/methods_table.py --output docs/methods.md` writes."""
    import importlib.util
    from helpers import REPO

    spec = importlib.util.spec_from_file_location("methods_table", REPO / "scripts" / "methods_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (REPO / "docs" / "methods.md").read_text() == mod.methods_markdown()


# -- the constructor is the one declaration: every key it takes acts, every other is refused ----
# For each method and key: a value other than the default, and (when the key acts only in some
# setting) the other keys that setting needs. A key missing here fails the coverage test below.
ACTING = {
    "sam": {"rho": (0.2, {}), "adaptive": (True, {}), "m": (4, {}), "bn_stats": ("all", {}), "eps": (1.0, {})},
    "esam": {"rho": (0.2, {}), "beta": (0.5, {}), "gamma": (1.0, {}), "adaptive": (True, {}), "m": (4, {}),
             "bn_stats": ("all", {}), "selection": ("authors", {}), "eps": (1.0, {})},
    "looksam": {"rho": (0.2, {}), "k": (2, {}), "alpha": (0.2, {}), "adaptive": (True, {}), "m": (4, {}),
                "bn_stats": ("all", {}), "eps": (1.0, {})},
    "gsam": {"rho": (0.2, {}), "rho_min": (0.04, {"lr_min": 0.01}), "alpha": (0.5, {}), "lr_min": (0.01, {}),
             "adaptive": (True, {}), "m": (4, {}), "bn_stats": ("all", {}), "eps": (1.0, {})},
    "ksam": {"rho": (0.2, {}), "k_frac": (0.5, {}), "k": (3, {}), "adaptive": (True, {}), "m": (4, {}),
             "bn_stats": ("all", {}), "eps": (1.0, {})},
    "msam": {"rho": (0.5, {}), "eps": (1.0, {})},
    "saf": {"lam": (1.0, {"start": 0, "lookback": 1}), "tau": (1.0, {"start": 0, "lookback": 1}),
            "start": (0, {"lookback": 1}), "lookback": (1, {"start": 0})},
    "mesa": {"lam": (2.0, {"start": 0}), "tau": (1.0, {"start": 0}), "start": (0, {}),
             "decay": (0.5, {"start": 0})},
}
_INNER = {"inner": ("esam", {}), "rho": (0.2, {}), "adaptive": (True, {}), "beta": (0.5, {"inner": "esam"}),
          "gamma": (1.0, {"inner": "esam"}), "m": (4, {}), "bn_stats": ("all", {}),
          "selection": ("authors", {"inner": "esam"}), "eps": (1.0, {})}
ACTING["latesam"] = {"start": (0.5, {}), **{k: (v, {"start": 0.0, **c}) for k, (v, c) in _INNER.items()}}
ACTING["rst"] = {"schedule": ("cosine", {"schedule": "linear", "p": 1.0, "p_end": 0.0}), "p": (1.0, {}),
                 "p_end": (1.0, {"schedule": "linear", "p_end": 0.0}),
                 **{k: (v, {"p": 1.0, **c}) for k, (v, c) in _INNER.items()}}
ACTING["aesam"] = {"delta": (0.5, {}), "lambda1": (-20.0, {"lambda2": 10.0}), "lambda2": (10.0, {}),
                   **{k: (v, {"lambda1": -5.0, "lambda2": -5.0, **c}) for k, (v, c) in _INNER.items()}}
CASES = [(name, key) for name in NAMES for key in METHODS[name].hparams if key not in METHODS[name].inert]


def test_every_key_of_every_method_is_covered_or_declared_inert():
    for name in NAMES:
        info = METHODS[name]
        covered = set(ACTING.get(name, {})) | set(info.inert)
        assert covered == set(info.hparams), f"{name}: {set(info.hparams) ^ covered}"
        assert all(why for why in info.inert.values())  # an inert key says why


def _trained_state(name, **kwargs):
    model = convnet()
    opt = build_optimizer(name, model.parameters(), model=model, seed=0, **KW, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)  # GSAM's rho follows the lr
    for i, batch in enumerate(batches("convnet", 4, n=8)):
        train(opt, model, [batch], start=i, total=4)
        sched.step()
    return weights(model) + [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("name,key", CASES)
def test_every_accepted_key_changes_the_update(name, key):
    """No knob is accepted and ignored: set to another value, it changes the weights or the BN buffers."""
    value, context = ACTING[name][key]
    assert value != METHODS[name].hparams[key]
    base = _trained_state(name, **context)
    changed = _trained_state(name, **{**context, key: value})
    assert any(not torch.equal(a, b) for a, b in zip(base, changed)), f"{name}: {key}={value!r} changed nothing"


@pytest.mark.parametrize("name", NAMES)
def test_a_key_the_method_does_not_declare_is_refused_naming_the_keys_it_takes(name):
    own = set(METHODS[name].hparams)
    foreign = next(k for k in ("m", "bn_stats", "beta", "k", "lam") if k not in own) if own != set() else "rho"
    with pytest.raises(UserError) as err:
        build_optimizer(name, convnet().parameters(), **KW, **{foreign: 1})
    msg = str(err.value)
    assert msg.startswith(f"optimizer {name}: unknown key {foreign} (optimizer.{foreign}); allowed: ")
    assert "\n" not in msg and "base_optimizer" in msg and all(k in msg for k in own)


def test_misspelt_base_keyword_names_base_optimizer_among_the_allowed():
    with pytest.raises(UserError, match=r"unknown key base \(optimizer.base\); allowed: .*base_optimizer"):
        build_optimizer("sam", convnet().parameters(), base="adamw", lr=0.1)


def test_sam_based_methods_take_m_and_bn_stats_like_sam():
    """Issue 20.3: every method that takes SAM's ascent step can run on the authors' terms."""
    for name in ("sam", "esam", "looksam", "gsam", "ksam", "latesam", "rst", "aesam"):
        assert {"m", "bn_stats", "rho", "adaptive", "eps"} <= set(METHODS[name].hparams), name


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_yaml_states_only_what_differs_from_the_constructor(name):
    """conf/optimizer/<name>.yaml restates no default: the schema (from the signature) holds them.
    What it does set is the recipe's SAM terms (``${sam.rho}`` ...: one value for every SAM-based
    method, esam/recipes.py), and the composed config carries those."""
    from pathlib import Path

    own = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "optimizer" / f"{name}.yaml"))
    from_recipe = {k: v[len("${sam."):-1] for k, v in own.items()
                   if isinstance(v, str) and v.startswith("${sam.") and v.endswith("}")}
    own = {k: v for k, v in own.items() if k not in from_recipe}
    defaults = METHODS[name].hparams
    restated = {k: v for k, v in own.items() if k in defaults and v == defaults[k]}
    assert not restated, f"conf/optimizer/{name}.yaml restates the constructor's {restated}"
    assert not {"lr", "weight_decay"} & set(own), "lr and weight_decay come from the schema (esam.config)"
    root = compose_cfg([f"optimizer={name}"])
    cfg = root.optimizer
    for k, v in defaults.items():  # and the composed config carries the constructor's values
        expected = root.sam[from_recipe[k]] if k in from_recipe else v
        assert getattr(cfg[k], "value", cfg[k]) == getattr(expected, "value", expected), (name, k)


# -- one registry helper for methods, models and datasets; no import circle ---------------------
def test_the_three_registries_share_one_helper_and_its_sentences():
    from esam.data import DATASETS, build_data
    from esam.models import MODELS, build_model
    from esam.registry import Registry

    assert all(isinstance(r, Registry) for r in (METHODS, MODELS, DATASETS))
    with pytest.raises(UserError, match=r"^unknown dataset 'cifar11'; allowed: cifar10, cifar100, "):
        build_data("cifar11")
    with pytest.raises(UserError, match=r"^unknown model 'resnt18'; allowed: "):
        build_model("resnt18", num_classes=10)


def test_a_misspelt_model_args_key_is_one_sentence():
    from esam.models import build_model

    with pytest.raises(UserError, match=r"^model resnet18: unknown key widht \(model.args.widht\); allowed: init$"):
        build_model("resnet18", num_classes=10, widht=2)


def test_methods_never_import_the_registry():
    """Registration is one visible list in esam/optim/registry.py; the algorithms know nothing of it."""
    from helpers import REPO

    for path in (REPO / "esam" / "optim").glob("*.py"):
        if path.name not in ("registry.py", "__init__.py"):
            assert "esam.optim.registry" not in path.read_text(), f"{path.name} imports the registry"
