"""Continuum analysis: derived columns, summaries over seeds, paired comparisons (pandas in/out)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from towerspace.errors import UserError
from towerspace.results import ordered_towers
from towerspace.status import Status
from towerspace.towers import TowerLabel, label_order

GROUPS = ("order", "mid", "match")  # curves of one continuum: the same order, mid op and budget
METRIC = "final_val_acc"
REGIMES = ("regular", "inception", "depthwise")
LEVEL = 0.95  # of summarize's intervals
INTERVAL = "95% t-interval on the arcsine-square-root scale"  # summarize's, in words


def derive(results: pd.DataFrame) -> pd.DataFrame:
    """Add effective towers, log2 group width and regime from each trial's realized towers;
    towers becomes an ordered categorical (regular to depthwise) if it is not one."""
    table = results.copy()
    table["towers"] = ordered_towers(table["towers"])
    realized = [json.loads(r) if isinstance(r, str) else {} for r in table["realized_towers"]]
    table["effective_towers"] = [_geomean([s["towers"] for s in r.values()]) for r in realized]
    table["log2_group_width"] = [
        float(np.mean([math.log2(s["group_width"]) for s in r.values()])) if r else math.nan
        for r in realized
    ]
    table["regime"] = [_regime(r) for r in realized]
    table["population"] = [population(label) for label in table["towers"]]
    if "position" not in table:
        table["position"] = [float(np.mean([s["position"] for s in r.values()])) for r in realized]
    return table


def population(label: object) -> str:
    """'sampled models' (plus any overrides) for a model drawn at random, else the label itself."""
    return TowerLabel.parse(label).population()


def is_population(table: pd.DataFrame) -> bool:
    """Whether every point is a model drawn from a population (labels 'random/<seed>')."""
    labels = [TowerLabel.parse(label) for label in table["towers"]]
    return bool(labels) and all(label.sampled for label in labels)


def _geomean(values: Sequence[float]) -> float:
    return float(2 ** np.mean(np.log2(values))) if len(values) else math.nan


def _regime(realized: dict) -> str:
    regimes = {s["regime"] for s in realized.values()}
    return regimes.pop() if len(regimes) == 1 else "inception" if regimes else "unknown"


def excluded(results: pd.DataFrame) -> list[str]:
    """Trials left out of summaries (anything not finished), as 'trial_id (status)'."""
    bad = results[results["status"] != Status.FINISHED]
    return [f"{t} ({s})" for t, s in zip(bad["trial_id"], bad["status"], strict=True)]


def _groups(table: pd.DataFrame, by: Sequence[str]) -> list[str]:
    return [c for c in (*by, *GROUPS) if c in table.columns and c not in ("seed",)]


def accuracy_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """A t-interval for the mean of accuracies in [0, 1], computed on the arcsine-square-root
    scale and mapped back, so it stays within [0, 1]: (NaN, NaN) for fewer than 2 values.

    arcsin(sqrt(p)) stabilises the variance of a proportion near 0 and 1 (where accuracies
    crowd) and, unlike the logit, is finite at exactly 0 and 1; the interval is cut to the
    transform's range [0, pi/2] before it is mapped back. NaN values are left out; a value
    outside [0, 1] is a ValueError.
    """
    p = np.asarray(values, dtype=float)
    p = p[~np.isnan(p)]
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"accuracy_interval: values must lie in [0, 1], got {p.tolist()}")
    if len(p) < 2:
        return math.nan, math.nan
    angle = np.arcsin(np.sqrt(p))
    half = stats.t.ppf(0.5 + level / 2, len(p) - 1) * angle.std(ddof=1) / math.sqrt(len(p))
    low, high = np.clip([angle.mean() - half, angle.mean() + half], 0.0, math.pi / 2)
    return float(np.sin(low) ** 2), float(np.sin(high) ** 2)


def summarize(
    results: pd.DataFrame, by: Sequence[str] = ("towers",), metric: str = METRIC
) -> pd.DataFrame:
    """Per point: mean, std and count of the metric (an accuracy) over seeds, its 95%
    interval (asin_ci_low, asin_ci_high: accuracy_interval, a t-interval on the
    arcsine-square-root scale, within [0, 1]), position, regime and costs.

    Trials that did not finish are excluded; they are counted in `failed` and named in
    `summary.attrs["excluded"]`.
    """
    table = derive(results)
    keys = _groups(table, by)
    done = table[table["status"] == Status.FINISHED]
    costs = [c for c in ("params", "flops", "training_flops", "images_per_s") if c in table]
    agg = done.groupby(keys, sort=False, dropna=False, observed=True).agg(
        n=(metric, "count"),
        mean=(metric, "mean"),
        std=(metric, "std"),
        asin_ci_low=(metric, lambda v: accuracy_interval(v)[0]),
        asin_ci_high=(metric, lambda v: accuracy_interval(v)[1]),
        position=("position", "mean"),
        effective_towers=("effective_towers", "mean"),
        log2_group_width=("log2_group_width", "mean"),
        regime=("regime", "first"),
        **{c: (c, "mean") for c in costs},
    )
    failed = table[table["status"] != Status.FINISHED]
    failed = failed.groupby(keys, sort=False, dropna=False, observed=True).size()
    agg["failed"] = failed.reindex(agg.index, fill_value=0).astype(int)
    for column in costs:  # means of nullable counts are nullable floats: plain floats
        agg[column] = agg[column].astype("float64")
    for column in ("params", "flops", "training_flops"):
        if column in agg and agg[column].notna().all():  # a count where every trial has one
            agg[column] = agg[column].round().astype("int64")
    summary = agg.reset_index().sort_values([*keys[1:], "position"], kind="stable")
    summary = summary.reset_index(drop=True)
    summary.attrs["excluded"] = excluded(results)
    summary.attrs["interval"] = INTERVAL
    return summary


def reference_point(results: pd.DataFrame) -> str:
    """'depthwise' if it finished, else the finished point nearest the depthwise end.

    Nearest means the highest mean position over its trials; ties go to the label nearest the
    regular end (label order).
    """
    done = derive(results).query(f"status == '{Status.FINISHED}'")
    if done.empty:
        raise UserError("no finished trials: nothing to compare against")
    if "depthwise" in set(done["towers"]):
        return "depthwise"
    position = done.groupby("towers", as_index=False, observed=True)["position"].mean()
    ranked = position.sort_values(["position", "towers"], ascending=[False, True], kind="stable")
    return ranked["towers"].iloc[0]


def compare(
    results: pd.DataFrame,
    reference: str | None = None,
    metric: str = METRIC,
    *,
    n_boot: int = 10_000,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired differences against a reference point, pairing trials by seed, with bootstrap CIs.

    The reference defaults to reference_point(): 'depthwise', or the finished point closest to
    it; the `reference` column says which was used. For each point (and order / mid / budget
    group), diff = metric(point, seed) - metric(reference, seed) over the seeds both finished;
    the 95% interval is a percentile bootstrap of the mean difference.
    """
    table = derive(results)
    done = table[table["status"] == Status.FINISHED]
    keys = _groups(table, ("towers",))
    rest = keys[1:]
    reference = reference_point(results) if reference is None else reference
    if reference not in set(done["towers"]):
        raise UserError(f"reference {reference!r} is not a finished point; points: "
                         f"{', '.join(label_order(done['towers']))}")  # fmt: skip
    ref = done[done["towers"] == reference].set_index([*rest, "seed"])[metric]
    rng = np.random.default_rng(seed)
    rows = []
    for key, point in done.groupby(keys, sort=False, observed=True):
        key = key if isinstance(key, tuple) else (key,)
        values = point.set_index([*rest, "seed"])[metric]
        paired = values.index.intersection(ref.index)
        diffs = (values.loc[paired] - ref.loc[paired]).to_numpy()
        low, high = _bootstrap(diffs, rng, n_boot)
        rows.append({**dict(zip(keys, key, strict=True)), "reference": reference,
                     "n_pairs": len(diffs), "diff_mean": diffs.mean() if len(diffs) else math.nan,
                     "ci_low": low, "ci_high": high,
                     "position": point["position"].mean()})  # fmt: skip
    out = pd.DataFrame(rows).astype({"towers": done["towers"].dtype})
    return out.sort_values([*rest, "position"], kind="stable").reset_index(drop=True)


def _bootstrap(diffs: np.ndarray, rng: np.random.Generator, n_boot: int) -> tuple[float, float]:
    if len(diffs) < 2:
        return math.nan, math.nan
    means = rng.choice(diffs, size=(n_boot, len(diffs)), replace=True).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
