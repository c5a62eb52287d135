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

# curves of one continuum: the same order, mid op, budget and residual wiring
GROUPS = ("order", "mid", "match", "residual")
METRIC = "final_val_acc"
REGIMES = ("regular", "inception", "depthwise")
LEVEL = 0.95  # of summarize's intervals
COSTS = ("params", "flops", "training_flops", "images_per_s", "latency_ms")  # means per point
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
    costs = [c for c in COSTS if c in table]
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
    for cost in ("flops", "latency_ms"):
        if cost in summary and summary[cost].notna().any():
            summary[f"pareto_{cost.removesuffix('_ms')}"] = on_front(summary, cost, keys[1:])
    summary.attrs["excluded"] = excluded(results)
    summary.attrs["interval"] = INTERVAL
    return summary


def pareto_front(summary: pd.DataFrame, column: str, higher_is_better: bool) -> pd.DataFrame:
    """Points no other point beats on both mean accuracy and cost, sorted by cost."""
    # on a tie in cost the more accurate point comes first, so the other is dominated
    ordered = summary.dropna(subset=[column, "mean"])
    ordered = ordered.sort_values([column, "mean"], ascending=[not higher_is_better, False])
    best, keep = -np.inf, []
    for index, acc in ordered["mean"].items():
        if acc > best:
            keep.append(index)
            best = acc
    return summary.loc[keep].sort_values(column)


def on_front(summary: pd.DataFrame, cost: str, groups: Sequence[str] = ()) -> pd.Series:
    """Whether each point is on its group's accuracy/cost Pareto front (lower cost is better)."""
    flags = pd.Series(False, index=summary.index)
    parts = (
        summary.groupby(list(groups), dropna=False, observed=True) if groups else [((), summary)]
    )
    for _key, part in parts:
        flags[pareto_front(part, cost, higher_is_better=False).index] = True
    return flags


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
    keys, reference, pairs = _pairs(results, reference, metric)
    rng = np.random.default_rng(seed)
    rows = []
    for key, point, diffs in pairs:
        low, high = _bootstrap(diffs, rng, n_boot)
        rows.append({**dict(zip(keys, key, strict=True)), "reference": reference,
                     "n_pairs": len(diffs), "diff_mean": diffs.mean() if len(diffs) else math.nan,
                     "ci_low": low, "ci_high": high,
                     "position": point["position"].mean()})  # fmt: skip
    out = pd.DataFrame(rows).astype({"towers": ordered_towers(results["towers"]).dtype})
    return out.sort_values([*keys[1:], "position"], kind="stable").reset_index(drop=True)


def _pairs(results: pd.DataFrame, reference: str | None, metric: str):
    """The grouping keys, the reference used, and per point (with the reference itself) its
    key, its finished trials and its differences to the reference over the seeds both ran."""
    table = derive(results)
    done = table[table["status"] == Status.FINISHED]
    keys = _groups(table, ("towers",))
    rest = keys[1:]
    reference = reference_point(results) if reference is None else reference
    if reference not in set(done["towers"]):
        raise UserError(f"reference {reference!r} is not a finished point; points: "
                         f"{', '.join(label_order(done['towers']))}")  # fmt: skip
    ref = done[done["towers"] == reference].set_index([*rest, "seed"])[metric]

    def each():
        for key, point in done.groupby(keys, sort=False, observed=True):
            values = point.set_index([*rest, "seed"])[metric]
            paired = values.index.intersection(ref.index)
            key = key if isinstance(key, tuple) else (key,)
            yield key, point, (values.loc[paired] - ref.loc[paired]).to_numpy()

    return keys, reference, each()


