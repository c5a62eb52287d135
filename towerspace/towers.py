"""Tower counts and schedules: which tower count every tower site of a model gets, and the
labels tables and plots give them (made, read back and ordered here)."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from towerspace.errors import TowerSpecError

if TYPE_CHECKING:  # torch is imported by what builds models, not by what reads labels
    from torch import nn

KINDS = ("towers", "group_width", "position")
SNAPS = ("nearest", "strict")


def divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def regime(towers: int, channels: int) -> str:
    """Where a tower count sits: regular (1 tower), depthwise (1 per channel) or Inception-style."""
    if towers == channels:
        return "depthwise"
    if towers == 1:
        return "regular"
    return "inception"


@dataclass(frozen=True)
class TowerSpec:
    """One way to ask for towers: a count, a group width, or a position t in [0, 1]."""

    kind: str  # towers | group_width | position
    value: float | str  # a count, a width, a position, or "regular" / "depthwise" for towers

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TowerSpecError(f"tower spec kind {self.kind!r} is not one of: {', '.join(KINDS)}")
        if self.kind == "position":
            if not isinstance(self.value, int | float) or not 0.0 <= self.value <= 1.0:
                raise TowerSpecError(f"position must be a number in [0, 1], got {self.value!r}")
        elif self.kind == "towers" and self.value in ("regular", "depthwise"):
            pass
        elif isinstance(self.value, bool) or not isinstance(self.value, int) or self.value < 1:
            allowed = (
                "an int >= 1, 'regular' or 'depthwise'" if self.kind == "towers" else "an int >= 1"
            )
            raise TowerSpecError(f"{self.kind} must be {allowed}, got {self.value!r}")

    @classmethod
    def parse(cls, spec: TowerSpecLike) -> TowerSpec:
        """A spec from 4, 'regular', 'depthwise', {'group_width': 8} or {'position': 0.5}."""
        if isinstance(spec, TowerSpec):
            return spec
        if isinstance(spec, Mapping):
            if len(spec) != 1 or next(iter(spec)) not in KINDS:
                raise TowerSpecError(
                    f"a tower spec mapping has one key of {', '.join(KINDS)}, got {dict(spec)!r}"
                )
            ((kind, value),) = spec.items()
            return cls(kind, value)
        return cls("towers", spec)

    @classmethod
    def from_label(cls, text: str) -> TowerSpec:
        """The spec a label names ('4', 'regular', 'depthwise', 'gw8', 't=0.50'): label()'s
        inverse; raises a one-line TowerSpecError on any other text."""
        text = str(text).strip()
        if text.isdigit():
            return cls("towers", int(text))
        if text.startswith("gw") and text[2:].isdigit():
            return cls("group_width", int(text[2:]))
        if text.startswith("t="):
            with contextlib.suppress(ValueError):
                return cls("position", float(text[2:]))
        return cls("towers", text)

    def label(self) -> str:
        """Short text for tables and plots: '4', 'depthwise', 'gw8', 't=0.50'."""
        if self.kind == "towers":
            return str(self.value)
        if self.kind == "group_width":
            return f"gw{self.value}"
        return f"t={self.value:.2f}"

    def as_config(self) -> int | str | dict[str, float]:
        """The plain form parse() accepts, for YAML and results tables."""
        return self.value if self.kind == "towers" else {self.kind: self.value}


TowerSpecLike = TowerSpec | int | str | Mapping[str, Any]


def nearest_divisor(channels: int, target: float) -> int:
    """The divisor of channels closest to target on a log scale (ties go to fewer towers)."""
    target = min(max(target, 1.0), float(channels))
    return min(divisors(channels), key=lambda d: (abs(math.log(d) - math.log(target)), d))


def position(towers: int, channels: int) -> float:
    """Position on the continuum: 0 for one tower, 1 for depthwise, log-spaced between."""
    return 0.0 if channels == 1 else math.log(towers) / math.log(channels)


def realize(spec: TowerSpec, channels: int, snap: str = "nearest", site: str = "") -> int:
    """The tower count a site of `channels` channels gets for spec, snapped or strict."""
    where = f"{site}: " if site else ""
    if spec.kind == "position":
        return nearest_divisor(channels, channels ** float(spec.value))
    if spec.value == "regular":
        return 1
    if spec.value == "depthwise":
        return channels
    value = int(spec.value)
    target = value if spec.kind == "towers" else channels / value
    if channels % value == 0 and target >= 1:
        return int(target)
    if snap == "strict":
        noun = "towers" if spec.kind == "towers" else "group_width"
        valid = ", ".join(map(str, divisors(channels)))
        raise TowerSpecError(
            f"{where}{noun}={value} does not divide {channels} channels; valid: {valid}"
        )
    return nearest_divisor(channels, target)


@dataclass(frozen=True)
class TowerSchedule:
    """Tower counts for every tower site: a default spec and overrides by site-name prefix.

    Site names are dotted module paths (e.g. 'middle.block5.sep2'); an override keyed 'middle'
    covers the whole middle flow, and the longest matching prefix wins.
    """

    default: TowerSpec = TowerSpec("towers", "depthwise")
    overrides: Mapping[str, TowerSpec] = field(default_factory=dict)
    snap: str = "nearest"  # nearest: snap to the closest valid count | strict: raise
    layer_seed: int | None = None  # set: sites without an override draw a uniform position

    def __post_init__(self) -> None:
        if self.snap not in SNAPS:
            raise TowerSpecError(f"snap={self.snap!r} is not one of: {', '.join(SNAPS)}")

    @classmethod
    def build(
        cls,
        towers: TowerSpecLike | TowerSchedule = "depthwise",
        overrides: Mapping[str, TowerSpecLike] | None = None,
        snap: str = "nearest",
        layer_seed: int | None = None,
    ) -> TowerSchedule:
        """A schedule from plain values: `build(4)`, `build({'position': .5}, {'exit': 1})`."""
        if isinstance(towers, TowerSchedule):
            if overrides or layer_seed is not None:
                raise TowerSpecError("give overrides inside the TowerSchedule, not beside it")
            return towers
        parsed = {name: TowerSpec.parse(spec) for name, spec in (overrides or {}).items()}
        return cls(TowerSpec.parse(towers), parsed, snap, layer_seed)

    def spec_for(self, site: str) -> TowerSpec:
        """The spec that applies at a site: the longest matching override prefix, or default."""
        best, best_len = self.default, -1
        if self.layer_seed is not None:  # a population sample: one log-uniform draw per site
            best = TowerSpec("position", random.Random(f"{self.layer_seed}/{site}").random())
        for prefix, spec in self.overrides.items():
            if (site == prefix or site.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = spec, len(prefix)
        return best

    def towers_for(self, site: str, channels: int) -> int:
        """The realized tower count at a site with `channels` spatial channels."""
        return realize(self.spec_for(site), channels, self.snap, site)

    def check_sites(self, sites: list[str]) -> None:
        """Raise if an override names no site of the model (a typo would silently do nothing)."""
        for prefix in self.overrides:
            if not any(s == prefix or s.startswith(prefix + ".") for s in sites):
                close = [s for s in sites if s.split(".")[0] == prefix.split(".")[0]][:3]
                hint = f" (sites look like: {', '.join(close or sites[:3])})"
                raise TowerSpecError(f"tower override {prefix!r} matches no tower site{hint}")

    def label(self) -> str:
        """The schedule as tables and plots label it (see tower_label)."""
        return tower_label(self.default, self.layer_seed, self.overrides)


SAMPLED = "random/"  # a label's head for a model drawn from a population (layer_seed)
_HEAD_RANK = {"towers": 0, "group_width": 1, "position": 2, "sampled": 3}


def tower_label(
    towers: TowerSpecLike,
    layer_seed: int | None = None,
    overrides: Mapping[str, TowerSpecLike] | None = None,
) -> str:
    """A model's towers as tables and plots name them: '4', 'depthwise', 'gw8', 't=0.50' or
    'random/3', then ' [site=spec, ...]' for overrides (the one place labels are made)."""
    head = f"{SAMPLED}{layer_seed}" if layer_seed is not None else TowerSpec.parse(towers).label()
    if not overrides:
        return head
    parts = ", ".join(f"{site}={TowerSpec.parse(v).label()}" for site, v in overrides.items())
    return f"{head} [{parts}]"


@dataclass(frozen=True)
class TowerLabel:
    """A tower label read back: its head (a spec's label or 'random/<seed>') and overrides."""

    head: str
    overrides: str = ""  # 'entry=2, middle=4', as written between the brackets

    @classmethod
    def parse(cls, text: object) -> TowerLabel:
        """The parts of a label made by tower_label (any other text is all head)."""
        label = str(text).strip()
        head, bracket, rest = label.partition(" [")
        if bracket and rest.endswith("]"):
            return cls(head, rest[:-1])
        return cls(label)

    def __str__(self) -> str:
        return f"{self.head} [{self.overrides}]" if self.overrides else self.head

    @property
    def sampled(self) -> bool:
        """Whether the model was drawn from a population (a layer seed), not asked for."""
        seed = self.head.removeprefix(SAMPLED)
        return self.head.startswith(SAMPLED) and seed.isdigit()

    def population(self) -> str:
        """'sampled models' (with any overrides) for a drawn model, else the label itself."""
        if not self.sampled:
            return str(self)
        return str(TowerLabel("sampled models", self.overrides))

    def order(self) -> tuple:
        """A sort key from regular to depthwise: counts up, group widths down, positions up,
        then sampled models; within one head, by overrides."""
        kind, value = self._kind_value()
        return (_HEAD_RANK[kind], value, self.head, self.overrides)

    def _kind_value(self) -> tuple[str, float]:
        head = self.head
        if self.sampled:
            return "sampled", float(head.removeprefix(SAMPLED))
        if head in ("regular", "depthwise"):
            return "towers", 1.0 if head == "regular" else math.inf
        if head.isdigit():
            return "towers", float(head)
        if head.startswith("gw") and head[2:].isdigit():
            return "group_width", -float(head[2:])
        if head.startswith("t="):
            with contextlib.suppress(ValueError):
                return "position", float(head[2:])
        return "sampled", math.inf  # not a label towerspace makes: last


def label_order(labels: Iterable[object]) -> list[str]:
    """Distinct labels from regular to depthwise (the order tables and plots use)."""
    return sorted({str(x) for x in labels}, key=lambda x: TowerLabel.parse(x).order())


def realized_towers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every TowerConv2d of a model: site name → channels, towers, group width, regime."""
    from towerspace.block import TowerConv2d

    return {
        name: {
            "channels": m.spatial_channels,
            "towers": m.towers,
            "group_width": m.group_width,
            "position": position(m.towers, m.spatial_channels),
            "regime": regime(m.towers, m.spatial_channels),
        }
        for name, m in model.named_modules()
        if isinstance(m, TowerConv2d)
    }
