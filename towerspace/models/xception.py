"""Xception (Chollet 2017) with every separable convolution a TowerConv2d."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from towerspace.block import Complexity, TowerConv2d, tower_complexity
from towerspace.budget import Match, match_channels, round_channels, schedule_divisor
from towerspace.choices import MATCHES, POOL_PADDINGS, STEMS
from towerspace.errors import ConfigError
from towerspace.towers import TowerSchedule, TowerSpecLike

# The paper's figure 5 / Keras Applications at width 1.0. Channel groups are named so that a
# width multiplier (and budget matching) can round each group on its own.
GROUPS: dict[str, int] = {
    "stem1": 32, "stem2": 64, "c128": 128, "c256": 256,
    "c728": 728, "c1024": 1024, "c1536": 1536, "c2048": 2048,
}  # fmt: skip
# flow,    block,     separable convs (channel groups),  downsample (max-pool + 1×1 shortcut)
ENTRY = (
    ("entry", "block2", ("c128", "c128"), True),
    ("entry", "block3", ("c256", "c256"), True),
    ("entry", "block4", ("c728", "c728"), True),
)
MIDDLE = ("c728", "c728", "c728")  # one middle-flow block; the paper repeats it 8 times
EXIT = (("exit", "block13", ("c728", "c1024"), True),)
HEAD = ("c1536", "c2048")  # exit.block14: separable convs, each followed by BatchNorm and ReLU
BN_EPS = 1e-3  # Keras' BatchNormalization epsilon


@dataclass(frozen=True)
class Arch:
    """What shapes an Xception besides its channels and tower counts."""

    num_classes: int = 1000
    in_chans: int = 3
    middle_blocks: int = 8  # the paper repeats the middle-flow block 8 times
    stem: str = "imagenet"  # imagenet: stride 2, unpadded; small: stride 1, for ≤ 64 px images
    order: str = "spatial_first"
    mid: str = "none"  # op between the two convs of each block
    dropout: float = 0.0  # before the classifier (costs nothing)
    residual: bool = True  # False: no shortcuts at all (the paper's section 4.7 ablation)
    pool_padding: str = "torch"  # keras: its "same" padding of the strided max-pools


@dataclass(frozen=True)
class BlockPlan:
    """One row of the architecture: a block's channels, sites and wiring."""

    flow: str
    name: str
    in_channels: int
    channels: tuple[int, ...]  # output channels of each separable conv
    down: bool  # max-pool by 2 and a strided 1×1 conv + BN shortcut
    relu_first: bool = True  # ReLU before the first conv (not after the stem, which has its own)
    residual: bool = True
    relu_after: bool = False  # block14: ReLU after the last BN

    @property
    def sites(self) -> list[str]:
        """Module paths of the block's TowerConv2d layers, as named_modules() names them."""
        return [f"{self.flow}.{self.name}.convs.{i}" for i in range(len(self.channels))]

    def towers(self, schedule: TowerSchedule, order: str) -> list[int]:
        """The realized tower count of each separable conv."""
        ins = (self.in_channels, *self.channels[:-1])
        spatial = ins if order == "spatial_first" else self.channels
        return [schedule.towers_for(s, c) for s, c in zip(self.sites, spatial, strict=True)]


def plan(channels: Mapping[str, int], middle_blocks: int, residual: bool = True) -> list[BlockPlan]:
    """The blocks of Xception after the stem, from the architecture table (residual=False:
    without any shortcut)."""
    rows = [*ENTRY, *[("middle", f"block{5 + i}", MIDDLE, False) for i in range(middle_blocks)]]
    blocks, prev = [], channels["stem2"]
    for flow, name, groups, down in (*rows, *EXIT):
        out = tuple(channels[g] for g in groups)
        blocks.append(BlockPlan(flow, name, prev, out, down, relu_first=name != "block2",
                                residual=residual))  # fmt: skip
        prev = out[-1]
    head = tuple(channels[g] for g in HEAD)
    blocks.append(BlockPlan("exit", "block14", prev, head, False, False, False, True))
    return blocks


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


def _conv_complexity(c_in: int, c_out: int, k: int, stride: int, pad: int, h: int, w: int):
    out_h, out_w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    weights = c_in * c_out * k * k
    return Complexity(weights + 2 * c_out, 2 * weights * out_h * out_w, out_h, out_w)  # + BN


