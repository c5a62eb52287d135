"""TowerConv2d: equivalences by weights, exact costs, and the errors users see."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from towerspace import TowerConv2d, tower_complexity
from towerspace.towers import divisors

ORDERS = ("spatial_first", "pointwise_first")
SHAPES = ((8, 16), (12, 12), (16, 8))  # (in, out): the spatial conv sees in or out channels


def _cases():
    for c_in, c_out in SHAPES:
        for order in ORDERS:
            spatial = c_in if order == "spatial_first" else c_out
            for towers in divisors(spatial):
                yield c_in, c_out, order, towers


@pytest.mark.parametrize(("c_in", "c_out", "order", "towers"), list(_cases()))
@pytest.mark.parametrize("stride", [1, 2])
def test_as_conv2d_equals_block(c_in, c_out, order, towers, stride):
    torch.manual_seed(towers)
    block = TowerConv2d(c_in, c_out, 3, stride=stride, towers=towers, order=order, bias=True)
    nn.init.normal_(block.bias)
    block = block.double()
    x = torch.randn(2, c_in, 9, 9, dtype=torch.float64)
    dense = block.as_conv2d()
    assert isinstance(dense, nn.Conv2d) and dense.groups == 1
    assert dense.weight.shape == (c_out, c_in, 3, 3)
    torch.testing.assert_close(dense(x), block(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dilation", [1, 2])
def test_as_conv2d_keeps_dilation(dilation):
    block = TowerConv2d(8, 8, 3, dilation=dilation, towers=2).double()
    x = torch.randn(1, 8, 11, 11, dtype=torch.float64)
    torch.testing.assert_close(block.as_conv2d()(x), block(x))


def test_one_tower_is_a_regular_conv_after_a_pointwise_conv():
    # the paper: "a regular convolution (preceded by a 1x1 convolution)"
    torch.manual_seed(0)
    block = TowerConv2d(6, 10, 3, towers="regular", order="pointwise_first")
    ref = nn.Sequential(
        nn.Conv2d(6, 10, 1, bias=False), nn.Conv2d(10, 10, 3, padding=1, bias=False)
    )
    ref[0].weight.data.copy_(block.pointwise.weight)
    ref[1].weight.data.copy_(block.spatial.weight)
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(block(x), ref(x))
    assert block.towers == 1 and block.regime == "regular"


def test_depthwise_is_a_depthwise_separable_conv():
    torch.manual_seed(0)
    block = TowerConv2d(6, 10, 3, towers="depthwise")
    ref = nn.Sequential(
        nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.Conv2d(6, 10, 1, bias=False)
    )
    ref[0].weight.data.copy_(block.spatial.weight)
    ref[1].weight.data.copy_(block.pointwise.weight)
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(block(x), ref(x))
    assert (block.towers, block.group_width, block.regime) == (6, 1, "depthwise")


def test_group_width_sets_towers():
    block = TowerConv2d(32, 64, towers=None, group_width=8)
    assert (block.towers, block.group_width, block.regime) == (4, 8, "inception")
    assert block.spatial.groups == 4
    assert TowerConv2d(32, 64, group_width=8).towers == 4  # group_width wins over the default


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mid", ["none", "relu", "elu", "bn", "bn_relu"])
@pytest.mark.parametrize("towers", [1, 4, "depthwise"])
@pytest.mark.parametrize("stride", [1, 2])
def test_complexity_matches_numel_and_flop_counter(order, mid, towers, stride):
    block = TowerConv2d(16, 24, 3, stride=stride, towers=towers, order=order, mid=mid, bias=True)
    cost = block.complexity(10, 10)
    assert cost.params == sum(p.numel() for p in block.parameters())
    x = torch.randn(1, 16, 10, 10)
    with FlopCounterMode(display=False) as counter:
        out = block(x)
    assert cost.flops == counter.get_total_flops()
    assert (cost.height, cost.width) == tuple(out.shape[2:])
    assert cost.training_flops == 3 * cost.flops
    assert cost == tower_complexity(
        16, 24, 10, 10, stride=stride, towers=block.towers, order=order, mid=mid, bias=True
    )


def test_complexity_by_hand():
    # 728 channels at 19×19, 4 towers, spatial first: 728·182·9 + 728·728 weights
    cost = tower_complexity(728, 728, 19, 19, towers=4)
    assert cost.params == 728 * 182 * 9 + 728 * 728 == 1_722_448
    assert cost.flops == 2 * 1_722_448 * 19 * 19


def test_forward_backward_every_tower_count():
    for towers in divisors(12):
        block = TowerConv2d(12, 12, towers=towers, mid="bn_relu")
        x = torch.randn(2, 12, 6, 6, requires_grad=True)
        block(x).square().mean().backward()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"towers": 3},
            "towers=3 does not divide the 16 channels of the spatial convolution; "
            "valid tower counts: 1, 2, 4, 8, 16",
        ),
        (
            {"towers": 0},
            "towers=0 does not divide the 16 channels of the spatial convolution; "
            "valid tower counts: 1, 2, 4, 8, 16",
        ),
        (
            {"group_width": 6},
            "group_width=6 does not divide the 16 channels of the spatial convolution; "
            "valid group widths: 1, 2, 4, 8, 16",
        ),
        ({"group_width": 0}, "group_width must be a positive int, got 0"),
        ({"towers": "many"}, "towers must be an int, 'regular' or 'depthwise', got 'many'"),
        ({"towers": 2.0}, "towers must be an int, 'regular' or 'depthwise', got 2.0"),
        (
            {"order": "depth_first"},
            "order='depth_first' is not one of: spatial_first, pointwise_first",
        ),
        ({"mid": "gelu"}, "mid='gelu' is not one of: none, relu, elu, bn, bn_relu"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as err:
        TowerConv2d(16, 24, **kwargs)
    assert str(err.value) == message


def test_pointwise_first_splits_the_output_channels():
    assert TowerConv2d(16, 24, towers=3, order="pointwise_first").towers == 3  # 3 divides 24
    with pytest.raises(ValueError, match="towers=3 does not divide the 16 channels"):
        TowerConv2d(16, 24, towers=3, order="spatial_first")


def test_as_conv2d_refuses_a_nonlinear_block():
    with pytest.raises(ValueError, match=r"as_conv2d\(\) needs mid='none' \(a linear block\)"):
        TowerConv2d(8, 8, mid="relu").as_conv2d()


@pytest.mark.parametrize("towers", [1, 4, 16, 64])
def test_training_flops_are_three_forwards_where_the_upstream_counter_overcounts(towers):
    block = TowerConv2d(64, 64, towers=towers)
    cost = block.complexity(16, 16)
    x = torch.randn(1, 64, 16, 16, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        block(x)
    assert cost.flops == forward.get_total_flops()
    with FlopCounterMode(display=False) as both:
        block(x).sum().backward()
    # grad-input and grad-weight of each conv cost one forward each, by hand:
    spatial = 2 * 64 * (64 // towers) * 9 * 16 * 16
    pointwise = 2 * 64 * 64 * 16 * 16
    assert cost.training_flops == 3 * (spatial + pointwise)
    # torch 2.14 counts one of the grouped conv's two gradients as a dense conv: groups x too high
    upstream_extra = (towers - 1) * spatial
    assert both.get_total_flops() == cost.training_flops + upstream_extra
