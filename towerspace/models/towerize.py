"""Put any network on the tower continuum: replace its convolutions with TowerConv2d."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from towerspace.block import TowerConv2d, regroup_weight
from towerspace.budget import solve_width
from towerspace.choices import MATCHES
from towerspace.errors import ConfigError
from towerspace.models.cost import model_cost
from towerspace.towers import TowerSchedule, TowerSpecLike

if TYPE_CHECKING:
    import pandas as pd

# Modules that keep the channel count and mix no channels spatially: a depthwise or grouped conv
# followed by these and a 1×1 conv is a separable pair, whatever the network calls it.
PRESERVING = (
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardswish,
    nn.SiLU,
    nn.GELU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
)  # fmt: skip (and torchvision's SqueezeExcitation)
COLUMNS = (
    "layer", "kind", "conv", "in_channels", "out_channels", "spatial_channels", "towers",
    "group_width", "exact", "absorbed", "reason",
)  # fmt: skip
# regular: a k×k conv became a block; separable: a grouped k×k conv and its 1×1 became one block;
# tower: an existing TowerConv2d was re-towered; skipped: left alone (see reason)
KINDS = ("regular", "separable", "tower", "skipped")
Builder = Callable[[float], nn.Module]


@dataclass(frozen=True)
class Options:
    """How convolutions become blocks (everything but the tower counts)."""

    order: str = "spatial_first"  # for regular convs; separable pairs stay spatial-first
    mid: str = "none"  # for regular convs; a pair keeps the modules found between its convs
    min_channels: int = 8  # convs with fewer input channels (image stems) are left alone
    carry_weights: bool = True
    impl: str = "native"


@dataclass
class Site:
    """One convolution looked at: what it is, and what towerize does with it."""

    path: str
    kind: str
    conv: nn.Module
    reason: str = ""
    pointwise: tuple[str, nn.Conv2d] | None = None  # separable: the 1×1 conv after it
    between: list[tuple[str, nn.Module]] = field(default_factory=list)  # separable: moved ops


def towerize(
    model: nn.Module | Builder,
    towers: TowerSpecLike | TowerSchedule = "depthwise",
    *,
    overrides: Mapping[str, TowerSpecLike] | None = None,
    snap: str = "nearest",
    layer_seed: int | None = None,
    order: str = "spatial_first",
    mid: str = "none",
    min_channels: int = 8,
    carry_weights: bool = True,
    match: str = "none",
    reference: TowerSpecLike = "depthwise",
    base_width: float = 1.0,
    image_size: int = 224,
    in_chans: int = 3,
    impl: str = "native",
) -> tuple[nn.Module, pd.DataFrame]:
    """A copy of model with its eligible convs as TowerConv2d blocks, and a report per conv.

    model is an nn.Module (copied, never changed) or a builder `width -> nn.Module`; matching
    (match='params' or 'flops') needs the builder: the width is solved so that the towerized
    model costs what the `reference` towers cost at base_width (image_size and in_chans size
    the FLOP count); model.budget reports the solve.
    """
    if match not in MATCHES:
        raise ConfigError(f"match={match!r} is not one of: {', '.join(MATCHES)}")
    schedule = TowerSchedule.build(towers, overrides, snap, layer_seed)
    options = Options(order, mid, min_channels, carry_weights, impl)
    if isinstance(model, nn.Module):
        if match != "none":
            raise ConfigError(
                f"match={match!r} needs a builder `width -> nn.Module`, got a "
                f"{type(model).__name__} instance (it has no width to solve)"
            )
        return towerize_in_place(copy.deepcopy(model), schedule, options)
    if not callable(model):
        raise ConfigError(f"model must be an nn.Module or a builder, got {type(model).__name__}")
    width = base_width
    solved = None
    if match != "none":
        reference_schedule = TowerSchedule.build(reference, snap="nearest")
        cost = _meta_cost(model, options, match, image_size, in_chans)
        solved = solve_width(
            cost, schedule, reference_schedule, metric=match, base_width=base_width
        )
        width = solved.width
    towered, report = towerize_in_place(model(width), schedule, options)
    if solved is not None:
        towered.budget = solved.as_dict()
    return towered, report


def towerize_in_place(
    model: nn.Module, schedule: TowerSchedule, options: Options
) -> tuple[nn.Module, pd.DataFrame]:
    """towerize() on model itself (for models built only to be towerized)."""
    sites = plan(model, options.min_channels)
    replaced = [s.path for s in sites if s.kind != "skipped"]
    if not replaced:
        raise ConfigError(
            f"towerize: no convolution of {type(model).__name__} can take towers "
            f"({len(sites)} looked at, all skipped)"
        )
    schedule.check_sites(replaced)
    rows = []
    for site in sites:
        if site.kind == "skipped":
            rows.append(_row(site, None))
            continue
        block, exact, reason = _build_block(site, schedule, options)
        _set_module(model, site.path, block)
        for path, _ in [*site.between, *([site.pointwise] if site.pointwise else [])]:
            _set_module(model, path, nn.Identity())  # the block computes them now
        site.reason = reason
        rows.append(_row(site, block, exact))
    import pandas as pd  # the report only: importing the module loads no pandas

    report = pd.DataFrame(rows, columns=list(COLUMNS))
    ints = ["spatial_channels", "towers", "group_width"]
    return model, report.astype(dict.fromkeys(ints, "Int64") | {"exact": "boolean"})


def _meta_cost(
    builder: Builder, options: Options, metric: str, image_size: int, in_chans: int
) -> Callable[[float, TowerSchedule], int]:
    """`(width, schedule) -> cost` of the builder's network, towerized on the meta device
    (structure only: no weights are made or carried)."""

    def cost(width: float, schedule: TowerSchedule) -> int:
        with torch.device("meta"):
            model = builder(width)
        model, _ = towerize_in_place(model, schedule, replace(options, carry_weights=False))
        return model_cost(model, metric, image_size, in_chans)

    return cost


# ---------------------------------------------------------------- what to replace


def plan(model: nn.Module, min_channels: int = 8) -> list[Site]:
    """Every convolution of model (TowerConv2d blocks whole), and what towerize does with it."""
    pairs = _separable_pairs(model, min_channels)
    absorbed = {s.pointwise[0] for s in pairs.values()}
    sites, inside = [], ()
    for path, module in model.named_modules():
        if inside and path.startswith(inside):
            continue  # the convs of a TowerConv2d belong to it
        if isinstance(module, TowerConv2d):
            sites.append(Site(path, "tower", module))
            inside = (path + ".",)
        elif isinstance(module, nn.modules.conv._ConvNd) and path not in absorbed:
            if path in pairs:
                sites.append(pairs[path])
            else:
                problem = _skip_reason(module, min_channels)
                kind = "skipped" if problem else "regular"
                sites.append(Site(path, kind, module, problem or ""))
    return sites


def _spatial_problem(conv: nn.Module, min_channels: int) -> str | None:
    """Why a conv cannot be the k×k conv of a block, or None if it can."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__}: only nn.Conv2d takes towers"
    for name in ("kernel_size", "stride", "dilation"):
        value = getattr(conv, name)
        if value[0] != value[1]:
            return f"non-square {name} {tuple(value)}"
    if conv.kernel_size[0] == 1:
        return "1×1 conv: no spatial extent to split into towers"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zeros)"
    if isinstance(_padding(conv), str):
        return _padding(conv)
    if conv.in_channels < min_channels:
        return f"{conv.in_channels} input channels < min_channels={min_channels} (an image stem)"
    return None