class KerasMaxPool2d(nn.Module):
    """A max-pool with Keras' (TensorFlow's) "same" padding: ceil(n / stride) outputs, the odd
    padded pixel at the bottom and right (PyTorch's `padding=` pads both sides alike)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad: list[int] = []
        for n in (x.shape[-1], x.shape[-2]):  # F.pad's order: last dimension first
            total = max((math.ceil(n / self.stride) - 1) * self.stride + self.kernel_size - n, 0)
            pad += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pad, value=-math.inf), self.kernel_size, self.stride)


def max_pool(pool_padding: str) -> nn.Module:
    """Xception's 3×3 max-pool by 2, padded as pool_padding says (see POOL_PADDINGS)."""
    return KerasMaxPool2d() if pool_padding == "keras" else nn.MaxPool2d(3, stride=2, padding=1)


class SeparableBlock(nn.Module):
    """Separable convs (ReLU → TowerConv2d → BN), a residual shortcut, optional max-pool."""

    def __init__(
        self,
        block: BlockPlan,
        towers: list[int],
        order: str,
        mid: str,
        impl: str = "native",
        pool_padding: str = "torch",
    ) -> None:
        super().__init__()
        self.relu_first, self.relu_after, self.residual = (
            block.relu_first, block.relu_after, block.residual
        )  # fmt: skip
        ins = (block.in_channels, *block.channels[:-1])
        self.convs = nn.ModuleList(
            TowerConv2d(i, o, 3, towers=t, order=order, mid=mid, impl=impl)
            for i, o, t in zip(ins, block.channels, towers, strict=True)
        )
        self.norms = nn.ModuleList(_bn(o) for o in block.channels)
        self.shortcut: nn.Module | None = None
        if block.residual and block.down:
            self.shortcut = nn.Sequential(
                nn.Conv2d(block.in_channels, block.channels[-1], 1, stride=2, bias=False),
                _bn(block.channels[-1]),
            )
        self.pool = max_pool(pool_padding) if block.down else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            if self.relu_first or i > 0:
                out = torch.relu(out)
            out = norm(conv(out))
        if self.relu_after:
            out = torch.relu(out)
        out = self.pool(out)
        if not self.residual:
            return out
        return out + (x if self.shortcut is None else self.shortcut(x))


def block_complexity(
    block: BlockPlan, towers: list[int], order: str, mid: str, h: int, w: int
) -> Complexity:
    """Parameters and FLOPs per image of one block (ReLU, pooling and additions count as free)."""
    total = Complexity(0, 0, h, w)
    ins = (block.in_channels, *block.channels[:-1])
    for c_in, c_out, t in zip(ins, block.channels, towers, strict=True):
        conv = tower_complexity(c_in, c_out, total.height, total.width, towers=t, order=order,
                                mid=mid)  # fmt: skip
        total = total + conv + Complexity(2 * c_out, 0, conv.height, conv.width)
    if block.down:  # both paddings give ceil(n / 2) outputs
        out_h, out_w = (total.height + 1) // 2, (total.width + 1) // 2
        short = Complexity(0, 0, out_h, out_w)
        if block.residual:
            short = _conv_complexity(block.in_channels, block.channels[-1], 1, 2, 0, h, w)
        total = Complexity(total.params + short.params, total.flops + short.flops, out_h, out_w)
    return total


def xception_complexity(
    channels: Mapping[str, int], schedule: TowerSchedule, size: int, arch: Arch = Arch()
) -> Complexity:
    """Parameters and FLOPs per image of an Xception, by formula, without building it."""
    stride, pad = (2, 0) if arch.stem == "imagenet" else (1, 1)
    total = _conv_complexity(arch.in_chans, channels["stem1"], 3, stride, pad, size, size)
    total = total + _conv_complexity(
        channels["stem1"], channels["stem2"], 3, 1, pad, total.height, total.width
    )
    for block in plan(channels, arch.middle_blocks, arch.residual):
        towers = block.towers(schedule, arch.order)
        cost = block_complexity(block, towers, arch.order, arch.mid, total.height, total.width)
        total = total + cost
    fc = channels["c2048"] * arch.num_classes
    return total + Complexity(fc + arch.num_classes, 2 * fc, 1, 1)


