"""Model configs as data, and the one table from a model name to the function that builds it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from towerspace.block import IMPL_NAMES
from towerspace.budget import Match, bisect_width, schedule_divisor
from towerspace.choices import BUDGETS, MIDS, ORDERS, POOL_PADDINGS, STEMS
from towerspace.errors import ConfigError
from towerspace.models.builders import TORCHVISION, custom_builder, torchvision_builder
from towerspace.models.pretrained import load_pretrained
from towerspace.models.towerize import Builder, towerize
from towerspace.models.xception import xception
from towerspace.towers import SNAPS, TowerSchedule

# a model from (config, *, in_chans, num_classes, image_size, stem); stem: small or imagenet
FromConfig = Callable[..., nn.Module]


def _xception(
    cfg: ModelConfig, *, in_chans: int, num_classes: int, image_size: int, stem: str
) -> nn.Module:
    """Xception by its own factory (budget matching by formula), started from init_from if set."""
    model = xception(num_classes=num_classes, in_chans=in_chans, width=cfg.width,
                     middle_blocks=cfg.middle_blocks, stem=stem, towers=cfg.towers,
                     overrides=cfg.overrides, snap=cfg.snap, layer_seed=cfg.layer_seed,
                     order=cfg.order, mid=cfg.mid, dropout=cfg.dropout, match=cfg.match,
                     reference=cfg.reference, input_size=image_size,
                     channel_divisor=cfg.channel_divisor, impl=cfg.impl, residual=cfg.residual,
                     pool_padding=cfg.pool_padding)  # fmt: skip
    if cfg.init_from is not None:  # the same function as the source, at this model's towers
        try:
            load_pretrained(model, cfg.init_from)
        except ValueError as err:
            raise ConfigError(f"init_from {cfg.init_from}: {err}") from None
    return model


def _torchvision(
    cfg: ModelConfig, *, in_chans: int, num_classes: int, image_size: int, stem: str
) -> nn.Module:
    """A torchvision network, towerized; ResNet's stem shrinks for small images."""
    schedule = _schedule(cfg)
    # matching rounds to the tower counts asked for, so they are realized and steps are fine
    divisor = cfg.channel_divisor or (schedule_divisor(schedule) if cfg.match != "none" else 8)
    builder = torchvision_builder(cfg.name, in_chans=in_chans, num_classes=num_classes,
                                  small_stem=stem == "small", round_nearest=divisor)  # fmt: skip
    return _towerized(cfg, builder, schedule, image_size=image_size, in_chans=in_chans)


def _custom(
    cfg: ModelConfig, *, in_chans: int, num_classes: int, image_size: int, stem: str
) -> nn.Module:
    """A user's network from model.builder ('path/to/file.py:function'), towerized."""
    schedule = _schedule(cfg)
    builder = custom_builder(cfg.builder, in_chans=in_chans, num_classes=num_classes,
                             image_size=image_size)  # fmt: skip
    return _towerized(cfg, builder, schedule, image_size=image_size, in_chans=in_chans)


def _schedule(cfg: ModelConfig) -> TowerSchedule:
    """The config's tower counts, per site."""
    return TowerSchedule.build(cfg.towers, cfg.overrides, cfg.snap, cfg.layer_seed)


def _towerized(
    cfg: ModelConfig, builder: Builder, schedule: TowerSchedule, *, image_size: int, in_chans: int
) -> nn.Module:
    """The builder's network towerized at the config's towers (at a solved width if matched).

    Fresh weights at every point (carry_weights=False): a sweep compares tower counts from the
    same kind of initialisation, not from a random dense kernel embedded exactly at 1 tower.
    """
    model, _ = towerize(
        builder if cfg.match != "none" else builder(cfg.width), schedule, order=cfg.order,
        mid=cfg.mid, carry_weights=False, match=cfg.match, reference=cfg.reference,
        base_width=cfg.width, image_size=image_size, in_chans=in_chans, impl=cfg.impl,
    )  # fmt: skip
    return model