def _skip_reason(conv: nn.Module, min_channels: int) -> str | None:
    """Why a conv that is not part of a separable pair is left alone, or None for a regular one."""
    problem = _spatial_problem(conv, min_channels)
    if problem or conv.groups == 1:
        return problem
    what = "depthwise" if conv.groups == conv.in_channels else f"grouped (groups={conv.groups})"
    if conv.in_channels != conv.out_channels:
        return f"{what} conv changes channels ({conv.in_channels} → {conv.out_channels})"
    return f"{what} conv with no 1×1 conv after it (through channel-preserving ops)"


def _padding(conv: nn.Conv2d) -> int | str:
    """The conv's padding as one int, or why it is not one (asymmetric, odd 'same')."""
    padding, k, d = conv.padding, conv.kernel_size[0], conv.dilation[0]
    if padding == "valid":
        return 0
    if padding == "same":
        total = d * (k - 1)
        return total // 2 if total % 2 == 0 else f"padding='same' pads unevenly (k={k}, d={d})"
    if padding[0] != padding[1]:
        return f"non-square padding {tuple(padding)}"
    return int(padding[0])


def _separable_pairs(model: nn.Module, min_channels: int) -> dict[str, Site]:
    """Grouped k×k convs followed by a 1×1 conv through channel-preserving ops, by k×k path."""
    pairs = {}
    for chain in _chains(model):
        for i, (path, conv) in enumerate(chain):
            grouped = isinstance(conv, nn.Conv2d) and conv.groups > 1
            if not grouped or conv.in_channels != conv.out_channels:
                continue
            if _spatial_problem(conv, min_channels) is not None:
                continue
            between = []
            for later_path, later in chain[i + 1 :]:
                if _is_pointwise(later, conv.out_channels):
                    pairs[path] = Site(path, "separable", conv, "", (later_path, later), between)
                    break
                if not _preserves(later, conv.out_channels):
                    break
                between.append((later_path, later))
    return pairs


