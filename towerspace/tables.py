"""Cost tables of the continuum: one layer, or a whole model, at every tower count."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from towerspace.block import tower_complexity
from towerspace.models import xception
from towerspace.towers import TowerSpec, TowerSpecLike, divisors, position, realized_towers, regime


def parse_points(text: str) -> list[TowerSpecLike]:
    """Tower specs from '1,2,4,depthwise,gw8,t=0.5' (counts, group widths, positions)."""
    items = filter(None, (part.strip() for part in text.split(",")))
    return [TowerSpec.from_label(item).as_config() for item in items]


def block_table(
    channels: int,
    size: int,
    *,
    out_channels: int | None = None,
    kernel_size: int = 3,
    stride: int = 1,
    order: str = "spatial_first",
    mid: str = "none",
) -> pd.DataFrame:
    """Parameters and FLOPs of one TowerConv2d at every valid tower count."""
    out = out_channels or channels
    spatial = channels if order == "spatial_first" else out
    rows = []
    for towers in divisors(spatial):
        cost = tower_complexity(channels, out, size, size, kernel_size=kernel_size, stride=stride,
                                towers=towers, order=order, mid=mid)  # fmt: skip
        rows.append({
            "towers": towers,
            "group_width": spatial // towers,
            "position": round(position(towers, spatial), 3),
            "regime": regime(towers, spatial),
            "params": cost.params,
            "flops": cost.flops,
            "training_flops": cost.training_flops,
        })  # fmt: skip
    table = pd.DataFrame(rows)
    table["params_vs_depthwise"] = (table["params"] / table["params"].iloc[-1]).round(2)
    return table


def model_table(
    points: Sequence[TowerSpecLike], *, size: int, match: str = "none", **model_kwargs: Any
) -> pd.DataFrame:
    """Whole-model cost at each tower spec of a schedule list, budget-matched or not."""
    rows = []
    for spec in points:
        model = _meta_model(spec, size=size, match=match, **model_kwargs)
        cost = model.complexity(size)
        realized = sorted({r["towers"] for r in realized_towers(model).values()})
        budget = model.budget or {}
        rows.append({
            "towers": TowerSpec.parse(spec).label(),
            "realized": ",".join(map(str, realized)) if len(realized) <= 4 else
                        f"{realized[0]}..{realized[-1]} ({len(realized)} counts)",
            "width": round(budget.get("solved_width", model_kwargs.get("width", 1.0)), 4),
            "c728": model.channels["c728"],
            "params": cost.params,
            "flops": cost.flops,
            "training_flops": cost.training_flops,
            "budget_error_%": round(100 * budget["budget_error"], 2) if budget else None,
        })  # fmt: skip
    return pd.DataFrame(rows)


def _meta_model(spec: TowerSpecLike, **kwargs: Any) -> torch.nn.Module:
    input_size = kwargs.pop("size")
    with torch.device("meta"):  # the model's structure without allocating its weights
        return xception(towers=spec, input_size=input_size, **kwargs)
