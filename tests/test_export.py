"""Export: every point of the continuum to torch.export and ONNX, run back against eager."""

import pytest
import torch

from towerspace import TowerConv2d
from towerspace.export import check_onnx, check_program, export_onnx, export_program
from towerspace.impls import IMPLS
from towerspace.models import xception

TOLERANCE = 1e-5  # float32, same ops in another order

BLOCKS = [
    {"towers": 1},
    {"towers": 4},  # Inception-style
    {"towers": "depthwise"},
    {"towers": 4, "order": "pointwise_first"},
    {"towers": 2, "mid": "bn_relu"},
    {"towers": 8, "mid": "elu", "order": "pointwise_first"},
]


def _random_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so that eval mode is really checked."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


@pytest.mark.parametrize("spec", BLOCKS, ids=lambda s: "-".join(map(str, s.values())))
def test_every_block_exports(spec, tmp_path):
    torch.manual_seed(0)
    block = _random_bn(TowerConv2d(16, 24, **spec))
    example, other = torch.randn(1, 16, 8, 8), torch.randn(3, 16, 8, 8)  # batch is dynamic
    assert check_program(export_program(block, example), block, other) < TOLERANCE
    path = export_onnx(block, example, tmp_path / "block.onnx")
    assert check_onnx(path, block, other) < TOLERANCE


@pytest.mark.parametrize("towers", [1, 4, "depthwise"])
def test_small_xception_exports(towers, tmp_path):
    torch.manual_seed(0)
    model = xception(width=0.125, middle_blocks=1, stem="small", num_classes=10, towers=towers)
    model = _random_bn(model).train()  # export takes an eval copy; the model stays as it was
    example = torch.randn(2, 3, 32, 32)
    program = export_program(model, example)
    assert model.training
    assert check_program(program, model, example) < TOLERANCE
    path = export_onnx(model, example, tmp_path / "xception.onnx")
    assert check_onnx(path, model, torch.randn(4, 3, 32, 32)) < TOLERANCE
    assert model.training


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_every_fixed_impl_exports_as_it_is(impl, tmp_path):
    torch.manual_seed(0)
    block = TowerConv2d(16, 24, towers=4, impl=impl)
    example = torch.randn(2, 16, 8, 8)
    assert check_program(export_program(block, example, impl=None), block, example) < TOLERANCE


def test_auto_is_exported_as_native_and_refused_as_it_is():
    torch.manual_seed(0)
    model = xception(width=0.125, middle_blocks=0, stem="small", num_classes=10, impl="auto")
    example = torch.randn(2, 3, 16, 16)
    program = export_program(model, example)  # impl="native": each block one grouped conv
    convs = [n for n in program.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert len(convs) == 2 + 2 * 10 + 4  # stem, 10 separable convs (k×k + 1×1), 4 shortcuts
    assert model.entry.block2.convs[0].impl == "auto"  # the model itself is untouched
    with pytest.raises(ValueError) as err:
        export_program(model, example, impl=None)
    assert str(err.value) == (
        "entry.block2.convs.0: impl='auto' times kernels at run time and cannot be exported; "
        "export with impl='native' or another fixed impl"
    )
