"""Seed planning: how many seeds per point resolve an accuracy difference, and what they cost."""

from __future__ import annotations

import json
import math

import pandas as pd

from towerspace import analysis
from towerspace.errors import UserError
from towerspace.status import Status

COLUMNS = ("towers", "reference", "n_pairs", "diff_mean", "sd_diff", "power_now", "seeds",
           "seeds_upper", "hours")  # fmt: skip


def check_pilot(results: pd.DataFrame) -> None:
    """Refuse, in one line, results that cannot show the seeds' spread (fewer than 2 seeds)."""
    done = results[results["status"] == Status.FINISHED]
    if done.empty:
        raise UserError("no finished trials: nothing to plan from")
    seeds = int(done.groupby("towers", observed=True)["seed"].nunique().max())
    if seeds < 2:
        raise UserError(f"the spread over seeds needs at least 2 finished seeds of a point and "
                        f"its reference; this sweep has {seeds}: run a pilot with, e.g., "
                        f"seeds: [0, 1, 2]")  # fmt: skip


def devices_per_trial(results: pd.DataFrame) -> tuple[float, str]:
    """GPUs (or, for CPU-only trials, CPUs) one trial held, and which: from its config."""
    from towerspace import config, estimate

    text = next((c for c in results["config"] if isinstance(c, str)), None)
    if text is None:
        return 1.0, "device"
    cfg = config.from_dict(json.loads(text))
    return estimate.devices_per_trial(cfg), estimate.device_kind(cfg).upper()


def add_hours(plan: pd.DataFrame, results: pd.DataFrame, devices: float) -> pd.DataFrame:
    """Device-hours of `seeds` trials of each point at its trials' measured training time
    (train_time_s: epochs with validation; start-up not counted); the pooled row sums the
    points and the reference at the pooled plan."""
    done = results[results["status"] == Status.FINISHED]
    seconds = done.groupby("towers", observed=True)["train_time_s"].mean()
    seconds.index = seconds.index.astype(str)
    per_trial = [seconds.get(str(t), math.nan) for t in plan["towers"]]
    hours = [s * max(n, 0) * devices / 3600 for s, n in zip(per_trial, plan["seeds"], strict=True)]
    pooled = plan.index[plan["towers"] == "pooled"]
    if len(pooled):
        seeds = plan.loc[pooled[0], "seeds"]
        hours[pooled[0]] = float(seconds.sum() * max(seeds, 0) * devices / 3600)
    return plan.assign(hours=hours)


def plan(results: pd.DataFrame, delta: float, **options) -> tuple[pd.DataFrame, list[str]]:
    """The seed plan of a sweep's results (analysis.seeds_needed plus hours) and its summary
    lines."""
    check_pilot(results)
    table = analysis.seeds_needed(results, delta, **options)
    devices, kind = devices_per_trial(results)
    table = add_hours(table, results, devices)
    pooled = table.iloc[-1]
    points = len(table) - 1
    a = table.attrs
    lines = [
        f"to resolve a difference of {delta:g} in {options.get('metric', analysis.METRIC)} "
        f"against {pooled['reference']} with power {a['power']:g} (two-sided paired t-test at "
        f"{a['level']:.0%}):",
        f"  {pooled['seeds']} seeds per point at the pooled spread of the paired differences "
        f"(sd {pooled['sd_diff']:.4g}, {int(pooled['df'])} degrees of freedom over {points} "
        f"points); {pooled['seeds_upper']} at its {a['confidence']:.0%} upper bound",
        f"  cost: {pooled['hours']:.3g} {kind}-hours of training for {points + 1} points x "
        f"{pooled['seeds']} seeds, at this sweep's mean time per trial "
        f"({devices:g} {kind}{'' if devices == 1 else 's'} per trial; start-up not counted)",
    ]
    return table, lines