def _is_pointwise(module: nn.Module, channels: int) -> bool:
    if not isinstance(module, nn.Conv2d) or module.kernel_size != (1, 1):
        return False
    plain = module.stride == (1, 1) and module.groups == 1 and _padding(module) == 0
    return plain and module.in_channels == channels


def _preserves(module: nn.Module, channels: int) -> bool:
    from torchvision.ops import SqueezeExcitation  # torchvision loads when a model is towerized

    if isinstance(module, nn.BatchNorm2d):
        return module.num_features == channels
    if isinstance(module, SqueezeExcitation):
        return module.fc1.in_channels == channels
    return isinstance(module, PRESERVING)


def _chains(module: nn.Module, prefix: str = "") -> list[list[tuple[str, nn.Module]]]:
    """Modules in execution order along every outermost nn.Sequential (nested ones flattened)."""
    if isinstance(module, nn.Sequential):
        chain = _flatten(module, prefix)
        return [chain] + [c for path, m in chain for c in _chains_below(m, path)]
    return _chains_below(module, prefix)


def _chains_below(module: nn.Module, path: str) -> list[list[tuple[str, nn.Module]]]:
    if isinstance(module, TowerConv2d):
        return []
    return [
        chain
        for name, child in module.named_children()
        for chain in _chains(child, f"{path}.{name}" if path else name)
    ]


def _flatten(sequential: nn.Sequential, path: str) -> list[tuple[str, nn.Module]]:
    items = []
    for name, child in sequential.named_children():
        child_path = f"{path}.{name}" if path else name
        if isinstance(child, nn.Sequential):
            items += _flatten(child, child_path)
        else:
            items.append((child_path, child))
    return items


# ---------------------------------------------------------------- building the blocks


def _build_block(
    site: Site, schedule: TowerSchedule, options: Options
) -> tuple[TowerConv2d, bool, str]:
    """The block for a site, on the conv's device, with its weights carried where that is exact."""
    conv = site.conv
    weight = conv.spatial.weight if isinstance(conv, TowerConv2d) else conv.weight
    with torch.device(weight.device):
        if site.kind == "regular":
            block, exact, reason = _from_regular(site.path, site.conv, schedule, options)
        elif site.kind == "separable":
            block, exact, reason = _from_pair(site, schedule, options)
        else:
            block, exact, reason = _retower(site.path, site.conv, schedule, options)
    return block.to(dtype=weight.dtype), exact, reason


def _from_regular(
    path: str, conv: nn.Conv2d, schedule: TowerSchedule, options: Options
) -> tuple[TowerConv2d, bool, str]:
    spatial = conv.in_channels if options.order == "spatial_first" else conv.out_channels
    block = TowerConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
        conv.dilation[0], towers=schedule.towers_for(path, spatial), order=options.order,
        mid=options.mid, padding=_padding(conv), bias=conv.bias is not None, impl=options.impl,
    )  # fmt: skip
    fits = conv.out_channels <= conv.in_channels
    if options.order == "pointwise_first":
        fits = conv.in_channels <= conv.out_channels
    if not options.carry_weights:
        return block, False, "fresh init (carry_weights=False)"
    if block.towers != 1:
        return block, False, "fresh init: a dense kernel carries exactly only at 1 tower"
    if options.mid != "none":
        return block, False, f"fresh init: mid={options.mid!r} is not linear"
    if not fits:
        need = "out <= in" if options.order == "spatial_first" else "in <= out"
        return block, False, f"fresh init: {options.order} carries a kernel only when {need}"
    _embed_dense(block, conv)
    return block, True, "exact: dense kernel carried, identity 1×1"


@torch.no_grad()
def _embed_dense(block: TowerConv2d, conv: nn.Conv2d) -> None:
    """A one-tower block computing conv exactly: the kernel padded, the 1×1 an identity."""
    c_in, c_out = conv.in_channels, conv.out_channels
    block.spatial.weight.zero_()
    block.pointwise.weight.zero_()
    eye = torch.eye(min(c_in, c_out), device=conv.weight.device, dtype=conv.weight.dtype)
    if block.order == "spatial_first":  # spatial: in → in (first `out` rows hold the kernel)
        block.spatial.weight[:c_out].copy_(conv.weight)
        block.pointwise.weight[:, :c_out, 0, 0].copy_(eye)
    else:  # 1×1 embeds in → out; spatial: out → out reads the first `in` channels
        block.pointwise.weight[:c_in, :, 0, 0].copy_(eye)
        block.spatial.weight[:, :c_in].copy_(conv.weight)
    if conv.bias is not None:
        block.bias.copy_(conv.bias)


