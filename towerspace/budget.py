"""Budget matching: the widths and channels at which a model costs what a reference costs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from towerspace.towers import TowerSchedule


@dataclass(frozen=True)
class Match:
    """A solved budget: the width multiplier, the rounded channels, and how close they land."""

    metric: str  # params | flops
    width: float  # the solved width multiplier (before per-group rounding)
    channels: dict[str, int]
    target: int
    achieved: int

    @property
    def error(self) -> float:
        """Relative error of the achieved cost against the target."""
        return self.achieved / self.target - 1.0

    def as_dict(self) -> dict[str, float | int | str]:
        """Plain fields for results tables."""
        return {
            "match": self.metric,
            "solved_width": self.width,
            "budget_target": self.target,
            "budget_achieved": self.achieved,
            "budget_error": self.error,
        }


def round_channels(base: Mapping[str, int], width: float, divisor: int) -> dict[str, int]:
    """Every group's base channels times width, rounded to a multiple of its step."""
    rounded = {}
    for group, channels in base.items():
        step = group_step(channels * width, divisor)
        rounded[group] = max(step, int(channels * width / step + 0.5) * step)
    return rounded


def group_step(exact: float, divisor: int) -> int:
    """The rounding step of a group: divisor, or its largest factor that fits a narrow group.

    A group narrower than the divisor cannot take that many towers anyway (it snaps towards
    depthwise), so rounding it up to the divisor would only inflate it.
    """
    return max(d for d in range(1, divisor + 1) if divisor % d == 0 and d <= max(exact, 1.0))


def bisect_width(
    cost: Callable[[float], int],
    target: int,
    low: float,
    high: float,
    *,
    steps: int,
    width_ratio: float | None = None,
    cost_error: float | None = None,
) -> tuple[float, float, dict[float, int]]:
    """Bisection on log-width towards the width whose cost is target (cost grows with width).

    Returns the final bracket (low, high) and the cost of every width tried. It stops after
    steps, or early once high/low < width_ratio or a cost lies within cost_error of target.
    """
    tried: dict[float, int] = {}
    for _ in range(steps):
        mid = math.sqrt(low * high)
        tried[mid] = cost(mid)
        low, high = (mid, high) if tried[mid] < target else (low, mid)
        if width_ratio is not None and high / low < width_ratio:
            break
        if cost_error is not None and abs(tried[mid] / target - 1.0) < cost_error:
            break
    return low, high, tried


def solve_width(
    cost: Callable[[float, TowerSchedule], int],
    schedule: TowerSchedule,
    reference: TowerSchedule,
    *,
    metric: str,
    base_width: float = 1.0,
) -> Match:
    """The width at which cost(width, schedule) comes closest to cost(base_width, reference).

    Bisection on log-width, then the closest of every width tried: a width knob rounds
    channels, so cost moves in steps.
    """
    target = cost(base_width, reference)
    if reference == schedule:
        return Match(metric, base_width, {}, target, target)
    bracket = (base_width / 16, base_width * 16)
    _, _, tried = bisect_width(
        lambda w: cost(w, schedule), target, *bracket, steps=30, width_ratio=1.002, cost_error=0.005
    )
    width = min(tried, key=lambda w: (abs(tried[w] - target), w))
    return Match(metric, width, {}, target, tried[width])


def match_channels(
    cost: Callable[[dict[str, int]], int],
    base: Mapping[str, int],
    target: int,
    *,
    metric: str = "params",
    divisor: int = 1,
    tolerance: float = 0.02,
) -> Match:
    """Solve the width multiplier whose cost is closest to target, then round group by group.

    A width multiplier alone moves cost in steps (channels are rounded to the divisor), so after
    bisection each channel group is rounded down or up, greedily, while that brings the cost
    closer to the target; no group strays more than one rounding step from the solved width.
    """
    lo, hi, _ = bisect_width(lambda w: cost(round_channels(base, w, divisor)), target,
                             1.0 / 256, 16.0, steps=40)  # fmt: skip
    width = min((lo, hi), key=lambda w: abs(cost(round_channels(base, w, divisor)) - target))
    channels = round_channels(base, width, divisor)
    options = {g: _neighbours(c * width, divisor) for g, c in base.items()}
    achieved = cost(channels)
    while abs(achieved / target - 1.0) > tolerance / 4:
        moves = [{**channels, g: v} for g, vs in options.items() for v in vs if v != channels[g]]
        scored = [(abs(cost(m) - target), i) for i, m in enumerate(moves)]
        error, best = min(scored, default=(math.inf, -1))
        if error >= abs(achieved - target):
            break
        channels = moves[best]
        achieved = cost(channels)
    return Match(metric, width, channels, target, achieved)


def _neighbours(exact: float, divisor: int) -> tuple[int, ...]:
    """The multiples of the group's step just below and above exact (at least one step)."""
    step = group_step(exact, divisor)
    low = max(1, math.floor(exact / step)) * step
    return (low, low + step)


def schedule_divisor(schedule: TowerSchedule) -> int:
    """Channel rounding for a matched schedule: the lcm of the counts and widths it asks for.

    Positions (and per-layer random positions) snap to divisors of the channels, so they round
    to multiples of 8, which keeps 1, 2, 4 and 8 towers reachable at every site.
    """
    specs = (schedule.default, *schedule.overrides.values())
    divisor = 8 if schedule.layer_seed is not None else 1
    for spec in specs:
        if spec.kind == "position":
            divisor = math.lcm(divisor, 8)
        elif isinstance(spec.value, int):
            divisor = math.lcm(divisor, spec.value)
    return divisor
