"""Pretrained depthwise weights: timm's legacy_xception mapped in, and function-preserving inits."""

from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch

from towerspace import config
from towerspace.models import build_model, xception
from towerspace.models.pretrained import (
    from_timm_xception,
    init_from_depthwise,
    load_pretrained,
)

REPO = Path(__file__).resolve().parent.parent
RELATIVE = 1e-5  # float32: the same sums in another order (measured: below 1e-6)
SMALL = {"width": 0.125, "middle_blocks": 1, "stem": "small", "num_classes": 10}


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics and affines: the eval-mode function depends on all of them."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2, generator=generator)
            module.running_var.uniform_(0.01, 1.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.normal_(0, 0.2, generator=generator)
    return model.eval()


@torch.no_grad()
def _max_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Max absolute difference of two models' outputs, and the outputs' scale."""
    out = a.eval()(x)
    return (out - b.eval()(x)).abs().max().item(), out.abs().max().item()


@pytest.fixture(scope="module")
def timm_xception():
    torch.manual_seed(0)
    return _randomize(timm.create_model("legacy_xception", pretrained=False))


def test_timm_legacy_xception_maps_exactly(timm_xception, tmp_path):
    state = timm_xception.state_dict()
    renamed = from_timm_xception(state)
    model = xception().eval()
    assert len(state) == len(renamed) == len(model.state_dict()) == 276
    assert set(renamed) == set(model.state_dict())
    torch.save(state, tmp_path / "legacy_xception.pt")
    load_pretrained(model, tmp_path / "legacy_xception.pt")  # a path, loaded weights_only
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-5}
    x = torch.randn(1, 3, 96, 96)  # the same layers as at 299 px (a 3×3 map before pooling)
    with torch.no_grad():
        expected = timm_xception(x)
        ours = model(x)
        keras_eps = load_pretrained(xception().eval(), state, timm_bn_eps=None)(x)  # keeps 1e-3
    scale = expected.abs().max().item()
    assert (ours - expected).abs().max().item() <= RELATIVE * scale
    assert (keras_eps - expected).abs().max().item() > 1e-2 * scale  # why the eps is set


def test_cadene_layout_is_read_too(timm_xception):
    state = timm_xception.state_dict()
    cadene = {k.replace("fc.", "last_linear."): v for k, v in state.items()}
    cadene = {k: v[:, :, 0, 0] if "pointwise" in k else v for k, v in cadene.items()}
    renamed, expected = from_timm_xception(cadene), from_timm_xception(state)
    assert set(renamed) == set(expected)
    assert all(torch.equal(renamed[k], expected[k]) for k in expected)


def test_a_state_dict_that_does_not_fit_is_refused_in_one_line(timm_xception):
    with pytest.raises(ValueError) as err:
        load_pretrained(xception(middle_blocks=7), timm_xception.state_dict())
    assert str(err.value) == (
        "state dict does not fit the model: 0 missing [], 21 unexpected "
        "[middle.block12.convs.0.spatial.weight, middle.block12.convs.0.pointwise.weight, "
        "middle.block12.norms.0.weight, middle.block12.norms.0.bias (+17 more)]"
    )


@pytest.fixture(scope="module")
def depthwise():
    torch.manual_seed(1)
    return _randomize(xception(**SMALL, towers="depthwise"), seed=1)


@pytest.mark.parametrize(
    "spec",
    [{"towers": 1}, {"towers": 4}, {"towers": 8}, {"towers": 2, "overrides": {"middle": 8}}],
    ids=["1", "4", "8", "2-middle-8"],
)
def test_fewer_towers_start_as_the_depthwise_function(depthwise, spec):
    model = init_from_depthwise(xception(**SMALL, **spec), depthwise.state_dict())
    diff, scale = _max_diff(depthwise, model, torch.randn(2, 3, 32, 32))
    assert scale > 0.1 and diff <= RELATIVE * scale


def test_pointwise_first_with_a_mid_op_is_preserved_too():
    arch = {**SMALL, "order": "pointwise_first", "mid": "bn_relu"}
    source = _randomize(xception(**arch, towers="depthwise"), seed=2)
    model = init_from_depthwise(xception(**arch, towers=4), source.state_dict())
    diff, scale = _max_diff(source, model, torch.randn(2, 3, 32, 32))
    assert scale > 0.1 and diff <= RELATIVE * scale


def test_any_finer_source_works_and_a_coarser_one_is_refused():
    source = _randomize(xception(**SMALL, towers=8), seed=3)
    model = init_from_depthwise(xception(**SMALL, towers=4), source.state_dict())
    diff, scale = _max_diff(source, model, torch.randn(2, 3, 32, 32))
    assert diff <= RELATIVE * scale
    with pytest.raises(ValueError) as err:
        init_from_depthwise(xception(**SMALL, towers="depthwise"), model.state_dict())
    assert str(err.value) == (
        "entry.block2.convs.0.spatial.weight: a kernel at 4 towers cannot start a layer at 8 "
        "towers (the model's tower count must divide the source's)"
    )


def test_different_widths_are_refused(depthwise):
    with pytest.raises(ValueError) as err:
        init_from_depthwise(xception(**{**SMALL, "width": 0.25}, towers=4), depthwise.state_dict())
    assert str(err.value) == (
        "109 tensors differ in shape from the source [stem.0.weight (4, 3, 3, 3) vs "
        "(8, 3, 3, 3), stem.1.weight (4,) vs (8,) (+107 more)]: widths, classes and input "
        "channels must be equal (budget matching changes widths: model.match must be 'none')"
    )


def _experiment(sets: list[str]) -> config.ExperimentConfig:
    base = ["model.width=0.125", "model.middle_blocks=1", "model.match=none"]
    return config.load_experiment(REPO / "experiments/digits_continuum.yaml", base + sets)


def test_the_sweep_option_starts_every_point_from_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the path is relative to the working directory
    sizes = {"in_chans": 1, "num_classes": 10, "image_size": 16}  # digits
    cfg = _experiment(["model.towers=depthwise"])
    source = _randomize(build_model(cfg.model, **sizes), seed=4)
    torch.save(source.state_dict(), "depthwise.pt")
    for towers in (1, 4):
        cfg = _experiment([f"model.towers={towers}", "model.init_from=depthwise.pt"])
        assert cfg.model.init_from == "depthwise.pt"
        model = build_model(cfg.model, **sizes)
        diff, scale = _max_diff(source, model, torch.randn(2, 1, 16, 16))
        assert scale > 0.1 and diff <= RELATIVE * scale
    matched = replace(cfg.model, match="params")
    with pytest.raises(ValueError) as err:
        build_model(matched, **sizes)
    assert str(err.value) == (
        "init_from needs match 'none' (budget matching changes widths), got match 'params'"
    )
    with pytest.raises(ValueError) as err:
        build_model(replace(cfg.model, init_from="missing.pt"), **sizes)
    assert str(err.value) == "init_from missing.pt: 'missing.pt' is not a file"
