"""TowerConv2d: a k×k convolution split into towers, paired with a 1×1 convolution."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from towerspace.choices import MIDS, ORDERS
from towerspace.errors import TowerSpecError
from towerspace.impls import IMPLS, default_chooser, expand_grouped
from towerspace.towers import divisors, regime

Order = Literal["spatial_first", "pointwise_first"]
Mid = Literal["none", "relu", "elu", "bn", "bn_relu"]
IMPL_NAMES: tuple[str, ...] = (*IMPLS, "auto")


@dataclass(frozen=True)
class Complexity:
    """Cost of a layer or model per image: parameters and FLOPs (2 per multiply-add)."""

    params: int
    flops: int  # forward pass, counted as torch.utils.flop_counter counts convs and matmuls
    height: int  # output height, so costs can be chained through a network
    width: int

    @property
    def training_flops(self) -> int:
        """Forward + backward: grad-input and grad-weight each cost one forward (3× forward).

        Not torch.utils.flop_counter's backward count: with torch 2.14 its convolution_backward
        formula ignores `groups`, so a grouped conv's backward is counted `groups` times too
        high (forward + backward of a 64-channel 3×3 conv: 2× at 4 groups, 22× depthwise).
        """
        return 3 * self.flops

    def __add__(self, other: Complexity) -> Complexity:
        return Complexity(
            self.params + other.params, self.flops + other.flops, other.height, other.width
        )

    def as_dict(self) -> dict[str, int]:
        """Parameters, forward FLOPs and training FLOPs as a plain dict."""
        return {"params": self.params, "flops": self.flops, "training_flops": self.training_flops}


def resolve_towers(
    channels: int, towers: int | str | None = None, group_width: int | None = None
) -> int:
    """Exact tower count for `channels` from a count, 'regular', 'depthwise' or a group width."""
    if (towers is None) == (group_width is None):
        raise TowerSpecError("give exactly one of towers or group_width")
    if group_width is not None:
        if isinstance(group_width, bool) or not isinstance(group_width, int) or group_width < 1:
            raise TowerSpecError(f"group_width must be a positive int, got {group_width!r}")
        if channels % group_width:
            valid = ", ".join(map(str, divisors(channels)))
            raise TowerSpecError(
                f"group_width={group_width} does not divide the {channels} channels of the "
                f"spatial convolution; valid group widths: {valid}"
            )
        return channels // group_width
    if towers == "regular":
        return 1
    if towers == "depthwise":
        return channels
    if isinstance(towers, bool) or not isinstance(towers, int):
        raise TowerSpecError(f"towers must be an int, 'regular' or 'depthwise', got {towers!r}")
    if towers < 1 or channels % towers:
        valid = ", ".join(map(str, divisors(channels)))
        raise TowerSpecError(
            f"towers={towers} does not divide the {channels} channels of the spatial "
            f"convolution; valid tower counts: {valid}"
        )
    return towers


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise TowerSpecError(f"{name}={value!r} is not one of: {', '.join(allowed)}")


def _out_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def tower_complexity(
    in_channels: int,
    out_channels: int,
    height: int,
    width: int,
    *,
    kernel_size: int = 3,
    stride: int = 1,
    dilation: int = 1,
    padding: int | None = None,
    towers: int = 1,
    order: str = "spatial_first",
    mid: str = "none",
    bias: bool = False,
) -> Complexity:
    """Parameters and FLOPs of a TowerConv2d per image, by formula, without building it."""
    padding = dilation * (kernel_size - 1) // 2 if padding is None else padding
    out_h = _out_size(height, kernel_size, stride, padding, dilation)
    out_w = _out_size(width, kernel_size, stride, padding, dilation)
    spatial = in_channels if order == "spatial_first" else out_channels
    spatial_params = spatial * (spatial // towers) * kernel_size * kernel_size
    pointwise_params = in_channels * out_channels
    # spatial-first: both convs run at the output size; pointwise-first: the 1×1 runs at the input
    pointwise_pixels = out_h * out_w if order == "spatial_first" else height * width
    flops = 2 * (spatial_params * out_h * out_w + pointwise_params * pointwise_pixels)
    params = spatial_params + pointwise_params
    params += 2 * spatial if mid in ("bn", "bn_relu") else 0
    params += out_channels if bias else 0
    return Complexity(params, flops, out_h, out_w)


class TowerConv2d(nn.Module):
    """A k×k convolution on `towers` channel segments paired with a 1×1 convolution.

    towers=1 is a regular convolution (after or before a 1×1), towers=channels a depthwise
    separable convolution, and the counts in between are Inception-style modules.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        towers: int | str | None = "depthwise",
        *,
        group_width: int | None = None,
        order: Order = "spatial_first",
        mid: Mid = "none",
        padding: int | None = None,
        bias: bool = False,
        impl: str = "native",
        between: nn.Module | None = None,
    ) -> None:
        super().__init__()
        _check_choice("impl", impl, IMPL_NAMES)
        _check_choice("order", order, ORDERS)
        _check_choice("mid", mid, MIDS)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TowerSpecError(f"{name} must be a positive int, got {value!r}")
        if between is not None and mid != "none":
            raise TowerSpecError(f"give mid='none' with a between module, got mid={mid!r}")
        if group_width is not None:
            towers = None
        spatial = in_channels if order == "spatial_first" else out_channels
        self.towers = resolve_towers(spatial, towers, group_width)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.padding = dilation * (kernel_size - 1) // 2 if padding is None else padding
        self.order, self.mid, self.spatial_channels = order, mid, spatial
        self.impl = impl  # native | auto (the fastest, measured once) | one of impls.IMPLS
        # only the second conv carries the bias: a bias before zero padding breaks as_conv2d()
        self.spatial = nn.Conv2d(
            spatial,
            spatial,
            kernel_size,
            stride=stride,
            padding=self.padding,
            dilation=dilation,
            groups=self.towers,
            bias=bias and order == "pointwise_first",
        )
        self.pointwise = nn.Conv2d(
            in_channels, out_channels, 1, bias=bias and order == "spatial_first"
        )
        # between: any channel-preserving module (towerize moves a network's own BN, ReLU, SE here)
        self.custom_between = between is not None
        self.between = between if between is not None else _mid_module(mid, spatial)

    @property
    def group_width(self) -> int:
        """Channels per tower of the spatial convolution."""
        return self.spatial_channels // self.towers

    @property
    def regime(self) -> str:
        """'regular', 'inception' or 'depthwise'."""
        return regime(self.towers, self.spatial_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self.impl
        if impl == "auto" and x.is_meta:  # shapes only (cost estimates): nothing to time
            impl = "native"
        elif impl == "auto":
            impl = default_chooser().choose(self, x, torch.is_grad_enabled() and self.training)
        if self.order == "spatial_first":
            return self.pointwise(self.between(self._spatial(x, impl)))
        return self._spatial(self.between(self.pointwise(x)), impl)

    def _spatial(self, x: torch.Tensor, impl: str) -> torch.Tensor:
        if impl == "native" or self.towers == 1:
            return self.spatial(x)
        args = (self.spatial.weight, self.towers, self.stride, self.padding, self.dilation)
        out = IMPLS[impl](x, *args)
        bias = self.spatial.bias
        return out if bias is None else out + bias.view(1, -1, 1, 1)

    def complexity(self, height: int, width: int) -> Complexity:
        """Parameters and FLOPs per image for an input of height × width."""
        cost = tower_complexity(
            self.in_channels,
            self.out_channels,
            height,
            width,
            kernel_size=self.kernel_size,
            stride=self.stride,
            dilation=self.dilation,
            padding=self.padding,
            towers=self.towers,
            order=self.order,
            mid=self.mid,
            bias=self.bias is not None,
        )
        return replace(cost, params=cost.params + self._extra_params())

    def _extra_params(self) -> int:
        """Parameters the formula cannot know: a custom between module, a bias before the 1×1."""
        early_bias = self.spatial.bias if self.order == "spatial_first" else self.pointwise.bias
        extra = 0 if early_bias is None else early_bias.numel()
        if self.custom_between:
            extra += sum(p.numel() for p in self.between.parameters())
        return extra

    @property
    def bias(self) -> nn.Parameter | None:
        """The block's output bias, if any."""
        last = self.pointwise if self.order == "spatial_first" else self.spatial
        return last.bias

    def dense_weight(self) -> torch.Tensor:
        """The block's composed dense k×k kernel, shape (out, in, k, k); needs mid='none'."""
        if self.mid != "none":
            raise TowerSpecError(
                f"as_conv2d() needs mid='none' (a linear block), got mid={self.mid!r}"
            )
        if self.custom_between and not isinstance(self.between, nn.Identity):
            raise TowerSpecError(
                f"as_conv2d() needs a linear block, got between={type(self.between).__name__}"
            )
        spatial = expand_grouped(self.spatial.weight, self.towers)  # (C, C, k, k)
        pointwise = self.pointwise.weight[:, :, 0, 0]  # (out, in)
        if self.order == "spatial_first":
            return torch.einsum("oj,jikl->oikl", pointwise, spatial)
        return torch.einsum("ojkl,ji->oikl", spatial, pointwise)

    @torch.no_grad()
    def as_conv2d(self) -> nn.Conv2d:
        """One dense nn.Conv2d computing the same function (every point is a constrained conv)."""
        weight = self.dense_weight()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        conv.weight.copy_(weight)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, towers={self.towers}, group_width={self.group_width}, "
            f"order={self.order}, mid={self.mid}"
        )


