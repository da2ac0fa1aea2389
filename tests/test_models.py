"""Every registered model: published parameter count, shapes, gradients, init; timm via Hydra."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from esam.errors import UserError
from esam.models import MODELS, NATIVE_SHAPES, build_model, count_parameters
from esam.models.pyramidnet import PyramidNet
from esam.models.wideresnet import WideResNet

# (classes, published parameters, source). Counts within 1% pass: papers round to 0.1M.
PUBLISHED = {
    "resnet18": (10, 11_173_962, "CIFAR ResNet-18 (3x3 stem, no max-pool) of the ESAM code"),
    "wrn28_10": (10, 36_500_000, "Zagoruyko & Komodakis 2016: WRN-28-10 36.5M"),
    "pyramidnet110": (10, 28_300_000, "Han et al. 2017: PyramidNet-110 (alpha=270) 28.3M"),
    "resnet50": (1000, 25_557_032, "torchvision ResNet50_Weights: 25,557,032"),
    "resnet101": (1000, 44_549_160, "torchvision ResNet101_Weights: 44,549,160"),
}
# Cheap inputs for the forward/backward checks: adaptive pooling lets every model take them,
# and the ImageNet nets need 32 to survive their 32x downsampling.
SMALL_SIDE = {"resnet50": 32, "resnet101": 32, "timm": 32}


@functools.cache
def native_model(name: str) -> nn.Module:
    """One instance per model at its native class count and channels, shared by the tests (building is slow)."""
    shape = NATIVE_SHAPES[name]
    torch.manual_seed(0)
    return build_model(name, num_classes=shape.num_classes, in_channels=shape.input_size[0])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_the_published_figure(name):
    num_classes, published, source = PUBLISHED[name]
    assert NATIVE_SHAPES[name].num_classes == num_classes
    params = count_parameters(native_model(name))
    assert params == pytest.approx(published, rel=0.01), f"{name}: {params:,} vs {source}"


def test_every_registered_model_has_a_native_shape_and_a_published_count_or_is_generic():
    # Only the package's own models: tests may register helpers of their own (tests/_ddp_entry.py).
    ours = {name for name, fn in MODELS.items() if fn.__module__.startswith("esam.models")}
    assert ours <= set(NATIVE_SHAPES)
    assert ours - set(PUBLISHED) == {"mlp", "resnet_digits", "timm"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_on_a_batch_of_two(name):
    model, shape = native_model(name), NATIVE_SHAPES[name]
    side = SMALL_SIDE.get(name, 8)
    out = model(torch.randn(2, shape.input_size[0], side, side))
    assert out.shape == (2, shape.num_classes)
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
    model.zero_grad(set_to_none=True)
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"


@pytest.mark.parametrize("name", ["resnet18", "wrn28_10", "pyramidnet110", "resnet50"])
def test_stem_follows_in_channels(name):
    model = build_model(name, num_classes=3, in_channels=1).eval()
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert stem.in_channels == 1
    if name == "resnet50":  # the one whose stem is swapped after building: check it runs
        with torch.no_grad():
            assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_pyramidnet_widens_by_alpha_over_54_basic_blocks():
    model = native_model("pyramidnet110")
    blocks = list(model.layers)
    assert len(blocks) == 54
    assert [b.conv1.out_channels for b in blocks][:3] == [21, 26, 31]  # 16 + 270/54 per block
    assert model.fc.in_features == 16 + 270


def test_pyramidnet_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    # Shallow and narrow, for speed; every block still zero-pads its shortcut.
    model = PyramidNet(depth=20, alpha=24, num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        got = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_wideresnet_layout_and_dropout():
    wrn = native_model("wrn28_10")
    assert len(wrn.layers) == 12 and wrn.fc.in_features == 640
    assert all(b.dropout == 0 for b in wrn.layers)
    assert all(b.dropout == 0.3 for b in build_model("wrn28_10", num_classes=10, dropout=0.3).layers)
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=1, num_classes=10, dropout=0.3)  # small, same blocks
    x = torch.randn(2, 3, 8, 8)
    assert not torch.equal(model(x), model(x))  # dropout active in training
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", ["wrn28_10", "pyramidnet110", "resnet50"])
def test_kaiming_fan_out_init(name):
    model = native_model(name)
    # The widest 3x3 conv has enough weights for a tight estimate of the std.
    conv = max((m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)),
               key=lambda m: m.weight.numel())
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((b.weight == 1).all() and (b.bias == 0).all()) for b in bns)


def test_timm_model_from_the_config_takes_an_sgd_step(compose_train):
    import timm

    cfg = compose_train(["model=timm", "model.args.model_name=resnet18"]).model
    assert (cfg.name, cfg.label, cfg.args.model_name) == ("timm", "resnet18", "resnet18")
    torch.manual_seed(0)
    model = build_model(cfg.name, num_classes=10, in_channels=3, **cfg.args)
    assert isinstance(model, timm.models.ResNet)
    assert count_parameters(model) == count_parameters(timm.create_model("resnet18", num_classes=10))

    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 9]))
    loss.backward()
    optimizer.step()
    assert loss.isfinite()
    # timm zero-initialises each block's last BN scale, so some gradients are exactly zero.
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.grad.any()]
    assert len(moved) >= 20 and all(moved)
    assert not torch.equal(before[-2], model.fc.weight)


def test_timm_model_name_follows_the_override(compose_train):
    cfg = compose_train(["model=timm", "model.args.model_name=resnet10t"]).model
    assert (cfg.label, cfg.args.model_name) == ("resnet10t", "resnet10t")
    assert build_model(cfg.name, num_classes=5, **cfg.args).default_cfg["architecture"] == "resnet10t"


def test_unknown_timm_name_is_a_user_error():
    with pytest.raises(UserError, match="'resnet_nonexistent' is not a timm model"):
        build_model("timm", num_classes=10, model_name="resnet_nonexistent")


@pytest.mark.parametrize("group", ["wrn28_10", "pyramidnet110", "resnet50", "resnet101"])
def test_model_configs_compose_to_their_builders(compose_train, group):
    cfg = compose_train([f"model={group}"]).model
    assert cfg.name == group and cfg.name in MODELS


def test_model_table_counts_flops_per_image_by_hand():
    from esam.models.summary import measure, model_table

    # resnet_digits on 1x8x8: stem 1->32 at 8x8, block 32->32 at 8x8 (two 3x3 convs),
    # block 32->64 at 4x4 (two 3x3 convs and a 1x1 projection), fc 64->10. In multiply-adds:
    macs = 32 * 9 * 64 + 2 * 32 * 32 * 9 * 64 + (32 * 64 * 9 + 64 * 64 * 9 + 32 * 64) * 16 + 64 * 10
    stats = measure("resnet_digits")
    assert (stats.parameters, stats.flops) == (77_290, 2 * macs)
    table = model_table(["resnet_digits"]).splitlines()
    assert table[0].startswith("| model |") and len(table) == 3
    assert table[2] == f"| resnet_digits | 1×8×8 | 10 | 77,290 | {2 * macs / 1e9:.3f} | {macs / 1e9:.3f} |"


def test_resnet18_init_switch_gives_the_authors_default_init():
    """model.args.init=pytorch keeps PyTorch's layer init (the ESAM authors' model/resnet.py):
    conv weight norm 40.0 at init vs 87.7 with our Kaiming fan_out default."""
    def conv_norm(init: str) -> float:
        torch.manual_seed(0)
        m = build_model("resnet18", num_classes=10, init=init)
        return float(torch.sqrt(sum((p ** 2).sum() for p in m.parameters() if p.ndim == 4)))

    assert conv_norm("kaiming") == pytest.approx(87.7, abs=0.1)
    assert conv_norm("pytorch") == pytest.approx(40.0, abs=0.1)
    with pytest.raises(UserError, match="model.args.init='xavier' is not one of kaiming, pytorch"):
        build_model("resnet18", num_classes=10, init="xavier")