def _from_pair(
    site: Site, schedule: TowerSchedule, options: Options
) -> tuple[TowerConv2d, bool, str]:
    conv, (_, pointwise) = site.conv, site.pointwise
    moved = [m for _, m in site.between]
    between = None if not moved else moved[0] if len(moved) == 1 else nn.Sequential(*moved)
    # a bias on the k×k conv: folded into the 1×1's bias when nothing non-linear sits between
    fold = conv.bias is not None and between is None
    block = TowerConv2d(
        conv.in_channels, pointwise.out_channels, conv.kernel_size[0], conv.stride[0],
        conv.dilation[0], towers=schedule.towers_for(site.path, conv.in_channels),
        padding=_padding(conv), bias=pointwise.bias is not None or fold, impl=options.impl,
        between=between,
    )  # fmt: skip
    if conv.bias is not None and not fold:
        block.spatial.bias = nn.Parameter(torch.zeros_like(conv.bias))
    if not options.carry_weights:
        return block, False, "fresh init (carry_weights=False)"
    exact = conv.groups % block.towers == 0
    _carry_pair(block, conv, pointwise, exact, fold)
    if exact:
        return block, True, f"exact: {conv.groups} groups embedded in {block.towers} towers"
    return block, False, f"fresh spatial init: {block.towers} towers do not divide {conv.groups}"


@torch.no_grad()
def _carry_pair(
    block: TowerConv2d, conv: nn.Conv2d, pointwise: nn.Conv2d, exact: bool, fold: bool
) -> None:
    block.pointwise.weight.copy_(pointwise.weight)
    if block.pointwise.bias is not None:
        base = pointwise.bias if pointwise.bias is not None else 0.0
        extra = pointwise.weight[:, :, 0, 0] @ conv.bias if fold else 0.0
        block.pointwise.bias.copy_(base + extra)
    if exact:
        block.spatial.weight.copy_(regroup_weight(conv.weight, conv.groups, block.towers))
        if conv.bias is not None and not fold:
            block.spatial.bias.copy_(conv.bias)


def _retower(
    path: str, old: TowerConv2d, schedule: TowerSchedule, options: Options
) -> tuple[TowerConv2d, bool, str]:
    block = TowerConv2d(
        old.in_channels, old.out_channels, old.kernel_size, old.stride, old.dilation,
        towers=schedule.towers_for(path, old.spatial_channels), order=old.order,
        mid="none" if old.custom_between else old.mid, padding=old.padding,
        bias=old.bias is not None, impl=options.impl,
        between=old.between if old.custom_between else None,
    )  # fmt: skip
    block.between = old.between  # the same modules: their state (BatchNorm statistics) stays
    early = old.spatial if old.order == "spatial_first" else old.pointwise
    if early.bias is not None:  # a carried pair's bias before the between module
        target = block.spatial if old.order == "spatial_first" else block.pointwise
        target.bias = nn.Parameter(torch.zeros_like(early.bias))
    if not options.carry_weights:
        return block, False, "fresh init (carry_weights=False)"
    exact = old.towers % block.towers == 0
    with torch.no_grad():
        for name in ("spatial", "pointwise"):
            new, was = getattr(block, name), getattr(old, name)
            if name == "pointwise" or exact:
                if name == "spatial":
                    new.weight.copy_(regroup_weight(was.weight, old.towers, block.towers))
                else:
                    new.weight.copy_(was.weight)
                if was.bias is not None:
                    new.bias.copy_(was.bias)
    if exact:
        return block, True, f"exact: {old.towers} towers embedded in {block.towers}"
    return block, False, f"fresh spatial init: {block.towers} towers do not divide {old.towers}"


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _row(site: Site, block: TowerConv2d | None, exact: bool | None = None) -> dict[str, Any]:
    conv = site.conv
    text = str(conv) if not isinstance(conv, TowerConv2d) else f"TowerConv2d({conv.extra_repr()})"
    absorbed = [p for p, _ in site.between] + ([site.pointwise[0]] if site.pointwise else [])
    if site.pointwise:
        text += f" + {site.pointwise[1]}"
    return {
        "layer": site.path,
        "kind": site.kind,
        "conv": text,
        "in_channels": getattr(conv, "in_channels", None),
        "out_channels": block.out_channels if block else getattr(conv, "out_channels", None),
        "spatial_channels": block.spatial_channels if block else None,
        "towers": block.towers if block else None,
        "group_width": block.group_width if block else None,
        "exact": exact,
        "absorbed": ", ".join(absorbed),
        "reason": site.reason,
    }