def regroup_weight(weight: torch.Tensor, from_towers: int, to_towers: int) -> torch.Tensor:
    """A grouped k×k kernel (C, C/from_towers, k, k) re-cut into to_towers towers.

    Exact (the same function) when to_towers divides from_towers: every old tower lies inside
    a new one, so the old kernel is embedded block-diagonally with zeros around it. Otherwise
    the entries that fall outside the new towers are dropped (a projection, not exact).
    """
    channels = weight.shape[0]
    for name, towers in (("from_towers", from_towers), ("to_towers", to_towers)):
        if isinstance(towers, bool) or not isinstance(towers, int) or towers < 1:
            raise TowerSpecError(f"{name} must be a positive int, got {towers!r}")
        if channels % towers:
            raise TowerSpecError(
                f"{name}={towers} does not divide the kernel's {channels} channels"
            )
    if weight.shape[1] * from_towers != channels:
        raise TowerSpecError(
            f"a kernel of shape {tuple(weight.shape)} does not have {from_towers} towers"
        )
    dense = expand_grouped(weight, from_towers)  # (C, C, k, k)
    width = channels // to_towers
    rows = torch.arange(channels, device=weight.device)
    columns = (rows // width * width)[:, None] + torch.arange(width, device=weight.device)
    return dense[rows[:, None], columns]


def _mid_module(mid: str, channels: int) -> nn.Module:
    if mid == "relu":
        return nn.ReLU()
    if mid == "elu":
        return nn.ELU()
    if mid == "bn":
        return nn.BatchNorm2d(channels)
    if mid == "bn_relu":
        return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())
    return nn.Identity()