# model.name → the function that builds it (torchvision's networks at random init)
BUILDERS: dict[str, FromConfig] = {
    "xception": _xception,
    **dict.fromkeys(TORCHVISION, _torchvision),
    "custom": _custom,  # model.builder: a user's function
}
MODEL_NAMES = tuple(BUILDERS)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and tower schedule of the model every trial trains."""

    name: str = field(default="xception", metadata={"choices": MODEL_NAMES})  # custom: builder
    width: float = field(default=1.0, metadata={"gt": 0.0, "max": 16.0})  # width multiplier
    middle_blocks: int = field(default=8, metadata={"min": 0, "max": 64})  # paper: 8
    stem: str = field(default="auto", metadata={"choices": ("auto", *STEMS)})  # auto: small ≤ 64 px
    order: str = field(default="spatial_first", metadata={"choices": ORDERS})  # k×k conv first
    mid: str = field(default="none", metadata={"choices": MIDS})  # op between the two convs
    towers: Any = "depthwise"  # int, regular, depthwise, {group_width: w} or {position: t}
    overrides: dict[str, Any] = field(default_factory=dict)  # site prefix (e.g. middle) → spec
    snap: str = field(default="nearest", metadata={"choices": SNAPS})  # or strict: raise
    layer_seed: int | None = None  # set: every site draws its own position (population sampling)
    # budget to match; latency: the measured step time, solved in each trial on its device
    match: str = field(default="none", metadata={"choices": BUDGETS})
    reference: Any = "depthwise"  # tower spec whose cost a matched model matches
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.95})  # before classifier
    channel_divisor: int | None = field(default=None, metadata={"min": 1})  # None: see xception()
    impl: str = field(default="native", metadata={"choices": IMPL_NAMES})  # auto: fastest, measured
    builder: str | None = None  # model.name custom: "path/to/file.py:function" (cwd-relative)
    init_from: str | None = None  # a state dict: towerspace or timm legacy_xception (cwd-relative)
    residual: bool = True  # xception: false drops every shortcut (the paper's section 4.7)
    # xception: keras pads its strided max-pools as Keras does (for weights trained in Keras)
    pool_padding: str = field(default="torch", metadata={"choices": POOL_PADDINGS})


def build_model(
    cfg: ModelConfig,
    *,
    in_chans: int,
    num_classes: int,
    image_size: int,
    measure: Callable[[nn.Module], float] | None = None,
) -> nn.Module:
    """The model a config describes, sized for a data set's channels, classes and images.

    match 'latency' solves the width with measure (a model's step time in ms on the target
    device, towerspace.trial.latency_probe); without one (the meta device of the preflight and
    the estimate, where nothing runs) the model is sized as its FLOPs match, a stand-in.
    """
    stem = cfg.stem if cfg.stem != "auto" else ("small" if image_size <= 64 else "imagenet")
    if cfg.init_from is not None and cfg.match != "none":
        raise ConfigError(f"init_from needs match 'none' (budget matching changes widths), "
                         f"got match {cfg.match!r}")  # fmt: skip
    if cfg.init_from is not None and cfg.name != "xception":
        raise ConfigError(f"init_from needs name 'xception' for now, got name {cfg.name!r}")
    for name, default in (("residual", True), ("pool_padding", "torch")):
        if getattr(cfg, name) != default and cfg.name != "xception":
            raise ConfigError(f"{name} {getattr(cfg, name)!r} needs name 'xception' (other "
                              f"models keep their own wiring), got name {cfg.name!r}")  # fmt: skip
    sizes = {"in_chans": in_chans, "num_classes": num_classes, "image_size": image_size,
             "stem": stem}  # fmt: skip
    if cfg.match == "latency":
        return _latency_matched(cfg, measure, sizes)
    return BUILDERS[cfg.name](cfg, **sizes)


def at_width(cfg: ModelConfig, width: float) -> ModelConfig:
    """A latency-matched config as the plain config of the model it solved (width: its record's
    width), which rebuilds that model exactly: for checkpoints, restores and exports."""
    divisor = cfg.channel_divisor or schedule_divisor(_schedule(cfg))
    return replace(cfg, match="none", width=width, channel_divisor=divisor)


def _latency_matched(
    cfg: ModelConfig, measure: Callable[[nn.Module], float] | None, sizes: dict
) -> nn.Module:
    """The model at the width whose measured step time comes closest to the reference's at
    cfg.width: bisection on log-width around the FLOPs match (measured times move in steps
    and carry noise, so it stops within 1% of width or 2% of time). The global random streams
    are left as they were: the final model draws the weights a plain build would."""
    if measure is None:
        return BUILDERS[cfg.name](replace(cfg, match="flops"), **sizes)
    with torch.device("meta"):
        guess = BUILDERS[cfg.name](replace(cfg, match="flops"), **sizes).budget["solved_width"]
    plain = replace(cfg, towers=cfg.reference, overrides={}, layer_seed=None, snap="nearest")
    reference = at_width(plain, cfg.width)

    def time_at(width: float) -> float:
        return measure(BUILDERS[cfg.name](at_width(cfg, width), **sizes))

    with torch.random.fork_rng():
        target = measure(BUILDERS[cfg.name](reference, **sizes))
        if _schedule(reference) == _schedule(cfg):
            tried = {cfg.width: target}
        else:
            _, _, tried = bisect_width(time_at, target, guess / 2, guess * 2, steps=8,
                                       width_ratio=1.01, cost_error=0.02)  # fmt: skip
    width = min(tried, key=lambda w: (abs(tried[w] - target), w))
    model = BUILDERS[cfg.name](at_width(cfg, width), **sizes)
    microseconds = max(1, round(target * 1e3)), max(1, round(tried[width] * 1e3))
    model.budget = Match("latency", width, {}, *microseconds).as_dict()
    return model
