"""Budget matching: the channel widths at which a model costs what a reference costs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MATCHES = ("none", "params", "flops")


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
    """Every group's base channels times width, rounded to a multiple of divisor (at least one)."""
    return {g: max(divisor, int(c * width / divisor + 0.5) * divisor) for g, c in base.items()}


def match_channels(
    cost: Callable[[dict[str, int]], int],
    base: Mapping[str, int],
    target: int,
    *,
    metric: str = "params",
    divisor: int = 1,
    tolerance: float = 0.02,
) -> Match:
    """Solve the width multiplier whose cost is closest to target, then nudge single groups.

    A width multiplier alone moves cost in steps (channels are rounded to the divisor), so after
    bisection each channel group may move one divisor step up or down, greedily, while that
    brings the cost closer to the target.
    """
    lo, hi = 1.0 / 256, 16.0
    for _ in range(40):  # bisection on log-width: cost grows with width
        mid = math.sqrt(lo * hi)
        if cost(round_channels(base, mid, divisor)) < target:
            lo = mid
        else:
            hi = mid
    candidates = [round_channels(base, w, divisor) for w in (lo, hi)]
    width, channels = min(
        zip((lo, hi), candidates, strict=True), key=lambda wc: abs(cost(wc[1]) - target)
    )
    achieved = cost(channels)
    while abs(achieved / target - 1.0) > tolerance / 4:
        moves = [
            {**channels, g: channels[g] + step}
            for g in channels
            for step in (-divisor, divisor)
            if channels[g] + step >= divisor
        ]
        best = min(moves, key=lambda ch: abs(cost(ch) - target))
        best_cost = cost(best)
        if abs(best_cost - target) >= abs(achieved - target):
            break
        channels, achieved = best, best_cost
    return Match(metric, width, channels, target, achieved)
