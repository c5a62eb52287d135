"""Model configs as data, and building a model from one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from towerspace.block import IMPL_NAMES
from towerspace.choices import MATCHES, MIDS, ORDERS, STEMS
from towerspace.errors import ConfigError
from towerspace.models.builders import TORCHVISION, build_towerized
from towerspace.models.pretrained import load_pretrained
from towerspace.models.xception import xception
from towerspace.towers import SNAPS

MODEL_NAMES = ("xception", *TORCHVISION, "custom")  # custom: model.builder


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and tower schedule of the model every trial trains."""

    name: str = field(default="xception", metadata={"choices": MODEL_NAMES})
    width: float = field(default=1.0, metadata={"gt": 0.0, "max": 16.0})  # width multiplier
    middle_blocks: int = field(default=8, metadata={"min": 0, "max": 64})  # paper: 8
    stem: str = field(default="auto", metadata={"choices": ("auto", *STEMS)})  # auto: small ≤ 64 px
    order: str = field(default="spatial_first", metadata={"choices": ORDERS})
    mid: str = field(default="none", metadata={"choices": MIDS})  # op between the two convs
    towers: Any = "depthwise"  # int, regular, depthwise, {group_width: w} or {position: t}
    overrides: dict[str, Any] = field(default_factory=dict)  # site prefix (e.g. middle) → spec
    snap: str = field(default="nearest", metadata={"choices": SNAPS})  # or strict: raise
    layer_seed: int | None = None  # set: every site draws its own position (population sampling)
    match: str = field(default="none", metadata={"choices": MATCHES})  # budget to match
    reference: Any = "depthwise"  # tower spec whose cost a matched model matches
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.95})  # before classifier
    channel_divisor: int | None = field(default=None, metadata={"min": 1})  # None: see xception()
    impl: str = field(default="native", metadata={"choices": IMPL_NAMES})  # auto: fastest, measured
    builder: str | None = None  # model.name custom: "path/to/file.py:function" (cwd-relative)
    init_from: str | None = None  # a state dict: towerspace or timm legacy_xception (cwd-relative)


def build_model(cfg: ModelConfig, *, in_chans: int, num_classes: int, image_size: int) -> nn.Module:
    """The model a config describes, sized for a data set's channels, classes and images."""
    stem = cfg.stem if cfg.stem != "auto" else ("small" if image_size <= 64 else "imagenet")
    if cfg.init_from is not None and cfg.match != "none":
        raise ConfigError(f"init_from needs match 'none' (budget matching changes widths), "
                         f"got match {cfg.match!r}")  # fmt: skip
    if cfg.init_from is not None and cfg.name != "xception":
        raise ConfigError(f"init_from needs name 'xception' for now, got name {cfg.name!r}")
    if cfg.name != "xception":  # any other network: built, then towerized
        return build_towerized(cfg, in_chans=in_chans, num_classes=num_classes,
                               image_size=image_size, small_stem=stem == "small")  # fmt: skip
    model = xception(
        num_classes=num_classes,
        in_chans=in_chans,
        width=cfg.width,
        middle_blocks=cfg.middle_blocks,
        stem=stem,
        towers=cfg.towers,
        overrides=cfg.overrides,
        snap=cfg.snap,
        layer_seed=cfg.layer_seed,
        order=cfg.order,
        mid=cfg.mid,
        dropout=cfg.dropout,
        match=cfg.match,
        reference=cfg.reference,
        input_size=image_size,
        channel_divisor=cfg.channel_divisor,
        impl=cfg.impl,
    )
    if cfg.init_from is not None:  # the same function as the source, at this model's towers
        try:
            load_pretrained(model, cfg.init_from)
        except ValueError as err:
            raise ConfigError(f"init_from {cfg.init_from}: {err}") from None
    return model
