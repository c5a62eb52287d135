"""towerize(): real torchvision networks on the tower continuum, on tiny inputs."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from towerspace import TowerConv2d, regroup_weight, tower_complexity, towerize
from towerspace.config import ConfigError, load_experiment
from towerspace.impls import expand_grouped
from towerspace.models import ModelConfig, build_model, complexity, xception
from towerspace.models.builders import torchvision_builder
from towerspace.towers import realized_towers

REPO = Path(__file__).resolve().parent.parent
TINY = (2, 3, 32, 32)


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def _mobilenet_v2() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(weights=None, num_classes=10)


@pytest.mark.parametrize("make", [_resnet18, _mobilenet_v2], ids=["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("towers", [1, 4, "depthwise"])
def test_forward_and_backward_at_every_tower_count(make, towers):
    model, report = towerize(make(), towers)
    out = model(torch.randn(TINY))
    out.square().mean().backward()
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    blocks = [m for m in model.modules() if isinstance(m, TowerConv2d)]
    assert len(blocks) == (report["kind"] != "skipped").sum() > 0
    assert all(b.spatial.weight.grad is not None for b in blocks)
    for b in blocks:
        assert b.towers == (b.spatial_channels if towers == "depthwise" else towers)


def test_the_input_model_is_never_changed():
    original = _resnet18()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    towerize(original, 4)
    assert not any(isinstance(m, TowerConv2d) for m in original.modules())
    assert all(torch.equal(v, before[k]) for k, v in original.state_dict().items())


def test_resnet18_report_rows():
    _, report = towerize(_resnet18(), 4)
    assert len(report) == 20 and report["kind"].value_counts().to_dict() == {
        "regular": 16,
        "skipped": 4,
    }
    skipped = report[report["kind"] == "skipped"].set_index("layer")["reason"].to_dict()
    one_by_one = "1×1 conv: no spatial extent to split into towers"
    assert skipped == {
        "conv1": "3 input channels < min_channels=8 (an image stem)",
        "layer2.0.downsample.0": one_by_one,
        "layer3.0.downsample.0": one_by_one,
        "layer4.0.downsample.0": one_by_one,
    }
    row = report.set_index("layer").loc["layer2.0.conv1"]
    assert (row["in_channels"], row["out_channels"], row["spatial_channels"]) == (64, 128, 64)
    assert (row["towers"], row["group_width"], row["exact"]) == (4, 16, False)
    assert row["reason"] == "fresh init: a dense kernel carries exactly only at 1 tower"
    assert row["conv"].startswith("Conv2d(64, 128, kernel_size=(3, 3), stride=(2, 2)")


def test_mobilenet_v2_report_absorbs_the_pointwise_conv_and_what_lies_between():
    model, report = towerize(_mobilenet_v2(), "depthwise")
    assert report["kind"].value_counts().to_dict() == {"skipped": 18, "separable": 17}
    row = report.set_index("layer").loc["features.2.conv.1.0"]
    assert row["absorbed"] == "features.2.conv.1.1, features.2.conv.1.2, features.2.conv.2"
    assert (row["in_channels"], row["out_channels"], row["towers"]) == (96, 24, 96)
    assert row["exact"] and row["reason"] == "exact: 96 groups embedded in 96 towers"
    block = model.features[2].conv[1][0]
    assert isinstance(block.between[0], nn.BatchNorm2d) and isinstance(block.between[1], nn.ReLU6)
    assert isinstance(model.features[2].conv[2], nn.Identity)  # the 1×1 lives in the block now


@pytest.mark.parametrize("make", [_resnet18, _mobilenet_v2], ids=["resnet18", "mobilenet_v2"])
def test_parameters_by_formula(make):
    model, _ = towerize(make(), 4)
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, TowerConv2d)}
    formula = sum(
        tower_complexity(b.in_channels, b.out_channels, 8, 8, kernel_size=b.kernel_size,
                         stride=b.stride, towers=b.towers, order=b.order,
                         bias=b.bias is not None).params
        for b in blocks.values()
    )  # fmt: skip
    block_params = {id(p) for b in blocks.values() for c in (b.spatial, b.pointwise)
                    for p in c.parameters()}  # fmt: skip
    untouched = sum(p.numel() for p in model.parameters() if id(p) not in block_params)
    total = sum(p.numel() for p in model.parameters())
    assert formula + untouched == total
    assert complexity(model, 32).params == total


def test_resnet18_at_one_tower_is_the_original_function():
    original = _resnet18().eval()
    # pointwise-first carries a kernel exactly when in <= out, true of every ResNet conv
    model, report = towerize(original, 1, order="pointwise_first")
    assert report[report["kind"] == "regular"]["exact"].all()
    x = torch.randn(TINY)
    with torch.no_grad():
        assert (model.eval()(x) - original(x)).abs().max() < 1e-5
    # spatial-first is exact where out <= in: 13 of the 16 (not the three widening convs)
    _, report = towerize(original, 1)
    regular = report[report["kind"] == "regular"]
    assert regular["exact"].sum() == 13
    assert set(regular.loc[~regular["exact"], "reason"]) == {
        "fresh init: spatial_first carries a kernel only when out <= in"
    }


def test_a_regular_conv_with_bias_carries_exactly():
    conv = nn.Conv2d(16, 12, 3, stride=2, padding=2, dilation=2)
    model, report = towerize(nn.Sequential(conv), 1)
    x = torch.randn(2, 16, 11, 11)
    assert report["exact"].item() and (model(x) - conv(x)).abs().max() < 1e-5


def test_mobilenet_v2_at_depthwise_is_the_original_function():
    original = _mobilenet_v2().eval()
    model, _ = towerize(original, "depthwise")
    x = torch.randn(TINY)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), original(x))


def test_retowering_from_depthwise_keeps_the_function():
    depthwise, _ = towerize(_mobilenet_v2().eval(), "depthwise")
    four, report = towerize(depthwise, 4)
    assert set(report["kind"]) == {"tower", "skipped"} and report["exact"].dropna().all()
    assert {r["towers"] for r in realized_towers(four).values()} == {4}
    x = torch.randn(TINY)
    with torch.no_grad():
        assert (four.eval()(x) - depthwise.eval()(x)).abs().max() < 1e-5


def test_regroup_weight_embeds_block_diagonally():
    weight = torch.randn(12, 3, 3, 3)  # 4 towers of 3 channels
    two = regroup_weight(weight, 4, 2)
    assert two.shape == (12, 6, 3, 3)
    assert torch.equal(expand_grouped(two, 2), expand_grouped(weight, 4))
    assert regroup_weight(weight, 4, 12).shape == (12, 1, 3, 3)  # a projection: not exact
    with pytest.raises(ValueError, match=r"^to_towers=5 does not divide the kernel's 12 channels$"):
        regroup_weight(weight, 4, 5)


def test_refusals():
    with pytest.raises(ValueError) as err:
        towerize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv1d(8, 8, 3)))
    assert str(err.value) == (
        "towerize: no convolution of Sequential can take towers (3 looked at, all skipped)"
    )
    with pytest.raises(ValueError) as err:
        towerize(_resnet18(), 4, match="params")
    assert str(err.value) == (
        "match='params' needs a builder `width -> nn.Module`, got a ResNet instance (it has no "
        "width to solve)"
    )
    with pytest.raises(ValueError, match=r"^tower override 'layer9' matches no tower site"):
        towerize(_resnet18(), 4, overrides={"layer9": 1})


def test_skip_reasons():
    net = nn.Sequential(
        nn.Conv2d(16, 16, (1, 3)), nn.Conv2d(16, 16, 3, padding="same", dilation=1),
        nn.Conv2d(16, 16, 4, padding="same"), nn.Conv2d(16, 32, 3, groups=16),
        nn.Conv2d(32, 32, 3, groups=4), nn.Conv2d(32, 32, 3, padding_mode="reflect", padding=1),
        nn.ConvTranspose2d(32, 32, 3),
    )  # fmt: skip
    _, report = towerize(net, 2)
    assert report["reason"].tolist() == [
        "non-square kernel_size (1, 3)",
        "fresh init: a dense kernel carries exactly only at 1 tower",
        "padding='same' pads unevenly (k=4, d=1)",
        "depthwise conv changes channels (16 → 32)",
        "grouped (groups=4) conv with no 1×1 conv after it (through channel-preserving ops)",
        "padding_mode='reflect' (only zeros)",
        "ConvTranspose2d: only nn.Conv2d takes towers",
    ]


def test_budget_matching_on_mobilenet_v2():
    builder = torchvision_builder("torchvision.mobilenet_v2", in_chans=3, num_classes=10,
                                  small_stem=False, round_nearest=1)  # fmt: skip
    model, _ = towerize(builder, 1, match="params", image_size=32)
    budget = model.budget
    assert budget["budget_target"] == 2_236_682  # MobileNetV2 at depthwise, 10 classes
    assert abs(budget["budget_error"]) <= 0.02 and 0.1 < budget["solved_width"] < 0.5
    assert sum(p.numel() for p in model.parameters()) == budget["budget_achieved"]


def test_match_on_resnet_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        load_experiment(REPO / "experiments/digits_resnet18.yaml", ["model.match=params"])
    assert str(err.value) == (
        f"{REPO}/experiments/digits_resnet18.yaml: model.match: 'params': torchvision.resnet18 "
        f"has no width knob to match a budget with (allowed: none)"
    )
    with pytest.raises(ConfigError) as err:  # a width it would silently ignore is refused too
        load_experiment(REPO / "experiments/digits_resnet18.yaml", ["model.width=0.5"])
    assert str(err.value) == (
        f"{REPO}/experiments/digits_resnet18.yaml: model.width: 0.5: torchvision.resnet18 has "
        f"no width knob (allowed: 1)"
    )


def test_model_builder_errors(tmp_path):
    exp = REPO / "experiments/digits_resnet18.yaml"
    with pytest.raises(ConfigError, match=r"model.builder: missing; model.name 'custom' needs"):
        load_experiment(exp, ["model.name=custom"])
    with pytest.raises(ConfigError, match=r"model.builder: 'net.py' is not 'path/to/file.py:fu"):
        load_experiment(exp, ["model.name=custom", "model.builder=net.py"])
    with pytest.raises(ConfigError, match=r"model.builder: 'nope.py:build': no such file nope.py"):
        load_experiment(exp, ["model.name=custom", "model.builder=nope.py:build"])
    with pytest.raises(ConfigError) as err:
        load_experiment(exp, ["model.name=resnet18"])
    assert str(err.value) == (
        f"{exp}: model.name: 'resnet18' is not allowed (allowed: xception, torchvision.resnet18, "
        f"torchvision.resnet50, torchvision.mobilenet_v2, torchvision.mobilenet_v3_small, "
        f"torchvision.mobilenet_v3_large, custom)"
    )


def test_build_model_sizes_torchvision_networks_for_the_data():
    cfg = ModelConfig(name="torchvision.resnet18", towers=4)
    model = build_model(cfg, in_chans=1, num_classes=7, image_size=16)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.Identity) and model.fc.out_features == 7
    big = build_model(cfg, in_chans=1, num_classes=7, image_size=224)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    mobile = ModelConfig(name="torchvision.mobilenet_v3_small", towers=4, width=0.5)
    net = build_model(mobile, in_chans=1, num_classes=7, image_size=16)
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    with torch.device("meta"):  # the sweep's preflight
        build_model(mobile, in_chans=3, num_classes=10, image_size=16)


def test_complexity_counts_any_model_and_keeps_xceptions_formula():
    model, _ = towerize(_resnet18(), "depthwise")
    model.train()
    cost = complexity(model, 32)
    assert model.training and cost.training_flops == 3 * cost.flops
    assert cost.flops == 13_736_448  # FlopCounterMode, stem and all convs and the classifier
    small = xception(width=0.125, middle_blocks=1, stem="small", num_classes=10)
    assert complexity(small, 32) == small.complexity(32)


def test_custom_builder_from_a_file():
    spec = importlib.util.spec_from_file_location(
        "example", REPO / "examples/custom_architecture.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cfg = ModelConfig(name="custom", builder=f"{REPO}/examples/custom_architecture.py:build",
                      towers=4, match="params", width=0.5)  # fmt: skip
    model = build_model(cfg, in_chans=1, num_classes=10, image_size=16)
    assert {r["towers"] for r in realized_towers(model).values()} == {4}
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert abs(model.budget["budget_error"]) < 0.1
    assert isinstance(example.build(in_chans=1, num_classes=3, image_size=8, width=1.0), nn.Module)


@pytest.mark.slow
def test_resnet18_sweep_on_digits(local_ray, tmp_path):
    from towerspace import results
    from towerspace.sweep import run_sweep

    sets = [
        "train.epochs=1",
        "train.max_steps=2",
        "space.params={model.towers: {grid: [1, depthwise]}}",
    ]
    cfg = load_experiment(REPO / "experiments/digits_resnet18.yaml", sets)
    outcome = run_sweep(cfg, storage=tmp_path)
    table = results.load(outcome.results_path).set_index("towers")
    assert outcome.statuses == {"finished": 2}
    # digits: 1 input channel (synthetic smoke data has 3: 1,152 more stem weights)
    assert table.loc["1", "params"] == 11_619_274 and table.loc["depthwise", "params"] == 1_438_474


@pytest.mark.slow
def test_the_custom_architecture_example_runs_in_smoke_mode(local_ray, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "example", REPO / "examples/custom_architecture.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(REPO)
    assert example.main(["--smoke", "--storage", str(tmp_path)]) == 0
    assert (tmp_path / "custom_architecture" / "results.parquet").is_file()


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_small", "mobilenet_v3_large"])
def test_the_other_torchvision_networks_train_on_the_continuum(name):
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    model, report = towerize(original, 4)
    out = model.train()(torch.randn(TINY))
    out.square().mean().backward()
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    kinds = report["kind"].value_counts().to_dict()
    if name == "resnet50":  # the 16 bottlenecks' 3x3 convs; the stem and every 1x1 left alone
        assert kinds == {"regular": 16, "skipped": 37}
    else:  # every depthwise conv with the 1x1 after it (through BN, activation, SE): one block
        pairs = [m for m in original.modules()
                 if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]  # fmt: skip
        assert kinds["separable"] == len(pairs)
        depthwise, _ = towerize(original, "depthwise")
        x = torch.randn(TINY)
        with torch.no_grad():  # at depthwise the weights carry: the very same function
            assert torch.allclose(depthwise.eval()(x), original(x), atol=1e-5)


def test_a_towerized_xception_is_costed_by_its_layers_not_by_its_old_formula():
    from towerspace.models.cost import forward_flops

    depthwise = xception(towers="depthwise", width=0.25, middle_blocks=1, input_size=32)
    assert complexity(depthwise, 32).params == 1_130_144  # its own formula
    regular, _ = towerize(depthwise, 1)  # its layers now differ from what its formula says
    cost = complexity(regular, 32)
    assert cost.params == sum(p.numel() for p in regular.parameters()) == 4_951_744
    assert cost.flops == forward_flops(regular, 32) == 41_656_624