class Xception(nn.Module):
    """Entry, middle and exit flows of separable blocks; towers per site from a schedule."""

    def __init__(
        self,
        *,
        channels: Mapping[str, int],
        schedule: TowerSchedule,
        arch: Arch = Arch(),
        impl: str = "native",
    ) -> None:
        super().__init__()
        if arch.stem not in STEMS:
            raise ConfigError(f"stem={arch.stem!r} is not one of: {', '.join(STEMS)}")
        if arch.pool_padding not in POOL_PADDINGS:
            raise ConfigError(f"pool_padding={arch.pool_padding!r} is not one of: "
                              f"{', '.join(POOL_PADDINGS)}")  # fmt: skip
        c = dict(channels)
        self.channels, self.schedule, self.arch = c, schedule, arch
        stride, pad = (2, 0) if arch.stem == "imagenet" else (1, 1)
        self.stem = nn.Sequential(
            nn.Conv2d(arch.in_chans, c["stem1"], 3, stride=stride, padding=pad, bias=False),
            _bn(c["stem1"]),
            nn.ReLU(),
            nn.Conv2d(c["stem1"], c["stem2"], 3, padding=pad, bias=False),
            _bn(c["stem2"]),
            nn.ReLU(),
        )
        self.entry, self.middle, self.exit = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        for block in plan(c, arch.middle_blocks, arch.residual):
            towers = block.towers(schedule, arch.order)
            flow = getattr(self, block.flow)
            flow[block.name] = SeparableBlock(block, towers, arch.order, arch.mid, impl,
                                              arch.pool_padding)  # fmt: skip
        self.dropout = nn.Dropout(arch.dropout) if arch.dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c["c2048"], arch.num_classes)
        self.budget: dict[str, float | int | str] | None = None  # set by xception(match=...)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before global pooling."""
        x = self.stem(x)
        for flow in (self.entry, self.middle, self.exit):
            for block in flow.values():
                x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))
        return self.fc(self.dropout(x))

    def complexity(self, height: int, width: int | None = None) -> Complexity:
        """Parameters and FLOPs per image for a square input of side height, by formula."""
        if width not in (None, height):
            raise ConfigError("Xception.complexity takes square inputs")
        return xception_complexity(self.channels, self.schedule, height, self.arch)


def xception(
    *,
    num_classes: int = 1000,
    in_chans: int = 3,
    width: float = 1.0,
    middle_blocks: int = 8,
    stem: str = "imagenet",
    towers: TowerSpecLike | TowerSchedule = "depthwise",
    overrides: Mapping[str, TowerSpecLike] | None = None,
    snap: str = "nearest",
    layer_seed: int | None = None,
    order: str = "spatial_first",
    mid: str = "none",
    dropout: float = 0.0,
    match: str = "none",
    reference: TowerSpecLike = "depthwise",
    input_size: int | None = None,
    channel_divisor: int | None = None,
    impl: str = "native",
    residual: bool = True,
    pool_padding: str = "torch",
) -> Xception:
    """Xception at any point of the tower continuum, optionally budget-matched to a reference.

    With match='params' or 'flops', the channels are solved so that the model costs what the
    `reference` tower spec costs at the same width (within ±2%); model.budget reports the solve.
    Channels round to channel_divisor: 8 by default, or with matching the least common multiple
    of the tower counts and group widths the schedule asks for (fine steps make ±2% reachable).
    impl='auto' runs each separable conv with its fastest implementation (towerspace.impls).
    residual=False drops every shortcut (the paper's section 4.7 ablation); pool_padding='keras'
    pads the strided max-pools as Keras does, for weights trained in Keras (docs: continuum.md).
    """
    if match not in MATCHES:
        raise ConfigError(f"match={match!r} is not one of: {', '.join(MATCHES)}")
    if not 0 < width <= 16:
        raise ConfigError(f"width must be in (0, 16], got {width!r}")
    if middle_blocks < 0:
        raise ConfigError(f"middle_blocks must be >= 0, got {middle_blocks!r}")
    schedule = TowerSchedule.build(towers, overrides, snap, layer_seed)
    size = input_size or (299 if stem == "imagenet" else 32)
    arch = Arch(num_classes, in_chans, middle_blocks, stem, order, mid, dropout, residual,
                pool_padding)  # fmt: skip
    base_channels = round_channels(GROUPS, width, channel_divisor or 8)
    if match == "none":
        model = Xception(channels=base_channels, schedule=schedule, arch=arch, impl=impl)
        _check_overrides(model, schedule)
        return model
    reference_schedule = TowerSchedule.build(reference, snap="nearest")

    def cost(channels: dict[str, int], sched: TowerSchedule = schedule) -> int:
        c = xception_complexity(channels, sched, size, arch)
        return c.params if match == "params" else c.flops

    target = cost(base_channels, reference_schedule)
    divisor = channel_divisor or schedule_divisor(schedule)
    solved = match_channels(cost, GROUPS, target, metric=match, divisor=divisor)
    if reference_schedule == schedule and channel_divisor in (None, 8):
        solved = Match(match, width, base_channels, target, target)
    model = Xception(channels=solved.channels, schedule=schedule, arch=arch, impl=impl)
    _check_overrides(model, schedule)
    model.budget = solved.as_dict()
    return model


def _check_overrides(model: nn.Module, schedule: TowerSchedule) -> None:
    sites = [n for n, m in model.named_modules() if isinstance(m, TowerConv2d)]
    schedule.check_sites(sites)
