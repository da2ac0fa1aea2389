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