def _bootstrap(diffs: np.ndarray, rng: np.random.Generator, n_boot: int) -> tuple[float, float]:
    if len(diffs) < 2:
        return math.nan, math.nan
    means = rng.choice(diffs, size=(n_boot, len(diffs)), replace=True).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_power(n: int, delta: float, sd: float, level: float = LEVEL) -> float:
    """Power of a two-sided paired t-test at `level` with n pairs to detect a true mean
    difference delta when the paired differences have standard deviation sd (noncentral t)."""
    if n < 2:
        return math.nan
    if sd == 0:
        return 1.0 if delta != 0 else 1 - level
    df, shift = n - 1, abs(delta) * math.sqrt(n) / sd
    t = stats.t.ppf(0.5 + level / 2, df)
    return float(stats.nct.sf(t, df, shift) + stats.nct.cdf(-t, df, shift))


def seeds_for(delta: float, sd: float, power: float = 0.8, level: float = LEVEL) -> int:
    """The fewest seeds (pairs, at least 2) whose paired t-test detects delta with `power`."""
    if not delta > 0 or not 0 < power < 1:
        raise ValueError(f"seeds_for: delta must be > 0 and power in (0, 1), got {delta}, {power}")
    if math.isnan(sd):
        return -1
    low, high = 2, 2
    while paired_power(high, delta, sd, level) < power:  # the power grows with n
        low, high = high, high * 2
        if high > 10**7:
            raise ValueError(f"seeds_for: more than 10^7 seeds for delta {delta} at sd {sd}")
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if paired_power(mid, delta, sd, level) < power else (low, mid)
    return low


def _upper_sd(sd: float, df: int, confidence: float) -> float:
    """A one-sided upper confidence bound on a standard deviation from df degrees of freedom."""
    return sd * math.sqrt(df / stats.chi2.ppf(1 - confidence, df)) if df > 0 else math.nan


def seeds_needed(
    results: pd.DataFrame,
    delta: float,
    *,
    reference: str | None = None,
    metric: str = METRIC,
    power: float = 0.8,
    level: float = LEVEL,
    confidence: float = 0.8,
) -> pd.DataFrame:
    """Seeds per point with which the paired comparison (compare(): each point minus the
    reference, seed by seed) detects a true difference of `delta` with `power` (two-sided paired
    t-test at `level`), from the spread of the paired differences seen so far.

    One row per point, then a row 'pooled' over all points (the same seeds' noise, with the
    degrees of freedom of all of them: the figure to plan with). seeds_upper plans with the
    `confidence` upper bound of that spread, since a pilot of few seeds may under-state it.
    """
    keys, reference, pairs = _pairs(results, reference, metric)
    rows, squares, dof = [], 0.0, 0
    for key, _point, d in pairs:
        if key[0] == reference:
            continue
        sd = float(d.std(ddof=1)) if len(d) >= 2 else math.nan
        if len(d) >= 2:
            squares, dof = squares + sd**2 * (len(d) - 1), dof + len(d) - 1
        mean = float(d.mean()) if len(d) else math.nan
        rows.append({**dict(zip(keys, key, strict=True)),
                     **_plan_row(len(d), mean, sd, len(d) - 1, delta, power, level,
                                 confidence)})  # fmt: skip
    pooled = math.sqrt(squares / dof) if dof else math.nan
    fewest = min((r["n_pairs"] for r in rows), default=0)  # the power now of the worst-off point
    rows.append({"towers": "pooled", **_plan_row(fewest, math.nan, pooled, dof, delta, power,
                                                 level, confidence)})  # fmt: skip
    out = pd.DataFrame(rows)
    out.insert(1, "reference", reference)
    out.attrs.update(delta=delta, power=power, level=level, confidence=confidence)
    return out


def _plan_row(n, mean, sd, df, delta, power, level, confidence) -> dict[str, float | int]:
    upper = _upper_sd(sd, df, confidence)
    return {"n_pairs": n, "diff_mean": mean, "sd_diff": sd, "df": max(df, 0),
            "power_now": paired_power(n, delta, sd, level) if df > 0 and n >= 2 else math.nan,
            "seeds": seeds_for(delta, sd, power, level) if df > 0 else -1,
            "seeds_upper": seeds_for(delta, upper, power, level) if df > 0 else -1}  # fmt: skip
